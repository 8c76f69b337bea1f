"""Merging partial attention results by their log-sum-exp.

Attention of a query over keys A ∪ B equals the merge of the attention over A and over B:

    lse = logaddexp(lse_a, lse_b) = max + log(1 + exp(-|lse_a - lse_b|))
    out = out_a - sigmoid(lse_b - lse_a) * (out_a - out_b)

Both forms stay finite for any finite inputs (no exp of a large positive number) and are computed in
fp32. A side with lse = -inf (it saw no key) contributes nothing, whatever its `out` holds; when both
sides are -inf the result is out = 0, lse = -inf, never NaN.

    merge_attention(out_a, lse_a, out_b, lse_b)     in place into (out_a, lse_a); ring steps, SP ranks
    merge_attention_stack(outs, lses) -> (out, lse)  S partials at once; split-KV decode, gathered ranks

Shapes: out (T, H, D) (any leading dims that view as (T, H)), lse (T, H) float32; stacked inputs carry
a leading S. Keep the running `out` in float32 across ring steps: bf16 per-step outputs lose precision.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ._common import check_float, interpreting, resolve_backend, tl, triton


@triton.jit
def _merge_pair_kernel(
    OA, LA, OB, LB,
    N, H,
    stride_oat, stride_oah, stride_obt, stride_obh,
    stride_lat, stride_lah, stride_lbt, stride_lbh,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,  # (token, head) rows per program
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    t = rows // H
    h = rows % H
    offs_d = tl.arange(0, D)

    la = tl.load(LA + t * stride_lat + h * stride_lah, mask=row_ok, other=float("-inf")).to(tl.float32)
    lb = tl.load(LB + t * stride_lbt + h * stride_lbh, mask=row_ok, other=float("-inf")).to(tl.float32)
    a_ok = la != float("-inf")
    b_ok = lb != float("-inf")
    # An empty side's out is not read: it may hold anything (zeros by convention, NaN after a bug).
    oa = tl.load(OA + t[:, None] * stride_oat + h[:, None] * stride_oah + offs_d[None, :], mask=(row_ok & a_ok)[:, None], other=0.0).to(tl.float32)
    ob = tl.load(OB + t[:, None] * stride_obt + h[:, None] * stride_obh + offs_d[None, :], mask=(row_ok & b_ok)[:, None], other=0.0).to(tl.float32)

    mx = tl.maximum(la, lb)
    both_empty = mx == float("-inf")
    diff = lb - tl.where(both_empty, 0.0, la)  # +inf when only a is empty, -inf when only b is
    diff = tl.where(both_empty, 0.0, diff)
    # sigmoid; |diff| clipped at 80 so exp stays finite: sigmoid(80) rounds to 1.0 in fp32, sigmoid(-80) ~ 2e-35
    w_b = 1.0 / (1.0 + tl.exp(-tl.minimum(tl.maximum(diff, -80.0), 80.0)))
    w_b = tl.where(both_empty, 0.0, w_b)
    lse = tl.where(both_empty, float("-inf"), mx + tl.log(1.0 + tl.exp(-tl.abs(diff))))
    out = oa - w_b[:, None] * (oa - ob)

    tl.store(OA + t[:, None] * stride_oat + h[:, None] * stride_oah + offs_d[None, :], out.to(OA.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LA + t * stride_lat + h * stride_lah, lse, mask=row_ok)


@triton.jit
def _merge_stack_kernel(
    OP, LP, O, L,
    S, H,
    stride_ops, stride_opt, stride_oph, stride_lps, stride_lpt, stride_lph,
    stride_ot, stride_oh, stride_lt, stride_lh,
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,  # partials read per step
):
    row = tl.program_id(0)
    t = row // H
    h = row % H
    offs_d = tl.arange(0, D)
    offs_s = tl.arange(0, BLOCK_S)

    m = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), 0)  # running max of the lse seen so far
    l = tl.sum(tl.zeros([BLOCK_S], tl.float32), 0)  # running sum of exp(lse - m)
    acc = tl.zeros([D], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + offs_s
        ls = tl.load(LP + s * stride_lps + t * stride_lpt + h * stride_lph, mask=s < S, other=float("-inf")).to(tl.float32)
        live = ls != float("-inf")
        o = tl.load(OP + s[:, None] * stride_ops + t * stride_opt + h * stride_oph + offs_d[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        m_new = tl.maximum(m, tl.max(ls, 0))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp(ls - m_sub)  # (BLOCK_S,), each <= 1
        alpha = tl.exp(m - m_sub)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        l = l * alpha + tl.sum(w, 0)
        m = m_new

    empty = l == 0.0
    l_safe = tl.where(empty, 1.0, l)
    out = acc / l_safe
    lse = tl.where(empty, float("-inf"), m + tl.log(l_safe))
    tl.store(O + t * stride_ot + h * stride_oh + offs_d, out.to(O.dtype.element_ty))
    tl.store(L + t * stride_lt + h * stride_lh, lse)


def _as_thd(out: torch.Tensor, lse: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """View out as (T, H, D) and lse as (T, H) without copying (writes must land in the caller's tensors)."""
    check_float(f"out{what}", out)
    if lse.dtype != torch.float32:
        raise TypeError(f"lse{what} has dtype {lse.dtype}; lse must be float32 (natural log), as the attention kernels return it")
    if out.dim() < 2 or tuple(lse.shape) != tuple(out.shape[:-1]):
        raise ValueError(
            f"out{what}{tuple(out.shape)} and lse{what}{tuple(lse.shape)} do not match: expected out (T, H, D) "
            "and lse (T, H) (lse has out's shape without the last dim)"
        )
    if out.dim() == 2:
        return out.unsqueeze(1), lse.unsqueeze(1)
    if out.dim() > 3:
        try:
            return out.view(-1, out.shape[-2], out.shape[-1]), lse.view(-1, lse.shape[-1])
        except RuntimeError as exc:
            raise ValueError(f"out{what} with shape {tuple(out.shape)} cannot be viewed as (T, H, D); pass a contiguous tensor") from exc
    return out, lse


def _check_pair(out_a, lse_a, out_b, lse_b):
    oa, la = _as_thd(out_a, lse_a, "_a")
    ob, lb = _as_thd(out_b, lse_b, "_b")
    if oa.shape != ob.shape:
        raise ValueError(f"out_a{tuple(out_a.shape)} and out_b{tuple(out_b.shape)} must have the same shape")
    if out_a.device != out_b.device or lse_a.device != out_a.device or lse_b.device != out_a.device:
        raise ValueError("all four tensors must be on the same device")
    if oa.stride(-1) != 1 or ob.stride(-1) != 1:
        raise ValueError("out_a and out_b need a contiguous last (D) dimension; call .contiguous() first")
    return oa, la, ob, lb


def merge_attention(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial (out_b, lse_b) into (out_a, lse_a) in place; returns (out_a, lse_a)."""
    oa, la, ob, lb = _check_pair(out_a, lse_a, out_b, lse_b)
    if resolve_backend(backend, out_a.device) == "torch":
        return merge_attention_ref(out_a, lse_a, out_b, lse_b)
    T, H, D = oa.shape
    if D & (D - 1) or D > 1024:
        raise ValueError(f"head dim D={D} must be a power of two up to 1024 for the Triton merge; pass backend='torch'")
    N = T * H
    if N == 0:
        return out_a, lse_a
    block_r = 16 if interpreting() else max(1, min(64, 4096 // D))
    _merge_pair_kernel[(triton.cdiv(N, block_r),)](
        oa, la, ob, lb, N, H,
        oa.stride(0), oa.stride(1), ob.stride(0), ob.stride(1),
        la.stride(0), la.stride(1), lb.stride(0), lb.stride(1),
        D=D, BLOCK_R=block_r, num_warps=4,
    )
    return out_a, lse_a


def merge_attention_ref(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    *,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of merge_attention (same in-place contract; `backend` is ignored)."""
    _check_pair(out_a, lse_a, out_b, lse_b)
    la, lb = lse_a.float(), lse_b.float()
    oa = out_a.float().masked_fill((la == float("-inf"))[..., None], 0.0)
    ob = out_b.float().masked_fill((lb == float("-inf"))[..., None], 0.0)
    both_empty = torch.maximum(la, lb) == float("-inf")
    w_b = torch.sigmoid((lb - la).masked_fill(both_empty, 0.0)).masked_fill(both_empty, 0.0)
    out_a.copy_(oa - w_b[..., None] * (oa - ob))
    lse_a.copy_(torch.logaddexp(la, lb))
    return out_a, lse_a


def _stack_inputs(outs, lses):
    if isinstance(outs, (list, tuple)):
        if len(outs) == 0 or len(outs) != len(lses):
            raise ValueError(f"need the same, non-zero number of outs ({len(outs)}) and lses ({len(lses)})")
        outs, lses = torch.stack(list(outs)), torch.stack(list(lses))
    check_float("outs", outs)
    if lses.dtype != torch.float32:
        raise TypeError(f"lses has dtype {lses.dtype}; lse must be float32")
    if outs.dim() != 4 or tuple(lses.shape) != tuple(outs.shape[:-1]):
        raise ValueError(f"expected outs (S, T, H, D) and lses (S, T, H); got {tuple(outs.shape)} and {tuple(lses.shape)}")
    return outs, lses


def merge_attention_stack(
    outs: torch.Tensor | Sequence[torch.Tensor],
    lses: torch.Tensor | Sequence[torch.Tensor],
    *,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge S partials: outs (S, T, H, D), lses (S, T, H) -> (out (T, H, D), lse (T, H) float32)."""
    outs, lses = _stack_inputs(outs, lses)
    if resolve_backend(backend, outs.device) == "torch":
        return merge_attention_stack_ref(outs, lses, out_dtype=out_dtype)
    S, T, H, D = outs.shape
    if D & (D - 1) or D > 1024:
        raise ValueError(f"head dim D={D} must be a power of two up to 1024 for the Triton merge; pass backend='torch'")
    if outs.stride(-1) != 1:
        outs = outs.contiguous()
    out = torch.empty((T, H, D), dtype=out_dtype or outs.dtype, device=outs.device)
    lse = torch.empty((T, H), dtype=torch.float32, device=outs.device)
    if T * H == 0:
        return out, lse
    if S == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    block_s = min(triton.next_power_of_2(S), 4 if interpreting() else max(1, 4096 // D))
    _merge_stack_kernel[(T * H,)](
        outs, lses, out, lse, S, H,
        outs.stride(0), outs.stride(1), outs.stride(2), lses.stride(0), lses.stride(1), lses.stride(2),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        D=D, BLOCK_S=block_s, num_warps=4,
    )
    return out, lse


def merge_attention_stack_ref(
    outs: torch.Tensor | Sequence[torch.Tensor],
    lses: torch.Tensor | Sequence[torch.Tensor],
    *,
    out_dtype: torch.dtype | None = None,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of merge_attention_stack (`backend` is ignored)."""
    outs, lses = _stack_inputs(outs, lses)
    lse = torch.logsumexp(lses.float(), dim=0)  # (T, H); -inf where every partial is empty
    w = torch.exp(lses.float() - lse.nan_to_num(neginf=0.0)[None])  # (S, T, H); 0 for empty partials
    o = outs.float().masked_fill((lses == float("-inf"))[..., None], 0.0)
    out = (w[..., None] * o).sum(0)
    return out.to(out_dtype or outs.dtype), lse
