"""flash_attention (Triton, through the CPU interpreter) against flash_attention_ref.

Run with TRITON_INTERPRET=1 (the Makefile sets it) so the Triton kernel itself executes on the CPU;
without it the Triton cases are skipped and only the reference / error paths run. Shapes are tiny on
purpose: the interpreter runs each program in numpy.
"""

from __future__ import annotations

import subprocess
import sys
import zlib

import pytest
import torch

from ringserve.kernels import (
    flash_attention,
    flash_attention_ref,
    merge_attention,
    merge_attention_stack,
)
from helpers import needs_triton
from ringserve.kernels._common import HAS_TRITON, interpreting



def _rand(seed: int, *shapes, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(dtype) for s in shapes]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _assert_close(out, lse, ref_out, ref_lse, tol):
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "fully-masked rows differ"
    assert _rel(out, ref_out) < tol
    live = torch.isfinite(ref_lse)
    if live.any():
        assert (lse[live] - ref_lse[live]).abs().max().item() < tol * 10
    # rows that see no key: out exactly 0
    assert (out[torch.isneginf(ref_lse)] == 0).all()


# (Tq, Tk, H, Hkv, causal, q_start, k_start): GQA 1 / 4 / 8, odd lengths, every kind of causal block
CASES = [
    pytest.param(37, 53, 2, 2, False, 0, 0, id="full-nocausal-gqa1"),
    pytest.param(41, 41, 4, 1, True, 0, 0, id="diagonal-gqa4"),
    pytest.param(33, 47, 8, 1, True, 100, 0, id="causal-but-all-visible-gqa8"),
    pytest.param(29, 35, 4, 1, True, 0, 64, id="none-all-masked"),
    pytest.param(45, 30, 8, 1, True, 20, 7, id="offset-partial-gqa8"),
    pytest.param(31, 50, 4, 1, True, 0, 9, id="first-rows-fully-masked"),
    pytest.param(17, 70, 2, 1, True, 40, 0, id="tq-lt-tk-bottom-right"),
    pytest.param(1, 19, 8, 2, True, 18, 0, id="single-query"),
]


@needs_triton
@pytest.mark.parametrize("Tq,Tk,H,Hkv,causal,q_start,k_start", CASES)
def test_flash_attention_matches_reference(Tq, Tk, H, Hkv, causal, q_start, k_start):
    seed = zlib.crc32(repr((Tq, Tk, H, Hkv, causal, q_start, k_start)).encode())
    q, k, v = _rand(seed, (Tq, H, 64), (Tk, Hkv, 64), (Tk, Hkv, 64))
    out, lse = flash_attention(q, k, v, causal=causal, q_start=q_start, k_start=k_start, backend="triton")
    ref_out, ref_lse = flash_attention_ref(q.double(), k.double(), v.double(), causal=causal, q_start=q_start, k_start=k_start)
    assert out.shape == (Tq, H, 64) and lse.shape == (Tq, H) and lse.dtype == torch.float32
    _assert_close(out, lse, ref_out, ref_lse, 1e-5)


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_flash_attention_half_precision(dtype, tol):
    q, k, v = _rand(7, (23, 4, 64), (39, 1, 64), (39, 1, 64), dtype=dtype)
    out, lse = flash_attention(q, k, v, causal=True, q_start=10, k_start=0, scale=0.1, backend="triton")
    assert out.dtype == dtype
    ref_out, ref_lse = flash_attention_ref(q, k, v, causal=True, q_start=10, k_start=0, scale=0.1, out_dtype=torch.float32)
    _assert_close(out.float(), lse, ref_out, ref_lse, tol)


@needs_triton
def test_flash_attention_fp32_output_and_strided_inputs():
    q, kv = _rand(3, (19, 4, 64), (27, 2, 2, 64))  # k and v are strided views into one buffer
    k, v = kv[:, 0], kv[:, 1]
    out, lse = flash_attention(q.half(), k.half(), v.half(), causal=False, out_dtype=torch.float32, backend="triton")
    assert out.dtype == torch.float32
    ref_out, ref_lse = flash_attention_ref(q.half(), k.half(), v.half(), causal=False, out_dtype=torch.float32)
    _assert_close(out, lse, ref_out, ref_lse, 2e-3)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_torch_backend_is_the_reference(backend):
    q, k, v = _rand(11, (9, 4, 32), (13, 2, 32), (13, 2, 32))
    out, lse = flash_attention(q, k, v, causal=True, q_start=3, k_start=2, backend=backend)
    ref_out, ref_lse = flash_attention_ref(q, k, v, causal=True, q_start=3, k_start=2)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


def test_reference_chunking_matches_one_shot(monkeypatch):
    """The reference bounds its memory by chunking queries; chunks must not change the result."""
    from ringserve.kernels import attention

    q, k, v = _rand(5, (40, 2, 16), (40, 2, 16), (40, 2, 16))
    monkeypatch.setattr(attention, "REF_CHUNK_SCORES", 2 * 40 * 7)  # chunks of 7 queries
    out, lse = flash_attention_ref(q, k, v, causal=True)
    s = torch.einsum("qhd,khd->hqk", q, k) * 16**-0.5
    s = s.masked_fill(torch.ones(40, 40, dtype=torch.bool).triu(1), float("-inf"))
    assert torch.allclose(lse, torch.logsumexp(s, -1).T, atol=1e-5)
    assert torch.allclose(out, torch.einsum("hqk,khd->qhd", s.softmax(-1), v), atol=1e-5)


def _merge_splits(q, k, v, n_blocks, causal, backend, q_start):
    """Attention over keys cut into n_blocks uneven blocks, merged pairwise and stacked."""
    Tk = k.shape[0]
    bounds = torch.linspace(0, Tk, n_blocks + 1).round().long().tolist()
    parts = [
        flash_attention(q, k[a:b], v[a:b], causal=causal, q_start=q_start, k_start=a, out_dtype=torch.float32, backend=backend)
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    out, lse = parts[0][0].clone(), parts[0][1].clone()
    for o, l in parts[1:]:
        merge_attention(out, lse, o, l, backend=backend)
    stacked = merge_attention_stack([p[0] for p in parts], [p[1] for p in parts], backend=backend)
    return (out, lse), stacked


@pytest.mark.parametrize("n_blocks", [2, 3, 8])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
def test_split_then_merge_equals_unsplit(n_blocks, causal, backend):
    q, k, v = _rand(100 + n_blocks, (21, 8, 64), (61, 2, 64), (61, 2, 64))
    q_start = 30 if causal else 0  # queries at 30..50: some key blocks full, some diagonal, some none
    ref_out, ref_lse = flash_attention_ref(q.double(), k.double(), v.double(), causal=causal, q_start=q_start)
    (out, lse), (s_out, s_lse) = _merge_splits(q, k, v, n_blocks, causal, backend, q_start)
    for o, l in ((out, lse), (s_out, s_lse)):
        assert _rel(o, ref_out) < 1e-5
        assert (l - ref_lse).abs().max().item() < 1e-5


def test_errors_say_how_to_fix():
    q, k, v = _rand(1, (4, 6, 64), (5, 4, 64), (5, 4, 64))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        flash_attention(q, k, v, causal=False)
    q, k, v = _rand(1, (4, 4, 64), (5, 2, 64), (5, 2, 64))
    with pytest.raises(TypeError, match="dtype"):
        flash_attention(q.to(torch.int32), k, v, causal=False)
    with pytest.raises(TypeError, match="same dtype"):
        flash_attention(q.half(), k, v, causal=False)
    with pytest.raises(ValueError, match=r"\(Tq, H, D\)"):
        flash_attention(q[None], k, v, causal=False)
    with pytest.raises(ValueError, match="head dim"):
        flash_attention(q, k[..., :32], v[..., :32], causal=False)
    with pytest.raises(ValueError, match="backend="):
        flash_attention(q, k, v, causal=False, backend="cuda")
    q, k, v = _rand(1, (4, 4, 48), (5, 2, 48), (5, 2, 48))
    if HAS_TRITON and interpreting():
        with pytest.raises(ValueError, match="backend='torch'"):
            flash_attention(q, k, v, causal=False, backend="triton")
    flash_attention(q, k, v, causal=False, backend="torch")  # any D works in the reference
    if not interpreting():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            flash_attention(q, k, v, causal=False, backend="triton")


def test_import_without_triton_falls_back_to_reference():
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch, ringserve.kernels as K\n"
        "assert not K.HAS_TRITON\n"
        "q = torch.randn(3, 2, 64); o, l = K.flash_attention(q, q, q, causal=True)\n"
        "assert o.shape == (3, 2, 64) and l.shape == (3, 2)\n"
        "o, l = K.decode_attention(q[:1], q, q)\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
