"""paged_attention (Triton, through the CPU interpreter) against paged_attention_ref, and the reference
against plain attention over the same K/V laid out contiguously."""

from __future__ import annotations

import pytest
import torch

from helpers import needs_triton
from ringserve.kernels import flash_attention_ref, paged_attention, paged_attention_ref


def _pool(seed, N, S, Hkv, D, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, S, Hkv, D, generator=g).to(dtype), torch.randn(N, S, Hkv, D, generator=g).to(dtype)


def _tables(seed, B, pages_per_seq, N):
    """Page tables that use pages out of order (as a pool hands them out after frees)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(N, generator=g)[: B * pages_per_seq]
    return perm.view(B, pages_per_seq).to(torch.int32)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# (B, Tq, H, Hkv, S page size, kv_len per (b, t) as a rule, num_splits, dtype)
CASES = [
    pytest.param(1, 1, 4, 2, 8, "full", None, torch.float32, id="decode-one-seq"),
    pytest.param(5, 1, 8, 2, 16, "ragged", 3, torch.float32, id="decode-batch-ragged-lengths"),
    pytest.param(1, 6, 4, 1, 8, "causal", 2, torch.float32, id="append-causal-lengths"),
    pytest.param(2, 20, 4, 4, 32, "full", 1, torch.float32, id="chunk-vs-context-one-split"),
    pytest.param(3, 2, 6, 3, 8, "some-empty", 2, torch.float32, id="empty-queries"),
    pytest.param(2, 3, 4, 2, 16, "ragged", 2, torch.bfloat16, id="bf16"),
]


def _kv_len(rule, B, Tq, cap, g):
    if rule == "full":
        return torch.full((B, Tq), cap, dtype=torch.int32)
    if rule == "ragged":
        return torch.randint(1, cap + 1, (B, 1), generator=g).expand(B, Tq).contiguous().to(torch.int32)
    if rule == "causal":  # query t sees one more key than query t-1
        return (cap - Tq + 1 + torch.arange(Tq)).expand(B, Tq).contiguous().to(torch.int32)
    lens = torch.randint(0, cap + 1, (B, Tq), generator=g).to(torch.int32)
    lens[0, 0] = 0
    return lens


@needs_triton
@pytest.mark.parametrize("B,Tq,H,Hkv,S,rule,num_splits,dtype", CASES)
def test_paged_matches_reference(B, Tq, H, Hkv, S, rule, num_splits, dtype):
    D, per_seq, N = 64, 5, 40
    g = torch.Generator().manual_seed(B * 100 + Tq)
    kp, vp = _pool(B + Tq, N, S, Hkv, D, dtype)
    table = _tables(B, B, per_seq, N)
    kv_len = _kv_len(rule, B, Tq, per_seq * S - 3, g)
    q = torch.randn(B, Tq, H, D, generator=g).to(dtype)
    out, lse = paged_attention(q, kp, vp, table, kv_len, num_splits=num_splits, backend="triton")
    ref, ref_lse = paged_attention_ref(q, kp, vp, table, kv_len, out_dtype=torch.float32)
    assert out.shape == (B, Tq, H, D) and out.dtype == dtype and lse.dtype == torch.float32
    empty = kv_len == 0
    assert torch.isneginf(lse[empty]).all() and (out[empty] == 0).all()
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert _rel(out, ref) < tol
    live = torch.isfinite(ref_lse)
    assert torch.equal(live, torch.isfinite(lse))
    assert (lse[live] - ref_lse[live]).abs().max().item() < 10 * tol


def test_reference_equals_contiguous_attention():
    """Gathering the pages in table order is the same as attending a contiguous K/V with a causal offset."""
    B, Tq, H, Hkv, S, D, N = 1, 4, 4, 2, 8, 16, 12
    kp, vp = _pool(7, N, S, Hkv, D)
    table = torch.tensor([[9, 2, 5, 11]], dtype=torch.int32)
    Tk = 30  # the last 4 stored keys are the queries' own tokens: query t sees keys [0, 27 + t)
    kv_len = (Tk - Tq + 1 + torch.arange(Tq)).view(1, Tq).to(torch.int32)
    q = torch.randn(B, Tq, H, D, generator=torch.Generator().manual_seed(3))
    out, lse = paged_attention_ref(q, kp, vp, table, kv_len)
    k = kp[table[0].long()].reshape(-1, Hkv, D)[:Tk]
    v = vp[table[0].long()].reshape(-1, Hkv, D)[:Tk]
    ref, ref_lse = flash_attention_ref(q[0], k, v, causal=True, q_start=Tk - Tq, k_start=0)
    assert _rel(out[0], ref) < 1e-6 and (lse[0] - ref_lse).abs().max() < 1e-5


def test_bad_shapes_are_refused_with_the_expected_shape():
    kp, vp = _pool(1, 4, 8, 2, 16)
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="kv_len must be"):
        paged_attention(q, kp, vp, torch.zeros(1, 2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32),
                        backend="torch")
    with pytest.raises(ValueError, match="page_table must be"):
        paged_attention(q, kp, vp, torch.zeros(2, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32),
                        backend="torch")


def _packed(fmt, k):
    from ringserve.kernels.quant import quantize_int4_ref, quantize_kv_ref

    if fmt == "fp8":
        q, s = quantize_kv_ref(k, dtype=torch.float8_e4m3fn)
        return q, s[..., None]
    return quantize_int4_ref(k)


@needs_triton
@pytest.mark.parametrize("fmt", ["fp8", "int4"])
@pytest.mark.parametrize("B,Tq,H,Hkv,S,rule", [(3, 1, 8, 2, 16, "ragged"), (1, 5, 4, 1, 8, "causal"),
                                               (2, 2, 6, 3, 8, "some-empty")])
def test_packed_pages_match_reference_and_dequantized_attention(fmt, B, Tq, H, Hkv, S, rule):
    """fp8 / int4 pages are dequantized in the kernel exactly as the twin does, and the twin equals plain
    attention over the dequantized K/V."""
    from ringserve.kernels.quant import dequantize_int4_ref, dequantize_kv_ref

    D, per_seq, N = 64, 4, 20
    g = torch.Generator().manual_seed(11 + B + Tq)
    k, v = _pool(B * 3 + Tq, N, S, Hkv, D)
    (kq, ks), (vq, vs) = _packed(fmt, k), _packed(fmt, v)
    table = _tables(B + 5, B, per_seq, N)
    kv_len = _kv_len(rule, B, Tq, per_seq * S - 2, g)
    q = torch.randn(B, Tq, H, D, generator=g)
    kw = dict(k_scales=ks, v_scales=vs, kv_format=fmt)
    out, lse = paged_attention(q, kq, vq, table, kv_len, num_splits=2, backend="triton", **kw)
    ref, ref_lse = paged_attention_ref(q, kq, vq, table, kv_len, **kw)
    assert _rel(out, ref) < 1e-5
    live = torch.isfinite(ref_lse)
    assert torch.equal(live, torch.isfinite(lse)) and (lse[live] - ref_lse[live]).abs().max() < 1e-4
    deq = (lambda x, s: dequantize_kv_ref(x, s[..., 0], dtype=torch.float32)) if fmt == "fp8" else \
        (lambda x, s: dequantize_int4_ref(x, s, dtype=torch.float32))
    plain, _ = paged_attention_ref(q, deq(kq, ks), deq(vq, vs), table, kv_len)
    assert _rel(ref, plain) < 1e-6
    exact, _ = paged_attention_ref(q, k, v, table, kv_len)  # and the format's own error stays small
    assert _rel(ref, exact) < (0.05 if fmt == "fp8" else 0.12)


def test_packed_pages_are_refused_without_their_scales():
    kq = torch.zeros(4, 8, 2, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="need k_scales of shape"):
        paged_attention(torch.randn(1, 1, 4, 64), kq, kq, torch.zeros(1, 2, dtype=torch.int32),
                        torch.ones(1, 1, dtype=torch.int32), kv_format="int4", backend="torch")
