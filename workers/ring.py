"""Sequence parallelism: which rank holds which tokens, ring-attention prefill, and SP decode.

Pure functions and one small communication object (`RingComm`); the process group is always an
argument, never a global. Shapes: T tokens, H query heads, Hkv KV heads, D head dim, P ranks.

How a session's tokens are spread over the P ranks of a group (`ShardLayout`):
  * a prefill chunk of n tokens is cut into 2P near-equal pieces and rank r holds pieces r and
    2P-1-r ("zigzag"), so every rank does the same causal work;
  * tokens added a few at a time (a question, generated tokens) go to ranks round-robin in blocks of
    `block` tokens, so shards stay balanced as a conversation grows.
Every rank stores its tokens in position order, so for any query the keys it sees entirely form a
prefix of the rank's storage, and only the blocks that straddle the diagonal need a causal mask.

Two ways of computing attention for new tokens:
  * pass-KV (`ring_attention`): each rank computes Q/K/V only for its own share of the new tokens;
    K/V shards travel the ring with batched isend/irecv, the transfer for step s+1 posted before
    step s's attention runs (double buffering). Used for prefill chunks.
  * pass-Q (`replicated_attention`): every rank runs the (cheap, replicated) projections for all
    new tokens, attends them over its own shard, and one all-gather per layer merges the partial
    (out, lse). Used for decode and for short appends against a long context.
`choose_mode` picks between them by the bytes each would move.
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ringserve.kernels import MAX_QUERY_TOKENS, decode_attention, flash_attention, merge_attention

Segment = tuple[int, int]  # (first position, length)


# ------------------------------------------------------------------------------------------ layout


def split_even(n: int, parts: int) -> list[int]:
    """Sizes of `parts` consecutive pieces of n items, the first n % parts one larger."""
    q, r = divmod(n, parts)
    return [q + (i < r) for i in range(parts)]


def zigzag_segments(start: int, n: int, P: int) -> list[list[Segment]]:
    """Per rank, the segments of a zigzag-sharded chunk of positions start..start+n-1."""
    sizes = split_even(n, 2 * P)
    bounds = [start]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    out = []
    for r in range(P):
        segs = [(bounds[i], sizes[i]) for i in (r, 2 * P - 1 - r) if sizes[i] > 0]
        out.append(merge_segments(segs))  # P = 1: the two pieces touch
    return out


def merge_segments(segs: list[Segment]) -> list[Segment]:
    """Coalesce touching segments (input sorted by position)."""
    out: list[Segment] = []
    for p, n in segs:
        if n == 0:
            continue
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((p, n))
    return out


@dataclass
class _Region:
    start: int
    end: int
    kind: str  # "zigzag" or "blocks"
    first_owner: int = 0  # blocks: the rank that holds the region's first block


@dataclass
class ShardLayout:
    """Which rank holds which positions of one session; identical on every rank of a group."""

    P: int
    block: int = 256
    regions: list[_Region] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.regions[-1].end if self.regions else 0

    def add_zigzag(self, n: int) -> list[list[Segment]]:
        """Append a prefill chunk of n tokens; returns each rank's new segments."""
        s = self.length
        self.regions.append(_Region(s, s + n, "zigzag"))
        return zigzag_segments(s, n, self.P)

    def add_blocks(self, n: int) -> list[list[Segment]]:
        """Append n tokens round-robin by block; returns each rank's new segments."""
        s = self.length
        last = self.regions[-1] if self.regions else None
        if last is not None and last.kind == "blocks":
            last.end += n
            reg = last
        else:
            counts = [sum(n for _, n in self.segments(r)) for r in range(self.P)]
            reg = _Region(s, s + n, "blocks", first_owner=min(range(self.P), key=lambda r: (counts[r], r)))
            self.regions.append(reg)
        return [self._block_segments(reg, r, s, s + n) for r in range(self.P)]

    def _block_segments(self, reg: _Region, rank: int, lo: int, hi: int) -> list[Segment]:
        segs = []
        b0 = (lo - reg.start) // self.block
        b1 = (hi - 1 - reg.start) // self.block if hi > lo else b0 - 1
        for b in range(b0, b1 + 1):
            if (b + reg.first_owner) % self.P != rank:
                continue
            p0 = max(lo, reg.start + b * self.block)
            p1 = min(hi, reg.start + (b + 1) * self.block)
            if p1 > p0:
                segs.append((p0, p1 - p0))
        return segs

    def segments(self, rank: int) -> list[Segment]:
        """All positions rank holds, in storage (= position) order, coalesced."""
        segs: list[Segment] = []
        for reg in self.regions:
            if reg.kind == "zigzag":
                segs += zigzag_segments(reg.start, reg.end - reg.start, self.P)[rank]
            else:
                segs += self._block_segments(reg, rank, reg.start, reg.end)
        return merge_segments(segs)

    def owner(self, pos: int) -> int:
        for reg in self.regions:
            if reg.start <= pos < reg.end:
                if reg.kind == "blocks":
                    return ((pos - reg.start) // self.block + reg.first_owner) % self.P
                return next(r for r, segs in enumerate(zigzag_segments(reg.start, reg.end - reg.start, self.P))
                            if any(p <= pos < p + n for p, n in segs))
        raise IndexError(f"position {pos} is beyond the session's {self.length} tokens")

    def to_dict(self) -> dict:
        return {"P": self.P, "block": self.block,
                "regions": [[r.start, r.end, r.kind, r.first_owner] for r in self.regions]}

    @classmethod
    def from_dict(cls, d: dict) -> "ShardLayout":
        return cls(d["P"], d["block"], [_Region(*r) for r in d["regions"]])


def positions_of(segs: list[Segment], device=None) -> torch.Tensor:
    """(T,) int64 positions covered by `segs`, in order."""
    if not segs:
        return torch.empty(0, dtype=torch.long, device=device)
    return torch.cat([torch.arange(p, p + n, device=device) for p, n in segs])


# --------------------------------------------------------------------------------- local attention


def _attn(q, k, v, *, causal: bool, q_start: int, k_start: int, scale: float, backend: str = "auto"):
    """(out fp32 (Tq, H, D), lse (Tq, H)) of q over k/v with the position-offset causal mask.

    On CUDA this is `kernels.flash_attention`; on the CPU, PyTorch's fused CPU flash-attention op,
    which returns the LSE too (much faster than the plain reference for long prompts).
    """
    if q.device.type != "cpu":
        if not causal and q.shape[0] <= MAX_QUERY_TOKENS and backend == "auto":  # decode: split-KV kernel
            return decode_attention(q, k, v, scale=scale, out_dtype=torch.float32)
        return flash_attention(q, k, v, causal=causal, q_start=q_start, k_start=k_start, scale=scale,
                               out_dtype=torch.float32, backend=backend)
    Tq, H, D = q.shape
    Tk, Hkv, _ = k.shape
    rep = H // Hkv
    qb = q.transpose(0, 1).unsqueeze(0)  # (1, H, Tq, D)
    kb = (k.repeat_interleave(rep, 1) if rep > 1 else k).transpose(0, 1).unsqueeze(0)  # (1, H, Tk, D)
    vb = (v.repeat_interleave(rep, 1) if rep > 1 else v).transpose(0, 1).unsqueeze(0)
    mask = None
    empty_rows = None
    if causal:
        diag = q_start - k_start  # query i sees key j when j <= i + diag
        if diag < Tk - 1:  # some key is masked for some query
            qi = torch.arange(Tq)[:, None]
            kj = torch.arange(Tk)[None, :]
            visible = kj <= qi + diag
            mask = torch.zeros(Tq, Tk, dtype=q.dtype).masked_fill_(~visible, float("-inf"))
            if diag < 0:
                empty_rows = (torch.arange(Tq) + diag) < 0  # rows that see no key at all
                mask[empty_rows] = 0.0  # keep the op finite; fixed up below
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qb, kb, vb, 0.0, False,
                                                                           attn_mask=mask, scale=scale)
    out = out[0].transpose(0, 1).float()  # (Tq, H, D)
    lse = lse[0].transpose(0, 1).float()  # (Tq, H)
    if empty_rows is not None and bool(empty_rows.any()):
        out[empty_rows] = 0.0
        lse[empty_rows] = float("-inf")
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

    def send_recv(self, send: torch.Tensor, recv: torch.Tensor):
        ops = [dist.P2POp(dist.isend, send, self.next, self.group),
               dist.P2POp(dist.irecv, recv, self.prev, self.group)]
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


def ring_attention(comm: RingComm, q: torch.Tensor, q_segs: list[Segment], k: torch.Tensor, v: torch.Tensor,
                   segs_by_rank: list[list[Segment]], scale: float, *, overlap: bool = True,
                   backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Pass-KV ring attention. q (Tq, H, D) with positions q_segs; k/v (Tk, Hkv, D): this rank's
    whole shard (earlier context and the new chunk), whose positions are segs_by_rank[rank].
    K and V travel as one buffer; shard sizes come from the layout, so receives are sized exactly.
    overlap=False waits for each transfer before computing (to measure what overlap hides).
    Returns (out fp32 (Tq, H, D), lse (Tq, H))."""
    P, rank = comm.world, comm.rank
    Hkv, D = k.shape[1], k.shape[2]
    sizes = [sum(n for _, n in s) for s in segs_by_rank]
    cur = torch.stack([k, v])  # (2, Tk, Hkv, D), contiguous: one message per step
    out = lse = None
    for step in range(P):
        src = (rank - step) % P
        if step + 1 < P:
            nxt = torch.empty((2, sizes[(rank - step - 1) % P], Hkv, D), dtype=k.dtype, device=k.device)
            comm.send_recv(cur, nxt)
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
            cur = nxt
    return out, lse


def replicated_attention(group, q: torch.Tensor, q_start: int, k: torch.Tensor, v: torch.Tensor,
                         k_segs: list[Segment], scale: float) -> torch.Tensor:
    """Pass-Q / SP decode: every rank holds the same q (T, H, D) for positions q_start..q_start+T-1,
    attends it over its own shard k/v, and one all-gather merges the partial (out, lse) in rank
    order (so every rank computes bit-identical outputs). Returns out fp32 (T, H, D)."""
    T, H, D = q.shape
    o, l = attend_segments(q, [(q_start, T)], k, v, k_segs, scale)
    P = dist.get_world_size(group)
    if P == 1:
        return o
    packed = torch.cat([o, l.unsqueeze(-1)], dim=-1)  # (T, H, D+1): one collective per layer
    parts = [torch.empty_like(packed) for _ in range(P)]
    dist.all_gather(parts, packed, group=group)
    out, lse = parts[0][..., :D].clone(), parts[0][..., D].clone()
    for p in parts[1:]:
        merge_attention(out, lse, p[..., :D].contiguous(), p[..., D].contiguous())
    return out


def choose_mode(n_new: int, n_context: int, H: int, Hkv: int) -> str:
    """'ring' (pass-KV) or 'replicated' (pass-Q) for n_new tokens after n_context cached ones.

    Pass-KV moves every rank's K/V shard around the ring: ~ (n_context + n_new) * 2 * Hkv values
    per layer. Pass-Q moves the partial outputs and LSE of the new tokens: ~ n_new * (H + H/D) values
    per rank, gathered from P ranks, and computes the projections of all new tokens on every rank,
    so it is chosen only while the new tokens are few (the Meta context-parallelism heuristic).
    """
    if n_context == 0:
        return "ring"
    kv_bytes = (n_context + n_new) * 2 * Hkv
    q_bytes = n_new * H * 4  # fp32 partials vs bf16 K/V, and replicated projections
    return "replicated" if q_bytes < kv_bytes and n_new <= 4096 else "ring"
