"""Which rank of a sequence-parallel group holds which positions of a session (`ShardLayout`).

  * a prefill chunk of n tokens is cut into 2P near-equal pieces and rank r holds pieces r and
    2P-1-r ("zigzag"), so every rank does the same causal work;
  * tokens added a few at a time (a question, generated tokens) go to ranks round-robin in blocks of
    `block` tokens, so shards stay balanced as a conversation grows.

Every rank stores its tokens in position order, so for any query the keys it sees form a prefix of
the rank's storage. The layout is identical on every rank and is kept with the session's KV (its
meta), so a restored session knows where its tokens are. Pure Python, no process groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Segment = tuple[int, int]  # (first position, length)


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
    # tokens each rank no longer stores (a KEEP session's eviction): its storage is its positions minus
    # these, still in position order; `local_counts` is what each rank stores
    evicted: list[int] | None = None

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
            counts = self.local_counts()
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

    def truncate(self, length: int) -> None:
        """Forget every position >= length. Only tokens added round-robin (after the last prefill chunk)
        can be cut part-way; a prefill chunk goes whole or stays whole."""
        while self.regions and self.regions[-1].start >= length:
            self.regions.pop()
        if self.regions and self.regions[-1].end > length:
            if self.regions[-1].kind != "blocks":
                raise ValueError("can only cut back tokens added after the prefill")
            self.regions[-1].end = length

    def local_tokens(self, rank: int) -> int:
        return self.local_counts()[rank]

    def local_counts(self) -> list[int]:
        """Tokens each rank holds, by arithmetic over the regions (no segment lists)."""
        counts = [0] * self.P
        for reg in self.regions:
            n = reg.end - reg.start
            if reg.kind == "zigzag":
                sizes = split_even(n, 2 * self.P)
                for r in range(self.P):
                    counts[r] += sizes[r] + sizes[2 * self.P - 1 - r]
                continue
            full, rem = divmod(n, self.block)  # block i goes to rank (i + first_owner) % P
            for r in range(self.P):
                counts[r] += (full // self.P + ((r - reg.first_owner) % self.P < full % self.P)) * self.block
            if rem:
                counts[(full + reg.first_owner) % self.P] += rem
        if self.evicted:
            counts = [c - e for c, e in zip(counts, self.evicted)]
        return counts

    def to_dict(self) -> dict:
        d = {"P": self.P, "block": self.block, "regions": [[r.start, r.end, r.kind, r.first_owner] for r in self.regions]}
        if self.evicted:
            d["evicted"] = list(self.evicted)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ShardLayout":
        return cls(d["P"], d["block"], [_Region(*r) for r in d["regions"]], d.get("evicted"))


def positions_of(segs: list[Segment], device=None) -> torch.Tensor:
    """(T,) int64 positions covered by `segs`, in order."""
    if not segs:
        return torch.empty(0, dtype=torch.long, device=device)
    return torch.cat([torch.arange(p, p + n, device=device) for p, n in segs])
