"""Sequence-parallel attention: ring attention for prefill chunks, pass-Q for short prompts and decode.

Pure functions and one small communication object (`RingComm`); the process group is always an
argument, never a global. Shapes: T tokens, H query heads, Hkv KV heads, D head dim, P ranks. Which
rank holds which positions is `layout.ShardLayout`; every rank keeps its tokens in pages
(`kvpages.KVView`), in position order.

A prefill chunk of a create or a long append (`mode == "ring"`):
  * pass-KV over the chunk (`ring_attention`): each rank computes Q/K/V only for its zigzag share of
    the chunk; the chunk's K/V shards travel the ring with batched isend/irecv, the transfer for
    step s+1 posted before step s's attention runs (double buffering);
  * the chunk's queries against the retained context (`context_attention`): the context is spread
    over the ranks and every context position precedes the chunk, so the chunk's queries are
    all-gathered, each rank attends all of them over its own pages in place (no mask, no copy of the
    context), and one all-to-all returns the partial (out, lse) to the queries' owners.
The two partials merge by LSE. Only the chunk's K/V ever travel, so a create of N tokens moves
O(N) bytes per rank and layer, not O(N^2 / chunk).

A short prompt or a decode step (`mode == "replicated"`, pass-Q, `replicated_attention`): every rank
runs the (cheap, replicated) projections for all new tokens, stores the rows it owns in its pages,
attends all new queries over its pages (query t sees the stored keys at positions <= its own: a
per-query length), and one all-gather per layer merges the partial (out, lse) in rank order.

`choose_mode` picks between them by the bytes each would move, for the whole call's new tokens.
"""

from __future__ import annotations

import datetime as _dt
import time

import torch
import torch.distributed as dist

from ringserve.kernels import (MAX_QUERY_TOKENS, decode_attention, flash_attention, merge_attention,
                               merge_attention_stack, paged_attention)

from .kvpages import KVView
from .layout import Segment

# --------------------------------------------------------------------------------- local attention


def _cpu_attention(q, k, v, visible: torch.Tensor | None, scale: float, is_causal: bool = False):
    """(out fp32 (Tq, H, D), lse (Tq, H)) on the CPU with PyTorch's fused flash-attention op, which
    returns the LSE too. visible (Tq, Tk) bool, or None for no mask (is_causal: query i sees keys <= i);
    rows that see no key get 0, -inf.

    Grouped-query attention without copying K/V: unless the op's own causal mask is wanted, the G = H / Hkv
    query heads that share a KV head are laid out as G x Tq query rows of that head (the mask repeated
    per group), so K and V are read as they are."""
    Tq, H, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    grouped = G > 1 and not is_causal
    if grouped:
        qb = q.view(Tq, Hkv, G, D).permute(1, 2, 0, 3).reshape(1, Hkv, G * Tq, D)  # row g * Tq + t
        kb, vb = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)  # (1, Hkv, Tk, D)
    else:
        qb = q.transpose(0, 1).unsqueeze(0)  # (1, H, Tq, D)
        kb = (k.repeat_interleave(G, 1) if G > 1 else k).transpose(0, 1).unsqueeze(0)  # (1, H, Tk, D)
        vb = (v.repeat_interleave(G, 1) if G > 1 else v).transpose(0, 1).unsqueeze(0)
    mask = empty_rows = None
    if visible is not None:
        mask = torch.zeros(visible.shape, dtype=q.dtype).masked_fill_(~visible, float("-inf"))
        empty_rows = ~visible.any(1)
        if bool(empty_rows.any()):
            mask[empty_rows] = 0.0  # keep the op finite; fixed up below
        else:
            empty_rows = None
        if grouped:
            mask = mask.repeat(G, 1)  # (G * Tq, Tk)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qb, kb, vb, 0.0, is_causal,
                                                                           attn_mask=mask, scale=scale)
    if grouped:
        out = out[0].view(Hkv, G, Tq, D).permute(2, 0, 1, 3).reshape(Tq, H, D).float()
        lse = lse[0].view(Hkv, G, Tq).permute(2, 0, 1).reshape(Tq, H).float()
    else:
        out = out[0].transpose(0, 1).float()  # (Tq, H, D)
        lse = lse[0].transpose(0, 1).float()  # (Tq, H)
    if empty_rows is not None:
        out[empty_rows] = 0.0
        lse[empty_rows] = float("-inf")
    return out, lse


def _attn(q, k, v, *, causal: bool, q_start: int, k_start: int, scale: float, backend: str = "auto"):
    """(out fp32 (Tq, H, D), lse (Tq, H)) of q over contiguous k/v with the position-offset causal mask.

    On CUDA this is `kernels.flash_attention`; on the CPU, PyTorch's fused CPU flash-attention op.
    """
    if q.device.type != "cpu":
        if not causal and q.shape[0] <= MAX_QUERY_TOKENS and backend == "auto":  # few queries: split-KV kernel
            return decode_attention(q, k, v, scale=scale, out_dtype=torch.float32)
        return flash_attention(q, k, v, causal=causal, q_start=q_start, k_start=k_start, scale=scale,
                               out_dtype=torch.float32, backend=backend)
    visible = None
    if causal:
        diag = q_start - k_start  # query i sees key j when j <= i + diag
        if diag == 0:  # the fused op's own (top-left aligned) causal mask: no mask tensor
            return _cpu_attention(q, k, v, None, scale, is_causal=True)
        if diag < k.shape[0] - 1:  # some key is masked for some query
            visible = torch.arange(k.shape[0])[None, :] <= torch.arange(q.shape[0])[:, None] + diag
    return _cpu_attention(q, k, v, visible, scale)


def attend_paged(q: torch.Tensor, kv: KVView, layer: int, kv_len: int | torch.Tensor, scale: float,
                 backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """q (Tq, H, D) over one layer of a session's pages, in place: query t sees storage slots
    [0, kv_len[t]) (an int: every query the same). Returns (out fp32 (Tq, H, D), lse (Tq, H)).

    On CUDA (or with backend="triton", e.g. under the CPU interpreter) this is one call of the paged
    kernel (`kernels.paged_attention`). On the CPU it attends each run of consecutive pages as one
    contiguous view with PyTorch's fused op and merges the runs by LSE: no gather, no copy.
    """
    Tq, H, D = q.shape
    per_query = isinstance(kv_len, torch.Tensor)
    hi = int(kv_len.max()) if per_query and Tq else (0 if per_query else int(kv_len))
    if q.device.type != "cpu" or backend == "triton":
        lens = (kv_len if per_query else torch.full((Tq,), hi)).to(device=q.device, dtype=torch.int32).view(1, Tq)
        kd, ks, vd, vs = kv.layer(layer)
        out, lse = paged_attention(q.unsqueeze(0), kd, vd, kv.table(), lens, k_scales=ks, v_scales=vs,
                                   kv_format=kv.format, max_len=hi, scale=scale, out_dtype=torch.float32,
                                   backend="triton" if backend == "triton" else "auto")
        return out[0], lse[0]
    out = lse = None
    lo = int(kv_len.min()) if per_query and Tq else hi
    for off, k, v in kv.layer_runs(layer, hi):
        visible = None
        if lo < off + k.shape[0]:  # some query stops inside this run
            visible = (off + torch.arange(k.shape[0]))[None, :] < kv_len[:, None]
        o, l = _cpu_attention(q, k, v, visible, scale)
        if out is None:
            out, lse = o, l
        else:
            merge_attention(out, lse, o, l)
    if out is None:  # nothing to attend
        return torch.zeros(Tq, H, D, dtype=torch.float32), torch.full((Tq, H), float("-inf"), dtype=torch.float32)
    return out, lse


def attend_segments(q: torch.Tensor, q_segs: list[Segment], k: torch.Tensor, v: torch.Tensor,
                    k_segs: list[Segment], scale: float, backend: str = "auto"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention by absolute position of q (Tq, H, D) over k/v (Tk, Hkv, D).

    q_segs / k_segs give the positions of q's and k's rows (sorted, contiguous runs). For a query
    run starting at position qp, every key before qp is visible to all its queries: those keys are a
    prefix of k's storage and are attended in one unmasked call. Keys from qp to the run's end get a
    causal call per key run, aligned so a run that starts at qp has its diagonal at the corner (the
    mask the fused cuDNN/flash ops express). Later keys are skipped. Returns (out fp32, lse).
    """
    Tq, H, D = q.shape
    out = torch.zeros(Tq, H, D, dtype=torch.float32, device=q.device)
    lse = torch.full((Tq, H), float("-inf"), dtype=torch.float32, device=q.device)
    qo = 0
    for qp, qn in q_segs:
        qe = qp + qn
        qb = q[qo:qo + qn]
        o_acc, l_acc = out[qo:qo + qn], lse[qo:qo + qn]
        ko, full_end = 0, 0
        causal = []  # (storage offset, first position, length) of keys in [qp, qe)
        for kp, kn in k_segs:
            ke = kp + kn
            full_end += max(0, min(ke, qp) - kp)
            lo, hi = max(kp, qp), min(ke, qe)
            if hi > lo:
                causal.append((ko + lo - kp, lo, hi - lo))
            ko += kn
        if full_end:
            o, l = _attn(qb, k[:full_end], v[:full_end], causal=False, q_start=0, k_start=0, scale=scale,
                         backend=backend)
            merge_attention(o_acc, l_acc, o, l)
        for off, kp, kn in causal:
            o, l = _attn(qb, k[off:off + kn], v[off:off + kn], causal=True, q_start=qp, k_start=kp,
                         scale=scale, backend=backend)
            merge_attention(o_acc, l_acc, o, l)
        qo += qn
    return out, lse


# --------------------------------------------------------------------------------- communication


class CommTimeout(RuntimeError):
    """A peer did not answer within the group's timeout: the group is unhealthy."""


class RingComm:
    """Point-to-point ring traffic: post the send/receive for the next step, compute, then wait.

    Also keeps the time spent waiting (the share of a ring step not hidden behind compute).
    """

    def __init__(self, group, timeout_s: float = 60.0):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.world) if group is not None else (self.rank + 1) % self.world
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.world) if group is not None else (self.rank - 1) % self.world
        self.timeout = _dt.timedelta(seconds=timeout_s)
        self._reqs: list = []
        self.wait_s = 0.0
        self.steps = 0  # transfers waited for (one per ring step)
        self.bytes_sent = 0

    def send_recv(self, send: list[torch.Tensor], recv: list[torch.Tensor]):
        """Post the sends of `send` to the next rank and the receives into `recv` from the previous one,
        as one batch (the same order on every rank)."""
        self.bytes_sent += sum(t.numel() * t.element_size() for t in send)
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in send]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group) for t in recv]
        self._reqs = dist.batch_isend_irecv(ops)

    def wait(self):
        t0 = time.perf_counter()
        for r in self._reqs:
            try:
                ok = r.wait(self.timeout)
            except RuntimeError as e:
                raise CommTimeout(f"ring transfer failed or timed out after {self.timeout}: {e}") from e
            if ok is False:
                raise CommTimeout(f"ring transfer timed out after {self.timeout}")
        self._reqs = []
        self.steps += 1
        self.wait_s += time.perf_counter() - t0


# --------------------------------------------------------------------------------- attention modes


def ring_attention(comm: RingComm | None, q: torch.Tensor, q_segs: list[Segment], k: torch.Tensor,
                   v: torch.Tensor, segs_by_rank: list[list[Segment]], scale: float, *, overlap: bool = True,
                   backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Pass-KV ring attention within one prefill chunk. q (Tq, H, D) with positions q_segs; k/v
    (Tk, Hkv, D): this rank's share of the chunk, whose positions are segs_by_rank[rank]. K and V
    travel as two messages of one batch, sent from where the projections put them (no staging copy)
    and received into one buffer; share sizes come from the layout, so receives are sized exactly.
    overlap=False waits for each transfer before computing (to measure what overlap hides).
    comm=None: one rank, the chunk's causal attention alone. Returns (out fp32 (Tq, H, D), lse (Tq, H))."""
    if comm is None:
        return attend_segments(q, q_segs, k, v, segs_by_rank[0], scale, backend)
    P, rank = comm.world, comm.rank
    Hkv, D = k.shape[1], k.shape[2]
    sizes = [sum(n for _, n in s) for s in segs_by_rank]
    cur = (k.contiguous(), v.contiguous())
    out = lse = None
    for step in range(P):
        src = (rank - step) % P
        if step + 1 < P:
            nxt = torch.empty((2, sizes[(rank - step - 1) % P], Hkv, D), dtype=k.dtype, device=k.device)
            comm.send_recv(list(cur), [nxt[0], nxt[1]])
            if not overlap:
                comm.wait()
        o, l = attend_segments(q, q_segs, cur[0], cur[1], segs_by_rank[src], scale, backend)
        if out is None:
            out, lse = o, l
        else:
            merge_attention(out, lse, o, l)
        if step + 1 < P:
            if overlap:
                comm.wait()
            cur = (nxt[0], nxt[1])
    return out, lse


def context_attention(group, q: torch.Tensor, rows_by_rank: list[int], kv: KVView, layer: int, context: int,
                      scale: float, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """A prefill chunk's queries against the session's retained context, which every rank holds a
    share of (`context` storage slots here) and which precedes the chunk entirely (no mask).

    q (n, H, D): this rank's chunk queries; rows_by_rank: every rank's n. The queries are all-gathered
    (padded to the longest share), attended over this rank's pages in place, and one all-to-all sends
    each partial (out, lse) back to the rank owning the query; the P partials merge by LSE.
    group=None: one rank. Returns (out fp32 (n, H, D), lse (n, H)).
    """
    if group is None or dist.get_world_size(group) == 1:
        return attend_paged(q, kv, layer, context, scale, backend)
    P = dist.get_world_size(group)
    n, H, D = q.shape
    m = max(rows_by_rank)
    mine = q.new_zeros(m, H, D)
    mine[:n] = q
    q_all = q.new_empty(P * m, H, D)
    _all_gather_single(q_all, mine, group=group)
    o, l = attend_paged(q_all, kv, layer, context, scale, backend)  # (P*m, H, D), (P*m, H)
    packed = torch.cat([o, l.unsqueeze(-1)], dim=-1)  # (P*m, H, D+1): rows grouped by owner rank
    back = torch.empty_like(packed)
    dist.all_to_all_single(back, packed, group=group)  # back[j*m:(j+1)*m]: rank j's partial for my queries
    back = back.view(P, m, H, D + 1)[:, :n]
    return merge_attention_stack(back[..., :D], back[..., D].contiguous(), out_dtype=torch.float32)


def replicated_attention(group, q: torch.Tensor, kv: KVView, layer: int, kv_len: torch.Tensor, scale: float,
                         backend: str = "auto") -> torch.Tensor:
    """Pass-Q / SP decode: every rank holds the same q (T, H, D) of the new tokens, attends it over its
    own pages (query t sees storage slots [0, kv_len[t]): the stored keys at positions <= its own),
    and one all-gather merges the partial (out, lse) in rank order (so every rank computes
    bit-identical outputs). Returns out fp32 (T, H, D)."""
    return merge_across_ranks(group, *attend_paged(q, kv, layer, kv_len, scale, backend))


def merge_across_ranks(group, o: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Every rank's partial (out (T, H, D), lse (T, H)) of the same queries, merged by one all-gather in
    rank order, so every rank computes bit-identical outputs. Returns out fp32 (T, H, D)."""
    P = dist.get_world_size(group) if group is not None else 1
    if P == 1:
        return o
    D = o.shape[-1]
    packed = torch.cat([o, l.unsqueeze(-1)], dim=-1)  # (T, H, D+1): one collective per layer
    parts = [torch.empty_like(packed) for _ in range(P)]
    dist.all_gather(parts, packed, group=group)
    out, lse = parts[0][..., :D].clone(), parts[0][..., D].clone()
    for p in parts[1:]:
        merge_attention(out, lse, p[..., :D].contiguous(), p[..., D].contiguous())
    return out


# On the CPU a decode batch of short sessions is one fused call over a padded copy of their visible K/V
# (per layer at most B x this many tokens: a small working buffer, cheaper than B calls); longer
# sessions are attended one by one over their pages in place. The GPU always reads the pages.
CPU_BATCH_GATHER_TOKENS = 2048


def _scratch(pool, n: int, *, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two reusable (n, width) buffers kept on the pool (one step thread uses them), grown as needed: a
    fresh multi-MB tensor per layer would cost more in page faults than the attention."""
    buf = getattr(pool, "_scratch", None)
    if buf is None or buf[0].shape[0] < n:
        buf = (torch.empty(n, width, dtype=pool.k.dtype), torch.empty(n, width, dtype=pool.k.dtype))
        pool._scratch = buf
    return buf[0][:n], buf[1][:n]


def decode_gather_index(kvs: list[KVView], kv_len: torch.Tensor) -> torch.Tensor:
    """(B * T,) flat pool slots of storage [0, T) of each session, T = max(kv_len); a row's padding
    repeats a slot it holds (finite data: the padding is masked, but 0 x NaN would still be NaN)."""
    T = max(1, int(kv_len.max()))
    fill = next((kv.slots(0, 1)[0] for kv, n in zip(kvs, kv_len.tolist()) if n > 0), None)
    rows = []
    for kv, n in zip(kvs, kv_len.tolist()):
        idx = kv.slots(0, n) if n > 0 else torch.empty(0, dtype=torch.long)
        pad = (idx[:1] if n > 0 else (fill.view(1) if fill is not None else torch.zeros(1, dtype=torch.long)))
        rows.append(torch.cat([idx, pad.expand(T - n)]))
    return torch.cat(rows)


def _cpu_batch_attention(q: torch.Tensor, kvs: list[KVView], layer: int, kv_len: torch.Tensor, scale: float,
                         index: torch.Tensor):
    """q (B, H, D), one token per session, over storage [0, kv_len[b]) of session b: one gather of the
    visible K/V (`index`, from `decode_gather_index`) and one fused call."""
    B, H, D = q.shape
    pool = kvs[0].pool
    Hkv = pool.geometry.kv_heads
    G = H // Hkv
    T = index.numel() // B
    kbuf, vbuf = _scratch(pool, B * T, width=Hkv * D)
    torch.index_select(pool.flat("k", layer).view(-1, Hkv * D), 0, index, out=kbuf)
    torch.index_select(pool.flat("v", layer).view(-1, Hkv * D), 0, index, out=vbuf)
    k = kbuf.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
    v = vbuf.view(B, T, Hkv, D).transpose(1, 2)
    mask = torch.where(torch.arange(T)[None, :] < kv_len.clamp_min(1)[:, None], 0.0, float("-inf"))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.view(B, Hkv, G, D), k, v, 0.0, False, attn_mask=mask.to(q.dtype).view(B, 1, 1, T), scale=scale)
    out, lse = out.reshape(B, H, D).float(), lse.reshape(B, H).float()
    empty = kv_len == 0
    if bool(empty.any()):
        out[empty], lse[empty] = 0.0, float("-inf")
    return out, lse


def batch_decode_attention(group, q: torch.Tensor, kvs: list[KVView], layer: int, kv_len: torch.Tensor,
                           scale: float, backend: str = "auto", gather_index: torch.Tensor | None = None
                           ) -> torch.Tensor:
    """A decode batch: query b (of q (B, H, D)) attends storage slots [0, kv_len[b]) of session b's
    pages on this rank; with several ranks one all-gather merges the partials of the whole batch in
    rank order. `gather_index` (CPU, short sessions): see `decode_gather_index`. Returns out fp32 (B, H, D)."""
    B, H, D = q.shape
    if q.device.type != "cpu" or backend == "triton":  # one kernel call per KV format in the batch
        o = torch.empty(B, H, D, dtype=torch.float32, device=q.device)
        l = torch.empty(B, H, dtype=torch.float32, device=q.device)
        for fmt in dict.fromkeys(kv.format for kv in kvs):
            idx = [b for b, kv in enumerate(kvs) if kv.format == fmt]
            width = max(len(kvs[b].pages) for b in idx) or 1
            table = torch.zeros(len(idx), width, dtype=torch.int32)
            for i, b in enumerate(idx):
                table[i, :len(kvs[b].pages)] = torch.as_tensor(kvs[b].pages, dtype=torch.int32)
            kd, ks, vd, vs = kvs[idx[0]].layer(layer)
            lens = kv_len[idx]
            sel = torch.tensor(idx, device=q.device)
            oo, ll = paged_attention(q[sel].unsqueeze(1), kd, vd, table.to(q.device), lens.to(q.device).view(-1, 1),
                                     k_scales=ks, v_scales=vs, kv_format=fmt, max_len=int(lens.max()), scale=scale,
                                     out_dtype=torch.float32, backend="triton" if backend == "triton" else "auto")
            o[sel], l[sel] = oo[:, 0], ll[:, 0]
    elif gather_index is not None:
        o, l = _cpu_batch_attention(q, kvs, layer, kv_len, scale, gather_index)
    else:
        o = torch.zeros(B, H, D, dtype=torch.float32)
        l = torch.full((B, H), float("-inf"), dtype=torch.float32)
        for b, kv in enumerate(kvs):
            o[b:b + 1], l[b:b + 1] = attend_paged(q[b:b + 1], kv, layer, int(kv_len[b]), scale, backend)
    return merge_across_ranks(group, o, l)  # one collective per layer for the whole batch


# torch >= 2.12 names it all_gather_single (all_gather_into_tensor is deprecated); older torch has only the latter
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

PASS_Q_MAX_TOKENS = 4096  # a call longer than this always prefills with the ring
PASS_Q_MAX_SHARE = 1 / 16  # ... and so does one that is more than this share of the retained context


def choose_mode(n_new: int, n_context: int) -> str:
    """'ring' (pass-KV chunks) or 'replicated' (pass-Q) for a call adding n_new tokens after n_context.

    Decided once for the whole call (never per chunk). Pass-Q computes the projections and MLP of
    every new token on every rank and needs one collective per layer; the ring splits that work P
    ways at the cost of P - 1 transfers and two collectives per layer. So pass-Q only for what it is
    for: a short prompt (a question, a short append) against a long retained context — a few percent
    of it, as in Meta's context-parallel inference — and the ring for everything else.
    """
    if n_context == 0:
        return "ring"
    return "replicated" if n_new <= min(PASS_Q_MAX_TOKENS, n_context * PASS_Q_MAX_SHARE) else "ring"
