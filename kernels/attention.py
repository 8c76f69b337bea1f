"""Block attention with log-sum-exp output, the building block of ring prefill.

    flash_attention(q, k, v, *, causal, q_start=0, k_start=0, scale=None) -> (out, lse)

    q    (Tq, H, D)     any Tq; D in SUPPORTED_HEAD_DIMS for the Triton kernel
    k, v (Tk, Hkv, D)   any Tk; H % Hkv == 0 (query head h reads KV head h // (H // Hkv))
    out  (Tq, H, D)     dtype `out_dtype` (default q.dtype; ask for float32 to merge ring steps exactly)
    lse  (Tq, H)        float32, natural log of the softmax denominator (scores already scaled)

Masking is by absolute position: with causal=True, query i (position q_start + i) sees key j
(position k_start + j) iff q_start + i >= k_start + j. A ring step therefore asks for a "full" block
(every key before every query), a "diagonal" block (q_start == k_start) or a block that is partly or
wholly masked, with the same call. A query row that sees no key gets out = 0 and lse = -inf, which
`ringserve.kernels.merge` treats as "contributes nothing".

Backends: "triton" (this file's kernel; on CPU only under TRITON_INTERPRET=1), "torch" (the reference
below, chunked over queries so its memory stays bounded), "cudnn" / "flash" (PyTorch's fused SDPA ops
that also return the LSE; they need equal head counts, so K/V are expanded for GQA, and they support only
full blocks and the one diagonal alignment each op has — q_start == k_start for cuDNN,
q_start + Tq == k_start + Tk for flash — other masks fall back to the Triton kernel), "auto"
(Triton on CUDA, torch elsewhere).
"""

from __future__ import annotations

import torch

from ._common import (
    FLOAT_DTYPES,
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

SUPPORTED_HEAD_DIMS = (32, 64, 128, 256)
REF_CHUNK_SCORES = 1 << 26  # the reference materialises at most this many scores at a time


@triton.jit
def _online_softmax(qk, m_i, l_i, qk_scale, SAFE: tl.constexpr):
    """One step of the streaming softmax over a (M, N) tile of raw scores qk.

    Scores are scaled into log2 units here (qk * qk_scale, fused with the max subtraction into one
    FMA). Returns p = 2^(qk*qk_scale - m_new) (unnormalised), alpha = 2^(m_old - m_new) (rescales the
    old accumulator), m_new and l_new. SAFE handles rows whose scores so far are all -inf (masked): it
    subtracts 0 instead of -inf so exp2 gives 0, not NaN, and keeps m = -inf for them.
    """
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    if SAFE:
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_new


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_lt, stride_lh,
    Tq, Tk,
    diag,  # q_start - k_start: under CAUSAL, query i sees key j iff j <= i + diag
    qk_scale,  # softmax scale * log2(e): scores are kept in log2 units, exp2 is cheaper than exp
    GROUP,  # H // Hkv query heads per KV head (runtime: one compile serves every GQA ratio)
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,  # compute the dots in fp32 (the CPU interpreter's bf16 dot is wrong)
    PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (exact), "tf32" otherwise (ignored for 16-bit)
):
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: start them first so the tail is short
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    hkv = h // GROUP

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)

    q = tl.load(Q + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :], mask=offs_m[:, None] < Tq, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_ptrs = K + hkv * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]  # (BLOCK_N, D)
    v_ptrs = V + hkv * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]  # (BLOCK_N, D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)

    # Keys [0, hi) can be visible to some row of this block; keys [0, n_full) are visible to all of
    # them and lie in whole blocks, so the first loop needs no mask at all.
    if CAUSAL:
        hi = tl.maximum(tl.minimum(Tk, m0 + BLOCK_M + diag), 0)
        full_end = tl.maximum(tl.minimum(Tk, m0 + diag + 1), 0)
    else:
        hi = Tk
        full_end = Tk
    n_full = (full_end // BLOCK_N) * BLOCK_N

    for start_n in range(0, n_full, BLOCK_N):
        k = tl.load(k_ptrs + start_n * stride_kt)
        if UPCAST:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p, alpha, m_i, l_i = _online_softmax(qk, m_i, l_i, qk_scale, False)
        v = tl.load(v_ptrs + start_n * stride_vt)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)

    for start_n in range(n_full, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < Tk
        k = tl.load(k_ptrs + start_n * stride_kt, mask=col_ok[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        visible = col_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + diag)
        qk = tl.where(visible, qk, float("-inf"))
        p, alpha, m_i, l_i = _online_softmax(qk, m_i, l_i, qk_scale, True)
        v = tl.load(v_ptrs + start_n * stride_vt, mask=col_ok[:, None], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)

    empty = l_i == 0.0  # the row saw no key: out = 0, lse = -inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # ln(2)
    row_ok = offs_m < Tq
    tl.store(O + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + h * stride_lh + offs_m * stride_lt, lse, mask=row_ok)


def _attn_config(D: int, dtype: torch.dtype, causal: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward kernel; chosen by benchmarks/kernels.py."""
    if interpreting():
        return 16, 16, 4, 1  # the interpreter runs each program in numpy: small tiles, few wasted rows
    if dtype == torch.float32:
        return 64, 32, 4, 2
    if D <= 64:
        return 128, 64, 4, 3
    if D <= 128:
        return 128, 64, 8, 3
    return 64, 32, 4, 2


def _causal_extent(causal: bool, Tq: int, Tk: int, diag: int) -> str:
    """Classify a block: "none" (every query sees no key), "full" (every query sees every key), "mixed"."""
    if not causal or diag >= Tk - 1:
        return "full"
    if diag + Tq - 1 < 0:
        return "none"
    return "mixed"


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    q_start: int = 0,
    k_start: int = 0,
    scale: float | None = None,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
    config: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (Tq, H, D) over k, v (Tk, Hkv, D) -> (out (Tq, H, D), lse (Tq, H) fp32, natural log).

    See the module docstring for masking and backends. `config` = (BLOCK_M, BLOCK_N, num_warps,
    num_stages) overrides the Triton tile choice (benchmarks use it to tune).
    """
    Tq, Tk, H, Hkv, D = check_qkv(q, k, v)
    if q.dtype != k.dtype:
        raise TypeError(f"q ({q.dtype}) and k/v ({k.dtype}) must have the same dtype; cast one with .to()")
    backend = resolve_backend(backend, q.device, extra=("cudnn", "flash"))
    scale = D**-0.5 if scale is None else float(scale)
    out_dtype = q.dtype if out_dtype is None else out_dtype
    check_float("out_dtype", torch.empty(0, dtype=out_dtype), FLOAT_DTYPES + (torch.float64,))
    if backend == "torch":
        return flash_attention_ref(q, k, v, causal=causal, q_start=q_start, k_start=k_start, scale=scale, out_dtype=out_dtype)
    if backend in ("cudnn", "flash"):
        res = _sdpa_with_lse(q, k, v, causal=causal, diag=q_start - k_start, scale=scale, out_dtype=out_dtype, which=backend)
        if res is not None:
            return res
        # a mask the fused ops cannot express: the Triton kernel computes it
    check_head_dim(D, SUPPORTED_HEAD_DIMS)

    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    out = torch.empty((Tq, H, D), dtype=out_dtype, device=q.device)
    lse = torch.empty((Tq, H), dtype=torch.float32, device=q.device)
    if Tq == 0:
        return out, lse
    block_m, block_n, num_warps, num_stages = config or _attn_config(D, q.dtype, causal)
    grid = (triton.cdiv(Tq, block_m), H)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        Tq, Tk, q_start - k_start, scale * LOG2E,
        H // Hkv, D=D, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=bool(causal),
        UPCAST=interpreting() and q.dtype == torch.bfloat16,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


def _sdpa_with_lse(q, k, v, *, causal, diag, scale, out_dtype, which):
    """PyTorch's fused attention ops that return the LSE; None when the mask is not one they express."""
    Tq, H, D = q.shape
    Tk, Hkv, _ = k.shape
    extent = _causal_extent(causal, Tq, Tk, diag)
    if extent == "none" or Tk == 0:
        return (torch.zeros((Tq, H, D), dtype=out_dtype, device=q.device),
                torch.full((Tq, H), float("-inf"), dtype=torch.float32, device=q.device))
    is_causal = extent == "mixed"
    # cuDNN aligns its causal mask top-left (key j visible to query i iff j <= i), the flash op
    # bottom-right (j <= i + Tk - Tq); any other offset is left to the Triton kernel
    if is_causal and diag != (0 if which == "cudnn" else Tk - Tq):
        return None
    if Hkv != H:  # the LSE-returning ops take equal head counts
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    qb, kb, vb = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # (1, H, T, D)
    if which == "cudnn":
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(qb, kb, vb, None, True, 0.0, is_causal, False, scale=scale)
    else:
        res = torch.ops.aten._scaled_dot_product_flash_attention(qb, kb, vb, 0.0, is_causal, False, scale=scale)
    out, lse = res[0], res[1]
    out = out[0].transpose(0, 1).to(out_dtype).contiguous()  # (Tq, H, D)
    lse = lse.reshape(H, -1)[:, :Tq].transpose(0, 1).float().contiguous()  # (Tq, H)
    return out, lse


def flash_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    q_start: int = 0,
    k_start: int = 0,
    scale: float | None = None,
    out_dtype: torch.dtype | None = None,
    backend: str = "torch",
    config: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch twin of flash_attention (fp32 math, float64 when given float64).

    `backend` and `config` are accepted for signature parity and ignored. Scores are materialised one
    query chunk at a time (at most REF_CHUNK_SCORES per chunk), so CPU serving of long prompts stays in memory.
    """
    Tq, Tk, H, Hkv, D = check_qkv(q, k, v) if q.dtype != torch.float64 else _check_qkv64(q, k, v)
    scale = D**-0.5 if scale is None else float(scale)
    out_dtype = q.dtype if out_dtype is None else out_dtype
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    kf = k.to(acc).repeat_interleave(H // Hkv, dim=1)  # (Tk, H, D)
    vf = v.to(acc).repeat_interleave(H // Hkv, dim=1)  # (Tk, H, D)
    out = torch.empty((Tq, H, D), dtype=out_dtype, device=q.device)
    lse = torch.empty((Tq, H), dtype=torch.float32, device=q.device)
    key_pos = torch.arange(Tk, device=q.device) + k_start
    chunk = max(1, REF_CHUNK_SCORES // max(1, H * Tk))
    for i0 in range(0, Tq, chunk):
        qc = q[i0 : i0 + chunk].to(acc)  # (c, H, D)
        s = torch.einsum("qhd,khd->hqk", qc, kf) * scale  # (H, c, Tk)
        if causal:
            query_pos = torch.arange(i0, i0 + qc.shape[0], device=q.device) + q_start
            s = s.masked_fill(key_pos[None, None, :] > query_pos[None, :, None], float("-inf"))
        lse_c = torch.logsumexp(s, dim=-1)  # (H, c); -inf where a row sees no key
        p = torch.exp(s - lse_c.nan_to_num(neginf=0.0)[..., None])  # masked scores give exactly 0
        out[i0 : i0 + chunk] = torch.einsum("hqk,khd->qhd", p, vf).to(out_dtype)
        lse[i0 : i0 + chunk] = lse_c.transpose(0, 1).float()
    return out, lse


def _check_qkv64(q, k, v):
    f64 = FLOAT_DTYPES + (torch.float64,)
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float(name, x, f64)
    return check_qkv(q.float(), k.float(), v.float())
