"""Split-KV ("flash-decoding") attention: a few query tokens against a long KV cache.

    decode_attention(q, k, v, *, k_scale=None, v_scale=None, kv_len=None, q_start=None, k_start=0,
                     scale=None, num_splits=None) -> (out, lse)

    q        (Tq, H, D), 1 <= Tq <= 16 (a decode step, a speculative / multi-token append)
    k, v     (Tk, Hkv, D): bf16 / fp16 / fp32, or 8-bit (int8, float8_e4m3fn) with
    k_scale, v_scale (Tk, Hkv) float32 per-token-per-head scales (format: ringserve.kernels.quant)
    kv_len   keys [0, kv_len) are attended (default Tk): a preallocated cache need not be sliced
    q_start  None: every key is visible to every query (a decode step after the cache is complete).
             An int: query i sits at absolute position q_start + i and sees key j iff
             k_start + j <= q_start + i (multi-token append with its own tokens already in the cache).
    out      (Tq, H, D) in q.dtype (or out_dtype), lse (Tq, H) float32, natural log; rows that see no
             key give out = 0, lse = -inf, so partials from several ranks merge with
             ringserve.kernels.merge.

How it runs: the KV range is cut into `num_splits` contiguous pieces; one program handles one
(KV head, piece) and all G = H / Hkv query heads that read that KV head times the Tq tokens, so
each K/V byte is read from memory once. 8-bit K/V are converted in registers, exactly (int8 to q's
dtype; e4m3 to fp16, a bf16 q being rounded to fp16 for those dots, which measured faster on H100),
and their scales are applied to the scores (K) and to the probabilities (V), never to a dequantized
copy in memory. Scales are read through their strides: a cache that stores them head-major
(Hkv, Tk) and passes the transposed view reads them contiguously. Each piece writes an fp32
(out, lse) partial; `merge_attention_stack` combines the partials.
"""

from __future__ import annotations

import functools

import torch

from ._common import (
    FLOAT_DTYPES,
    KV8_DTYPES,
    LOG2E,
    check_float,
    check_head_dim,
    check_qkv,
    interpreting,
    last_dim_contiguous,
    resolve_backend,
    tl,
    triton,
)
from .attention import SUPPORTED_HEAD_DIMS, _online_softmax, flash_attention_ref
from .merge import merge_attention_stack
from .quant import dequantize_kv_ref

MAX_QUERY_TOKENS = 16


@triton.jit
def _decode_split_kernel(
    Q, K, V, KS, VS, OP, LP,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kst, stride_ksh, stride_vst, stride_vsh,
    stride_ops, stride_opt, stride_oph, stride_lps, stride_lpt, stride_lph,
    Tq, kv_len,
    diag,  # q_start - k_start: under CAUSAL, query t sees key j iff j <= t + diag
    split_len,  # keys per split, a multiple of BLOCK_N
    qk_scale,  # softmax scale * log2(e)
    GROUP: tl.constexpr,  # H // Hkv
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # (token, head-in-group) rows per program, >= 16 for tl.dot
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    QUANT: tl.constexpr,  # K/V are 8-bit with per-(token, head) scales
    UPCAST: tl.constexpr,  # compute the dots in fp32 (the CPU interpreter's bf16 dot is wrong)
    F16: tl.constexpr,  # fp8 K/V with a 16-bit q: compute in fp16 (e4m3 -> fp16 is one instruction, -> bf16 is not)
    PRECISION: tl.constexpr,
):
    hkv = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    t = rows // GROUP  # query token of each row
    h = hkv * GROUP + rows % GROUP  # query head of each row
    row_ok = t < Tq
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)

    q = tl.load(Q + t[:, None] * stride_qt + h[:, None] * stride_qh + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    elif F16:
        q = q.to(tl.float16)
    k_ptrs = K + hkv * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]  # (BLOCK_N, D)
    v_ptrs = V + hkv * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]  # (BLOCK_N, D)
    ks_ptrs = KS + hkv * stride_ksh + offs_n * stride_kst  # (BLOCK_N,)
    vs_ptrs = VS + hkv * stride_vsh + offs_n * stride_vst  # (BLOCK_N,)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)

    n_lo = split * split_len
    n_hi = tl.minimum(kv_len, n_lo + split_len)
    if CAUSAL:
        n_hi = tl.minimum(n_hi, Tq + diag)  # the last token sees keys <= Tq - 1 + diag
        full_end = tl.minimum(n_hi, diag + 1)  # token 0 sees keys <= diag: so does every token
    else:
        full_end = n_hi
    n_full = n_lo + tl.maximum(full_end - n_lo, 0) // BLOCK_N * BLOCK_N

    for start_n in range(n_lo, n_full, BLOCK_N):  # whole blocks every row sees: no masks
        k = tl.load(k_ptrs + start_n * stride_kt).to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if QUANT:
            qk = qk * tl.load(ks_ptrs + start_n * stride_kst)[None, :]
        p, alpha, m_i, l_i = _online_softmax(qk, m_i, l_i, qk_scale, False)
        v = tl.load(v_ptrs + start_n * stride_vt).to(q.dtype)
        if QUANT:
            p = p * tl.load(vs_ptrs + start_n * stride_vst)[None, :]
        acc = tl.dot(p.to(q.dtype), v, acc * alpha[:, None], input_precision=PRECISION)

    for start_n in range(n_full, n_hi, BLOCK_N):  # the tail and the causal edge
        cols = start_n + offs_n
        col_ok = cols < n_hi
        k = tl.load(k_ptrs + start_n * stride_kt, mask=col_ok[:, None], other=0.0).to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if QUANT:
            qk = qk * tl.load(ks_ptrs + start_n * stride_kst, mask=col_ok, other=0.0)[None, :]
        visible = col_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= t[:, None] + diag)
        qk = tl.where(visible, qk, float("-inf"))
        p, alpha, m_i, l_i = _online_softmax(qk, m_i, l_i, qk_scale, True)
        v = tl.load(v_ptrs + start_n * stride_vt, mask=col_ok[:, None], other=0.0).to(q.dtype)
        if QUANT:
            p = p * tl.load(vs_ptrs + start_n * stride_vst, mask=col_ok, other=0.0)[None, :]
        acc = tl.dot(p.to(q.dtype), v, acc * alpha[:, None], input_precision=PRECISION)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # ln(2)
    o_ptrs = OP + split * stride_ops + t[:, None] * stride_opt + h[:, None] * stride_oph + offs_d[None, :]
    tl.store(o_ptrs, out, mask=row_ok[:, None])
    tl.store(LP + split * stride_lps + t * stride_lpt + h * stride_lph, lse, mask=row_ok)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# (BLOCK_N, num_warps, num_stages, programs per SM): chosen by benchmarks/kernels.py on an H100.
DEFAULT_DECODE_CONFIG = (128, 4, 3, 4)


def _decode_plan(eff_len: int, Hkv: int, num_splits: int | None, block_n: int, waves: int, device: torch.device) -> tuple[int, int]:
    """(num_splits, split_len): enough programs to fill the GPU, each a whole number of blocks."""
    n_blocks = triton.cdiv(eff_len, block_n)
    if num_splits is None:
        programs = waves * _sm_count(device.index or 0) if device.type == "cuda" else 4 * Hkv
        num_splits = triton.cdiv(programs, Hkv)
    num_splits = max(1, min(int(num_splits), n_blocks))
    split_len = triton.cdiv(n_blocks, num_splits) * block_n
    return triton.cdiv(eff_len, split_len), split_len


def _check_decode(q, k, v, k_scale, v_scale, kv_len):
    Tq, Tk, H, Hkv, D = check_qkv(q, k, v, kv_dtypes=FLOAT_DTYPES + KV8_DTYPES)
    if not 1 <= Tq <= MAX_QUERY_TOKENS:
        raise ValueError(f"decode_attention takes 1..{MAX_QUERY_TOKENS} query tokens, got Tq={Tq}; use flash_attention for longer query blocks")
    quant = k.dtype in KV8_DTYPES
    if quant:
        if k_scale is None or v_scale is None:
            raise ValueError(f"k and v are {k.dtype}: pass k_scale and v_scale (Tk, Hkv) float32 from ringserve.kernels.quantize_kv")
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            check_float(name, s, (torch.float32,))
            if tuple(s.shape) != (Tk, Hkv):
                raise ValueError(f"{name} has shape {tuple(s.shape)}; expected (Tk, Hkv) = {(Tk, Hkv)}, one scale per token and KV head")
            if s.device != k.device:
                raise ValueError(f"{name} is on {s.device}, k on {k.device}; move them to one device")
    else:
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"k_scale / v_scale are only for 8-bit K/V; k is {k.dtype}")
        if q.dtype != k.dtype:
            raise TypeError(f"q ({q.dtype}) and k/v ({k.dtype}) must have the same dtype unless K/V are 8-bit")
    kv_len = Tk if kv_len is None else int(kv_len)
    if not 0 <= kv_len <= Tk:
        raise ValueError(f"kv_len={kv_len} must be within [0, Tk={Tk}]")
    return Tq, Tk, H, Hkv, D, quant, kv_len


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    kv_len: int | None = None,
    q_start: int | None = None,
    k_start: int = 0,
    scale: float | None = None,
    num_splits: int | None = None,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
    config: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of 1..16 query tokens over a long (optionally 8-bit) KV; see the module docstring.

    `config` = (BLOCK_N, num_warps, num_stages, programs per SM) overrides the tuned default.
    """
    Tq, Tk, H, Hkv, D, quant, kv_len = _check_decode(q, k, v, k_scale, v_scale, kv_len)
    backend = resolve_backend(backend, q.device)
    out_dtype = q.dtype if out_dtype is None else out_dtype
    scale = D**-0.5 if scale is None else float(scale)
    if backend == "torch":
        return decode_attention_ref(q, k, v, k_scale=k_scale, v_scale=v_scale, kv_len=kv_len, q_start=q_start,
                                    k_start=k_start, scale=scale, num_splits=num_splits, out_dtype=out_dtype)
    check_head_dim(D, SUPPORTED_HEAD_DIMS)
    causal = q_start is not None
    diag = (q_start - k_start) if causal else 0
    eff_len = min(kv_len, max(0, Tq + diag)) if causal else kv_len
    if eff_len == 0:
        return (torch.zeros((Tq, H, D), dtype=out_dtype, device=q.device),
                torch.full((Tq, H), float("-inf"), dtype=torch.float32, device=q.device))

    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    if interpreting():
        block_n, num_warps, num_stages, waves = 16, 4, 1, 1
    else:
        block_n, num_warps, num_stages, waves = config or DEFAULT_DECODE_CONFIG
    G = H // Hkv
    block_m = max(16, min(64, triton.next_power_of_2(Tq * G)))
    n_splits, split_len = _decode_plan(eff_len, Hkv, num_splits, block_n, waves, q.device)
    out_part = torch.empty((n_splits, Tq, H, D), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((n_splits, Tq, H), dtype=torch.float32, device=q.device)
    ks = k_scale if quant else lse_part  # placeholders, never read when QUANT is off
    vs = v_scale if quant else lse_part
    grid = (Hkv, n_splits, triton.cdiv(Tq * G, block_m))
    _decode_split_kernel[grid](
        q, k, v, ks, vs, out_part, lse_part,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        ks.stride(0), ks.stride(1), vs.stride(0), vs.stride(1),
        out_part.stride(0), out_part.stride(1), out_part.stride(2),
        lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
        Tq, eff_len, diag, split_len, scale * LOG2E,
        GROUP=G, D=D, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, QUANT=quant,
        UPCAST=interpreting() and q.dtype == torch.bfloat16,
        F16=k.dtype == torch.float8_e4m3fn and q.dtype in (torch.bfloat16, torch.float16),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return merge_attention_stack(out_part, lse_part, out_dtype=out_dtype, backend="triton")


def decode_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    kv_len: int | None = None,
    q_start: int | None = None,
    k_start: int = 0,
    scale: float | None = None,
    num_splits: int | None = None,
    out_dtype: torch.dtype | None = None,
    backend: str = "torch",
    config: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of decode_attention: dequantize, then unsplit attention (`num_splits`, `backend`,
    `config` are accepted for signature parity and ignored)."""
    Tq, Tk, H, Hkv, D, quant, kv_len = _check_decode(q, k, v, k_scale, v_scale, kv_len)
    k, v = k[:kv_len], v[:kv_len]
    if quant:
        k = dequantize_kv_ref(k, k_scale[:kv_len], dtype=torch.float32)
        v = dequantize_kv_ref(v, v_scale[:kv_len], dtype=torch.float32)
    else:
        k, v = k.float(), v.float()
    causal = q_start is not None
    return flash_attention_ref(q.float(), k, v, causal=causal, q_start=q_start if causal else 0, k_start=k_start,
                               scale=scale, out_dtype=out_dtype or q.dtype)
