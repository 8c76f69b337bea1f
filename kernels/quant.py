"""8-bit KV: the storage format shared by split-KV decode and the tier moves.

Format (version 1). A K or V tensor x of shape (T, Hkv, D) — or any (..., D) — is stored as

    q      same shape as x, dtype int8 (portable) or float8_e4m3fn (GPU decode only)
    scale  x.shape[:-1], i.e. (T, Hkv): float32, one scale per (token, head) row of D values
    x ≈ q.float() * scale[..., None]

  * symmetric, no zero point; per-token-per-head, so appending a token never rescales older ones;
  * int8:  scale = amax / 127,  q = clamp(round(x * (127 / amax)), -127, 127); -128 is never produced;
  * fp8:   scale = amax / 448,  q = float8_e4m3fn(x * (448 / amax)), round to nearest even, saturating;
  * round() is round-to-nearest with ties away from zero: sign(y) * floor(|y| + 0.5);
  * amax = max |x| over the row, computed in float32; an all-zero row has scale 0 and q 0;
  * 127 / amax and amax / 127 are IEEE float32 divisions, so the Triton kernel and the torch twin
    produce the same bits for int8 (fp8 conversion rounding is the hardware's).

Bytes per token per KV head: D + 4 (int8 + scale) against 2 * D in bf16: 1.94x fewer at D = 128.
"""

from __future__ import annotations

import torch

from ._common import KV8_DTYPES, check_float, interpreting, resolve_backend, tl, triton

INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0


@triton.jit
def _quantize_kernel(
    X, Q, SCALE,
    N, D,
    BLOCK_R: tl.constexpr,  # rows (token, head) per program
    BLOCK_D: tl.constexpr,  # next power of two >= D
    FP8: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    ok = (rows < N)[:, None] & (cols < D)[None, :]
    x = tl.load(X + rows[:, None] * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), 1)
    zero = amax == 0.0
    amax_safe = tl.where(zero, 1.0, amax)
    if FP8:
        inv = tl.math.div_rn(tl.full([BLOCK_R], 448.0, tl.float32), amax_safe)
        scale = tl.math.div_rn(amax, tl.full([BLOCK_R], 448.0, tl.float32))
        y = tl.minimum(tl.maximum(x * inv[:, None], -448.0), 448.0)
        q = y.to(tl.float8e4nv)
    else:
        inv = tl.math.div_rn(tl.full([BLOCK_R], 127.0, tl.float32), amax_safe)
        scale = tl.math.div_rn(amax, tl.full([BLOCK_R], 127.0, tl.float32))
        y = x * inv[:, None]
        r = tl.floor(tl.abs(y) + 0.5)
        r = tl.minimum(r, 127.0)
        q = tl.where(y < 0, -r, r).to(tl.int8)
    tl.store(Q + rows[:, None] * D + cols[None, :], q, mask=ok)
    tl.store(SCALE + rows, tl.where(zero, 0.0, scale), mask=rows < N)


@triton.jit
def _dequantize_kernel(
    Q, SCALE, X,
    N, D,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    ok = (rows < N)[:, None] & (cols < D)[None, :]
    q = tl.load(Q + rows[:, None] * D + cols[None, :], mask=ok).to(tl.float32)  # masked lanes are never stored
    s = tl.load(SCALE + rows, mask=rows < N, other=0.0).to(tl.float32)
    tl.store(X + rows[:, None] * D + cols[None, :], (q * s[:, None]).to(X.dtype.element_ty), mask=ok)


def _check_kv8_dtype(dtype: torch.dtype) -> None:
    if dtype not in KV8_DTYPES:
        raise TypeError(f"8-bit KV dtype must be torch.int8 or torch.float8_e4m3fn, got {dtype}")


def _rows_config(D: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(D)
    block_r = 16 if interpreting() else max(1, min(64, 8192 // block_d))
    return block_r, block_d


def quantize_kv(x: torch.Tensor, *, dtype: torch.dtype = torch.int8, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) float -> (q (..., D) int8 | float8_e4m3fn, scale (...) float32). See the module docstring."""
    check_float("x", x)
    _check_kv8_dtype(dtype)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last (D) dimension, got shape {tuple(x.shape)}")
    backend = resolve_backend(backend, x.device)
    if backend == "triton" and dtype == torch.float8_e4m3fn and x.device.type != "cuda":
        raise RuntimeError("fp8 quantization in Triton runs on CUDA only (the CPU interpreter rounds fp8 differently); pass backend='torch'")
    if backend == "torch":
        return quantize_kv_ref(x, dtype=dtype)
    D = x.shape[-1]
    xc = x.contiguous()
    q = torch.empty(x.shape, dtype=dtype, device=x.device)
    scale = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    N = xc.numel() // D
    if N:
        block_r, block_d = _rows_config(D)
        _quantize_kernel[(triton.cdiv(N, block_r),)](xc, q, scale, N, D, BLOCK_R=block_r, BLOCK_D=block_d, FP8=dtype == torch.float8_e4m3fn, num_warps=4)
    return q, scale


def quantize_kv_ref(x: torch.Tensor, *, dtype: torch.dtype = torch.int8, backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of quantize_kv (`backend` is ignored)."""
    check_float("x", x)
    _check_kv8_dtype(dtype)
    xf = x.float()
    amax = xf.abs().amax(dim=-1)  # (...)
    zero = amax == 0
    qmax = FP8_E4M3_MAX if dtype == torch.float8_e4m3fn else INT8_MAX
    qmax_t = torch.full_like(amax, qmax)  # tensor / tensor: torch turns "/ scalar" into "* (1/scalar)" on CUDA
    inv = qmax_t / amax.masked_fill(zero, 1.0)
    scale = (amax / qmax_t).masked_fill(zero, 0.0)
    y = xf * inv[..., None]
    if dtype == torch.float8_e4m3fn:
        q = y.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    else:
        q = (torch.sign(y) * torch.floor(y.abs() + 0.5).clamp(max=INT8_MAX)).to(torch.int8)
    return q, scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, *, dtype: torch.dtype = torch.bfloat16, backend: str = "auto") -> torch.Tensor:
    """(q (..., D), scale (...)) -> x (..., D) in `dtype`."""
    _check_dequant(q, scale, dtype)
    backend = resolve_backend(backend, q.device)
    if backend == "torch":
        return dequantize_kv_ref(q, scale, dtype=dtype)
    D = q.shape[-1]
    qc, sc = q.contiguous(), scale.contiguous()
    x = torch.empty(q.shape, dtype=dtype, device=q.device)
    N = qc.numel() // D
    if N:
        block_r, block_d = _rows_config(D)
        _dequantize_kernel[(triton.cdiv(N, block_r),)](qc, sc, x, N, D, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    return x


def dequantize_kv_ref(q: torch.Tensor, scale: torch.Tensor, *, dtype: torch.dtype = torch.bfloat16, backend: str = "torch") -> torch.Tensor:
    """Torch twin of dequantize_kv (`backend` is ignored)."""
    _check_dequant(q, scale, dtype)
    return (q.float() * scale.float()[..., None]).to(dtype)


def _check_dequant(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
    _check_kv8_dtype(q.dtype)
    check_float("scale", scale)
    check_float("dtype", torch.empty(0, dtype=dtype))
    if tuple(scale.shape) != tuple(q.shape[:-1]):
        raise ValueError(f"scale{tuple(scale.shape)} must have q's shape without the last dim, {tuple(q.shape[:-1])}")
    if q.device != scale.device:
        raise ValueError(f"q ({q.device}) and scale ({scale.device}) must be on the same device")




# --------------------------------------------------------------------------------------------- int4
#
# 4-bit KV (format "int4" of retained sessions): x (..., D) is stored as
#     q       (..., D / 2) uint8: channel c < D/2 in the low nibble of byte c, channel c >= D/2 in the high
#             nibble of byte c - D/2 (so a kernel dequantizes the two halves as two dot products)
#     params  (..., 4) float16: scale and minimum of the low half, then of the high half
#     x[c] ≈ nibble * scale + minimum of c's half;  scale = (max - min) / 15 of the half, in fp16
# Asymmetric per (token, head, half of the channels): KIVI-style groups of D / 2 (32-128) channels.

INT4_LEVELS = 15.0


def quantize_int4_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) -> (q (..., D/2) uint8, params (..., 4) float16)."""
    check_float("x", x)
    D = x.shape[-1]
    if D % 2:
        raise ValueError(f"int4 KV needs an even head dim, got {D}")
    xf = x.float()
    halves, params = [], []
    for part in (xf[..., : D // 2], xf[..., D // 2:]):
        lo, hi = part.amin(-1), part.amax(-1)
        scale = ((hi - lo) / INT4_LEVELS).to(torch.float16)
        zero = lo.to(torch.float16)
        s32, z32 = scale.float(), zero.float()  # quantize against the stored (fp16) values
        y = torch.where(s32[..., None] > 0, (part - z32[..., None]) / s32.clamp_min(1e-30)[..., None],
                        torch.zeros_like(part))
        halves.append(torch.floor(y + 0.5).clamp(0, INT4_LEVELS).to(torch.uint8))
        params += [scale, zero]
    return halves[0] | (halves[1] << 4), torch.stack(params, -1)


def dequantize_int4_ref(q: torch.Tensor, params: torch.Tensor, *, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(q (..., D/2) uint8, params (..., 4) float16) -> x (..., D) in `dtype`."""
    if q.dtype != torch.uint8 or tuple(params.shape) != tuple(q.shape[:-1]) + (4,):
        raise ValueError(f"expected q (..., D/2) uint8 and params (..., 4); got {q.dtype} {tuple(q.shape)} and "
                         f"{tuple(params.shape)}")
    p = params.float()
    lo = (q & 15).float() * p[..., 0:1] + p[..., 1:2]
    hi = (q >> 4).float() * p[..., 2:3] + p[..., 3:4]
    return torch.cat([lo, hi], -1).to(dtype)
