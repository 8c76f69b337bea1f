"""merge_attention / merge_attention_stack and the 8-bit KV format, Triton (interpreter) vs torch."""

from __future__ import annotations

import pytest
import torch

from ringserve.kernels import (
    dequantize_kv,
    dequantize_kv_ref,
    merge_attention,
    merge_attention_ref,
    merge_attention_stack,
    merge_attention_stack_ref,
    quantize_kv,
    quantize_kv_ref,
)
from helpers import needs_triton
from ringserve.kernels._common import HAS_TRITON, interpreting

BACKENDS = [pytest.param("triton", marks=needs_triton), "torch"]
NEG_INF = float("-inf")


def _partials(seed, S, T, H, D, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    outs = torch.randn(S, T, H, D, generator=g)
    lses = torch.randn(S, T, H, generator=g) * spread
    lses[:, 0] = NEG_INF  # a row no partial saw
    lses[0, 1] = NEG_INF  # a row one partial did not see
    lses[-1, 2] = NEG_INF
    outs[0, 1] = float("nan")  # an empty partial's out must not be read
    return outs, lses


def _merge64(outs, lses):
    """float64 ground truth: softmax weights over the partials."""
    lse = torch.logsumexp(lses.double(), 0)
    w = torch.exp(lses.double() - lse.nan_to_num(neginf=0.0)[None])
    o = outs.double().masked_fill(torch.isneginf(lses)[..., None], 0.0)
    return (w[..., None] * o).sum(0), lse


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spread", [1.0, 80.0])  # 80: exp(lse) would overflow fp32 in a naive merge
def test_merge_pair_in_place(backend, spread):
    outs, lses = _partials(21, 2, 13, 3, 64, spread)
    out_a, lse_a = outs[0].clone(), lses[0].clone()
    ret = merge_attention(out_a, lse_a, outs[1], lses[1], backend=backend)
    assert ret[0] is out_a and ret[1] is lse_a  # in place
    ref_out, ref_lse = _merge64(outs, lses)
    assert not out_a.isnan().any() and not lse_a.isnan().any()
    assert (out_a[0] == 0).all() and torch.isneginf(lse_a[0]).all()
    assert torch.allclose(out_a.double(), ref_out, atol=1e-6, rtol=1e-5)
    assert torch.equal(torch.isneginf(lse_a), torch.isneginf(ref_lse))
    live = torch.isfinite(ref_lse)
    assert torch.allclose(lse_a[live].double(), ref_lse[live], atol=1e-5, rtol=1e-6)


@needs_triton
def test_merge_pair_triton_equals_ref_bf16_out_and_2d():
    outs, lses = _partials(5, 2, 9, 4, 64)
    a = outs[0].bfloat16().reshape(36, 64)
    la = lses[0].reshape(36)
    b, lb = outs[1].reshape(36, 64), lses[1].reshape(36)
    ra, rla = merge_attention_ref(a.clone(), la.clone(), b, lb)
    ta, tla = merge_attention(a.clone(), la.clone(), b, lb, backend="triton")
    assert ta.dtype == torch.bfloat16 and ta.shape == (36, 64)
    assert torch.allclose(ta.float(), ra.float(), atol=1e-2, rtol=1e-2)  # 1 bf16 ulp
    assert torch.equal(torch.isneginf(tla), torch.isneginf(rla))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("S", [1, 2, 5, 9])
def test_merge_stack(backend, S):
    outs, lses = _partials(40 + S, S, 7, 3, 64, spread=40.0)
    out, lse = merge_attention_stack(outs, lses, backend=backend)
    ref_out, ref_lse = _merge64(outs, lses)
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.allclose(out.double(), ref_out, atol=1e-6, rtol=1e-5)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    live = torch.isfinite(ref_lse)
    assert torch.allclose(lse[live].double(), ref_lse[live], atol=1e-5, rtol=1e-6)
    if backend == "torch":
        r_out, r_lse = merge_attention_stack_ref(list(outs), list(lses))
        assert torch.equal(r_out.nan_to_num(), out.nan_to_num())


def test_merge_errors():
    outs, lses = _partials(1, 2, 4, 2, 64)
    with pytest.raises(TypeError, match="float32"):
        merge_attention(outs[0], lses[0].half(), outs[1], lses[1])
    with pytest.raises(ValueError, match="do not match"):
        merge_attention(outs[0], lses[0][:, :1], outs[1], lses[1])
    with pytest.raises(ValueError, match="same shape"):
        merge_attention(outs[0], lses[0], outs[1][:2], lses[1][:2])
    with pytest.raises(ValueError, match=r"\(S, T, H, D\)"):
        merge_attention_stack(outs[0], lses[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_int8_format(backend):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(11, 3, 64, generator=g) * torch.logspace(-3, 2, 11)[:, None, None]
    x[0, 1] = 0.0  # an all-zero row
    q, scale = quantize_kv(x, backend=backend)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (11, 3)
    assert q.abs().max() <= 127 and (q[0, 1] == 0).all() and scale[0, 1] == 0
    amax = x.abs().amax(-1)
    assert torch.equal(scale, amax / 127)
    assert (q.abs().amax(-1)[amax > 0] == 127).all()  # the largest element maps to +-127
    err = (q.float() * scale[..., None] - x).abs()
    assert (err <= scale[..., None] / 2 * (1 + 1e-5) + 1e-30).all()  # round to nearest
    rq, rs = quantize_kv_ref(x)
    assert torch.equal(q, rq) and torch.equal(scale, rs)  # bit-exact twin
    y = dequantize_kv(q, scale, dtype=torch.float32, backend=backend)
    assert y.dtype == torch.float32 and torch.equal(y, dequantize_kv_ref(q, scale, dtype=torch.float32))
    y = dequantize_kv(q, scale, dtype=torch.bfloat16, backend=backend)
    # the CPU interpreter rounds fp32 -> bf16 toward zero, the GPU and torch to nearest: 1 ulp apart
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), dequantize_kv_ref(q, scale, dtype=torch.bfloat16).float(), rtol=2**-7, atol=0)


def test_quantize_fp8_reference_format():
    x = torch.randn(9, 2, 64, generator=torch.Generator().manual_seed(4)) * 5
    q, scale = quantize_kv(x, dtype=torch.float8_e4m3fn, backend="torch")
    assert q.dtype == torch.float8_e4m3fn and torch.equal(scale, x.abs().amax(-1) / 448)
    y = dequantize_kv(q, scale, dtype=torch.float32)
    assert ((y - x).abs() <= x.abs().amax(-1, keepdim=True) * 2**-4).all()  # e4m3: 3 mantissa bits
    if HAS_TRITON and interpreting():
        with pytest.raises(RuntimeError, match="CUDA only"):
            quantize_kv(x, dtype=torch.float8_e4m3fn, backend="triton")


def test_quant_errors():
    x = torch.randn(3, 2, 8)
    with pytest.raises(TypeError, match="int8 or torch.float8_e4m3fn"):
        quantize_kv(x, dtype=torch.int16)
    with pytest.raises(TypeError, match="dtype"):
        quantize_kv(x.to(torch.int32))
    q, s = quantize_kv(x, backend="torch")
    with pytest.raises(ValueError, match="without the last dim"):
        dequantize_kv(q, s[:, :1])
    with pytest.raises(TypeError, match="int8 or torch.float8_e4m3fn"):
        dequantize_kv(q.float(), s)
