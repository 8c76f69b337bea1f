"""decode_attention (split-KV Triton kernel, through the CPU interpreter) against decode_attention_ref."""

from __future__ import annotations

import zlib

import pytest
import torch

from ringserve.kernels import (
    decode_attention,
    decode_attention_ref,
    flash_attention_ref,
    quantize_kv,
    quantize_kv_ref,
)
from helpers import needs_triton
from ringserve.kernels._common import HAS_TRITON, interpreting



def _rand(seed, *shapes, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(dtype) for s in shapes]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _kv(seed, Tk, Hkv, kv_dtype):
    k, v = _rand(seed, (Tk, Hkv, 64), (Tk, Hkv, 64))
    if kv_dtype in (torch.int8, torch.float8_e4m3fn):
        k, ks = quantize_kv_ref(k, dtype=kv_dtype)
        v, vs = quantize_kv_ref(v, dtype=kv_dtype)
        return k, v, ks, vs
    return k.to(kv_dtype), v.to(kv_dtype), None, None


# (Tq, Tk, H, Hkv, kv_dtype, q_start, k_start, kv_len, num_splits)
CASES = [
    pytest.param(1, 70, 4, 4, torch.float32, None, 0, None, None, id="decode-gqa1-auto-splits"),
    pytest.param(1, 67, 8, 2, torch.float32, None, 0, 50, 3, id="gqa4-kv_len-3splits"),
    pytest.param(3, 61, 8, 1, torch.float32, 60, 2, None, 4, id="append3-causal-gqa8"),
    pytest.param(16, 45, 2, 2, torch.float32, 28, 0, None, 2, id="append16-causal-edge"),
    pytest.param(4, 40, 4, 1, torch.float32, 0, 2, None, 2, id="first-rows-fully-masked"),
    pytest.param(5, 57, 8, 2, torch.int8, None, 0, None, 3, id="int8-gqa4"),
    pytest.param(2, 49, 8, 1, torch.int8, 40, 0, 45, 5, id="int8-causal-kv_len-gqa8"),
    pytest.param(1, 33, 4, 2, torch.float8_e4m3fn, None, 0, None, 1, id="fp8-one-split"),
    pytest.param(3, 38, 4, 1, torch.bfloat16, None, 0, None, 2, id="bf16"),
]


@needs_triton
@pytest.mark.parametrize("Tq,Tk,H,Hkv,kv_dtype,q_start,k_start,kv_len,num_splits", CASES)
def test_decode_matches_reference(Tq, Tk, H, Hkv, kv_dtype, q_start, k_start, kv_len, num_splits):
    seed = zlib.crc32(repr((Tq, Tk, H, Hkv, kv_dtype, q_start, k_start, kv_len)).encode())
    (q,) = _rand(seed + 1, (Tq, H, 64))
    q = q.to(torch.bfloat16) if kv_dtype == torch.bfloat16 else q
    k, v, ks, vs = _kv(seed, Tk, Hkv, kv_dtype)
    out, lse = decode_attention(q, k, v, k_scale=ks, v_scale=vs, kv_len=kv_len, q_start=q_start, k_start=k_start,
                                num_splits=num_splits, backend="triton")
    ref_out, ref_lse = decode_attention_ref(q, k, v, k_scale=ks, v_scale=vs, kv_len=kv_len, q_start=q_start,
                                            k_start=k_start, out_dtype=torch.float32)
    assert out.shape == (Tq, H, 64) and out.dtype == q.dtype and lse.dtype == torch.float32
    tol = 1e-2 if q.dtype == torch.bfloat16 else 1e-5
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert (out[torch.isneginf(ref_lse)] == 0).all()
    assert _rel(out, ref_out) < tol
    live = torch.isfinite(ref_lse)
    assert (lse[live] - ref_lse[live]).abs().max().item() < 10 * tol


@needs_triton
def test_decode_int8_is_close_to_full_precision():
    """Quantization error itself stays small: int8 KV decode vs fp32 attention on the originals."""
    q, k, v = _rand(3, (2, 4, 64), (70, 2, 64), (70, 2, 64))
    kq, ks = quantize_kv(k, backend="triton")
    vq, vs = quantize_kv(v, backend="triton")
    out, lse = decode_attention(q, kq, vq, k_scale=ks, v_scale=vs, backend="triton")
    ref_out, ref_lse = flash_attention_ref(q, k, v, causal=False)
    assert _rel(out, ref_out) < 2e-2
    assert (lse - ref_lse).abs().max().item() < 5e-2


@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_reference_ignores_splits_and_equals_attention(num_splits):
    q, k, v = _rand(9, (3, 4, 32), (20, 2, 32), (20, 2, 32))
    out, lse = decode_attention(q, k, v, q_start=17, num_splits=num_splits, backend="torch")
    ref_out, ref_lse = flash_attention_ref(q, k, v, causal=True, q_start=17)
    assert torch.allclose(out, ref_out, atol=1e-6) and torch.allclose(lse, ref_lse, atol=1e-6)


def test_all_keys_masked_gives_zero_and_neg_inf():
    q, k, v = _rand(2, (2, 4, 64), (9, 2, 64), (9, 2, 64))
    backend = "triton" if HAS_TRITON and interpreting() else "torch"
    out, lse = decode_attention(q, k, v, q_start=0, k_start=5, backend=backend)
    assert (out == 0).all() and torch.isneginf(lse).all()
    out, lse = decode_attention(q, k, v, kv_len=0, backend=backend)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_errors_say_how_to_fix():
    q, k, v = _rand(1, (17, 4, 64), (9, 2, 64), (9, 2, 64))
    with pytest.raises(ValueError, match="use flash_attention"):
        decode_attention(q, k, v)
    q = q[:2]
    kq, ks = quantize_kv_ref(k)
    vq, vs = quantize_kv_ref(v)
    with pytest.raises(ValueError, match="pass k_scale and v_scale"):
        decode_attention(q, kq, vq)
    with pytest.raises(ValueError, match=r"one scale per token and KV head"):
        decode_attention(q, kq, vq, k_scale=ks[:, :1], v_scale=vs)
    with pytest.raises(TypeError, match="float32"):
        decode_attention(q, kq, vq, k_scale=ks.half(), v_scale=vs)
    with pytest.raises(ValueError, match="only for 8-bit"):
        decode_attention(q, k, v, k_scale=ks, v_scale=vs)
    with pytest.raises(ValueError, match="kv_len"):
        decode_attention(q, k, v, kv_len=10)
    with pytest.raises(TypeError, match="same dtype"):
        decode_attention(q.half(), k, v)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        decode_attention(q[:, :3], k, v)
