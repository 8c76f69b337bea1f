"""The kernel tests again on CUDA, compiled (not interpreted), at sizes the interpreter cannot reach.

`make test` runs this suite in its own pytest process with TRITON_INTERPRET=0, so on a CUDA host it runs
natively; without a GPU it is skipped ("no CUDA"). Run by hand with TRITON_INTERPRET=1 set it is skipped too
(these check the compiled kernels). Run: TRITON_INTERPRET=0 python -m pytest -q tests/gpu/test_kernels_gpu.py

Each attention test records which path computed it (the Triton kernel, or PyTorch's cuDNN / flash SDPA op)
and asserts it: a backend that silently fell back would otherwise pass under its own name.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from ringserve.kernels import (
    decode_attention,
    decode_attention_ref,
    dequantize_kv,
    flash_attention,
    flash_attention_ref,
    merge_attention,
    merge_attention_ref,
    merge_attention_stack,
    merge_attention_stack_ref,
    quantize_kv,
    quantize_kv_ref,
)
from ringserve.kernels._common import interpreting

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"),
    pytest.mark.skipif(interpreting(), reason="TRITON_INTERPRET=1: the GPU tests check compiled kernels; run with TRITON_INTERPRET=0"),
]
DEV = "cuda"


def _rand(seed, *shapes, dtype=torch.float32):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return [torch.randn(*s, generator=g, device=DEV).to(dtype) for s in shapes]


def _seed(*case) -> int:
    return zlib.crc32(repr(case).encode())


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _check(out, lse, ref_out, ref_lse, tol):
    torch.cuda.synchronize()
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert (out[torch.isneginf(ref_lse)] == 0).all()
    assert _rel(out, ref_out) < tol
    live = torch.isfinite(ref_lse)
    if live.any():
        assert ((lse[live] - ref_lse[live]).abs() / (1 + ref_lse[live].abs())).max().item() < tol


ATTN_CASES = [
    # Tq, Tk, H, Hkv, D, causal, q_start, k_start
    (1000, 1000, 8, 8, 128, True, 0, 0),
    (777, 1333, 8, 2, 128, False, 0, 0),
    (1029, 517, 16, 2, 64, True, 600, 100),
    (300, 700, 8, 1, 128, True, 0, 200),  # first 200 rows see nothing
    (513, 513, 4, 1, 64, True, 0, 600),  # "none" block
    (129, 2000, 8, 2, 256, True, 1900, 0),
]


SDPA_OPS = {"cudnn": "_scaled_dot_product_cudnn_attention", "flash": "_scaled_dot_product_flash_attention"}


@pytest.fixture
def ran(monkeypatch):
    """The paths that computed attention during the test, in order: "triton" for a launch of the Triton
    kernel, "cudnn" / "flash" for a call of PyTorch's fused op."""
    from ringserve.kernels import attention

    calls: list[str] = []
    kernel = attention._attn_fwd_kernel

    class Launch:
        def __getitem__(self, grid):
            calls.append("triton")
            return kernel[grid]
    monkeypatch.setattr(attention, "_attn_fwd_kernel", Launch())
    for name, op in SDPA_OPS.items():
        if hasattr(torch.ops.aten, op):
            real = getattr(torch.ops.aten, op)

            def spy(*a, _real=real, _name=name, **kw):
                calls.append(_name)
                return _real(*a, **kw)
            monkeypatch.setattr(torch.ops.aten, op, spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Tq,Tk,H,Hkv,D,causal,q_start,k_start", ATTN_CASES)
def test_flash_attention_cuda(Tq, Tk, H, Hkv, D, causal, q_start, k_start, dtype, ran):
    q, k, v = _rand(_seed(Tq, Tk, H, Hkv, D, causal), (Tq, H, D), (Tk, Hkv, D), (Tk, Hkv, D), dtype=dtype)
    out, lse = flash_attention(q, k, v, causal=causal, q_start=q_start, k_start=k_start)
    assert ran == ["triton"]  # "auto" on CUDA is the Triton kernel
    ref_out, ref_lse = flash_attention_ref(q, k, v, causal=causal, q_start=q_start, k_start=k_start, out_dtype=torch.float32)
    assert out.dtype == dtype
    _check(out.float(), lse, ref_out, ref_lse, 1e-2)


def test_flash_attention_cuda_fp32_is_exact_ish():
    q, k, v = _rand(1, (333, 8, 64), (444, 2, 64), (444, 2, 64))
    out, lse = flash_attention(q, k, v, causal=True, q_start=200, k_start=0)
    ref_out, ref_lse = flash_attention_ref(q.double(), k.double(), v.double(), causal=True, q_start=200, k_start=0)
    _check(out, lse, ref_out, ref_lse, 1e-5)


# q (512, 8, 128) over k, v (640, 2, 128): which path each mask takes. The fused ops express full blocks and
# one causal alignment each (cuDNN top-left, q_start == k_start; flash bottom-right, q_start - k_start ==
# Tk - Tq = 128); any other mixed mask is computed by the Triton kernel; a block no query sees needs no kernel.
SDPA_CASES = [
    # backend, causal, q_start, k_start, path expected
    ("cudnn", False, 0, 0, "cudnn"),
    ("flash", False, 0, 0, "flash"),
    ("cudnn", True, 0, 0, "cudnn"),
    ("flash", True, 128, 0, "flash"),
    ("cudnn", True, 700, 0, "cudnn"),  # every key before every query: a full block
    ("flash", True, 700, 0, "flash"),
    ("cudnn", True, 128, 0, "triton"),  # flash's alignment, not cuDNN's
    ("flash", True, 0, 0, "triton"),  # cuDNN's alignment, not flash's
    ("cudnn", True, 100, 0, "triton"),
    ("flash", True, 100, 0, "triton"),
    ("cudnn", True, 0, 4096, "none"),  # every key after every query: zeros and -inf, nothing launched
    ("flash", True, 0, 4096, "none"),
]


@pytest.mark.parametrize("backend,causal,q_start,k_start,path", SDPA_CASES,
                         ids=[f"{b}-{'causal' if c else 'full'}-q{q}-k{k}-runs-{p}" for b, c, q, k, p in SDPA_CASES])
def test_sdpa_backends_with_lse(backend, causal, q_start, k_start, path, ran):
    if not hasattr(torch.ops.aten, SDPA_OPS[backend]):  # not in this torch build at all; an error of the op fails
        pytest.skip(f"torch {torch.__version__} has no aten.{SDPA_OPS[backend]}")
    q, k, v = _rand(_seed(backend, q_start), (512, 8, 128), (640, 2, 128), (640, 2, 128), dtype=torch.bfloat16)
    out, lse = flash_attention(q, k, v, causal=causal, q_start=q_start, k_start=k_start, backend=backend)
    assert ran == ([] if path == "none" else [path]), ran
    ref_out, ref_lse = flash_attention_ref(q, k, v, causal=causal, q_start=q_start, k_start=k_start, out_dtype=torch.float32)
    _check(out.float(), lse, ref_out, ref_lse, 1e-2)
    if path == "none":
        assert torch.isneginf(lse).all() and (out == 0).all()


@pytest.mark.parametrize("n_blocks", [2, 3, 8])
def test_split_merge_equals_unsplit_cuda(n_blocks):
    q, k, v = _rand(n_blocks, (300, 8, 64), (1001, 2, 64), (1001, 2, 64))
    ref_out, ref_lse = flash_attention_ref(q.double(), k.double(), v.double(), causal=True, q_start=700)
    bounds = torch.linspace(0, 1001, n_blocks + 1).round().long().tolist()
    parts = [flash_attention(q, k[a:b], v[a:b], causal=True, q_start=700, k_start=a) for a, b in zip(bounds[:-1], bounds[1:])]
    for (a, b), (o, l) in zip(zip(bounds[:-1], bounds[1:]), parts):
        _check(o, l, *flash_attention_ref(q.double(), k[a:b].double(), v[a:b].double(), causal=True, q_start=700, k_start=a), 1e-5)
    out, lse = parts[0][0].clone(), parts[0][1].clone()
    for o, l in parts[1:]:
        merge_attention(out, lse, o, l)
    s_out, s_lse = merge_attention_stack([p[0] for p in parts], [p[1] for p in parts])
    for o, l in ((out, lse), (s_out, s_lse)):
        _check(o, l, ref_out, ref_lse, 1e-5)


DECODE_CASES = [
    # Tq, Tk, H, Hkv, kv_dtype, q_start, kv_len
    (1, 100_003, 32, 8, torch.bfloat16, None, None),
    (1, 65_537, 8, 8, torch.bfloat16, None, 60_000),
    (4, 50_000, 32, 4, torch.bfloat16, 49_996, None),
    (16, 20_000, 16, 2, torch.bfloat16, 19_990, None),  # last 6 queries' own tokens not in the cache
    (1, 100_003, 32, 8, torch.int8, None, None),
    (3, 30_001, 32, 4, torch.int8, 29_000, 29_500),
    (1, 100_003, 32, 8, torch.float8_e4m3fn, None, None),
    (8, 4_000, 64, 8, torch.float8_e4m3fn, 3_000, None),
]


@pytest.mark.parametrize("Tq,Tk,H,Hkv,kv_dtype,q_start,kv_len", DECODE_CASES)
def test_decode_cuda(Tq, Tk, H, Hkv, kv_dtype, q_start, kv_len):
    q, k, v = _rand(_seed(Tq, Tk, H, Hkv, kv_dtype), (Tq, H, 128), (Tk, Hkv, 128), (Tk, Hkv, 128), dtype=torch.bfloat16)
    ks = vs = None
    if kv_dtype != torch.bfloat16:
        k, ks = quantize_kv(k, dtype=kv_dtype)
        v, vs = quantize_kv(v, dtype=kv_dtype)
    out, lse = decode_attention(q, k, v, k_scale=ks, v_scale=vs, q_start=q_start, kv_len=kv_len)
    ref_out, ref_lse = decode_attention_ref(q, k, v, k_scale=ks, v_scale=vs, q_start=q_start, kv_len=kv_len, out_dtype=torch.float32)
    _check(out.float(), lse, ref_out, ref_lse, 1e-2)


def test_merge_cuda():
    g = torch.Generator(device=DEV).manual_seed(5)
    outs = torch.randn(6, 999, 8, 128, generator=g, device=DEV)
    lses = torch.randn(6, 999, 8, generator=g, device=DEV) * 30
    lses[:, :3] = float("-inf")
    lses[0, 3:9] = float("-inf")
    a, la = merge_attention(outs[0].clone(), lses[0].clone(), outs[1], lses[1])
    ra, rla = merge_attention_ref(outs[0].clone(), lses[0].clone(), outs[1], lses[1])
    _check(a, la, ra, rla, 1e-6)
    s, ls = merge_attention_stack(outs, lses)
    rs, rls = merge_attention_stack_ref(outs, lses)
    _check(s, ls, rs, rls, 1e-6)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_quant_cuda(dtype):
    (x,) = _rand(9, (4097, 8, 128), dtype=torch.bfloat16)
    x[7, 3] = 0
    q, s = quantize_kv(x, dtype=dtype)
    rq, rs = quantize_kv_ref(x, dtype=dtype)
    torch.cuda.synchronize()
    assert torch.equal(s, rs)
    if dtype == torch.int8:
        assert torch.equal(q, rq)
    else:  # hardware fp8 rounding: allow a rare 1-ulp difference
        assert (q.float() != rq.float()).float().mean().item() < 1e-3
    y = dequantize_kv(q, s, dtype=torch.float32)
    assert torch.equal(y, q.float() * s[..., None])
