"""Paged KV memory: one preallocated pool of fixed-size pages per memory tier, and a session's pages.

Shape alphabet (as in model.py): L layers, Hkv KV heads, D head dim; N pages in a pool, S token slots
per page (the layout's round-robin `block`, 256 by default).

A page holds S consecutive storage slots of one session's shard on one rank, for every layer, K and V.
A pool keeps them as two tensors k, v of shape (L, N, S, Hkv, D):

  * one layer of the pool, `k[l]` (N, S, Hkv, D), is what attention reads through a page table
    (kernels/paged.py), and a run of consecutive page ids is one contiguous (n*S, Hkv, D) view, which
    the CPU path hands to PyTorch's fused attention without a copy;
  * a session's pages are its page table (a list of page ids) plus its length; storage slot i lies in
    page pages[i // S] at slot i % S. Appending allocates pages and writes into them; nothing is ever
    reallocated or concatenated as a session grows, and any free page serves any session.

The allocator prefers to extend a session's last run (and otherwise takes the smallest free run that
fits), so a session usually lies in a few runs; when free pages are scattered it takes them anyway —
fragmentation costs speed on the CPU path, never capacity.

The device pool counts the bytes it writes (new tokens' K/V) and copies (retained K/V moved in or
read out), so tests and benchmarks can check that serving a session touches only its new tokens.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PageGeometry:
    """The shape of one page; every pool of a store uses the same geometry."""

    layers: int  # L
    kv_heads: int  # Hkv
    head_dim: int  # D
    block: int  # S: token slots per page
    dtype: torch.dtype

    def __post_init__(self):
        for name in ("layers", "kv_heads", "head_dim", "block"):
            if getattr(self, name) < 1:
                raise ValueError(f"page geometry: {name} must be >= 1, got {getattr(self, name)}")

    @property
    def token_bytes(self) -> int:
        """Bytes of K and V of one token over all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    @property
    def page_bytes(self) -> int:
        return self.block * self.token_bytes

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.block)


def runs_of(pages: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive page ids as (index in `pages`, first page id, length)."""
    out: list[tuple[int, int, int]] = []
    for i, p in enumerate(pages):
        if out and out[-1][1] + out[-1][2] == p:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((i, p, 1))
    return out


class PagePool:
    """N pages of one geometry, preallocated once; `alloc` / `free` hand out page ids."""

    def __init__(self, geometry: PageGeometry, pages: int, *, device: str | torch.device = "cpu",
                 pinned: bool = False, touch: bool = False):
        g = self.geometry = geometry
        self.device = torch.device(device)
        self.pages = int(pages)
        shape = (g.layers, self.pages, g.block, g.kv_heads, g.head_dim)
        self.k = torch.empty(shape, dtype=g.dtype, device=self.device, pin_memory=pinned)
        self.v = torch.empty(shape, dtype=g.dtype, device=self.device, pin_memory=pinned)
        if touch and not pinned and self.device.type == "cpu":  # fault host memory in now, not during a move
            self.k.zero_(), self.v.zero_()
        self._free: list[tuple[int, int]] = [(0, self.pages)] if self.pages else []  # sorted (first, length)
        self.free_pages = self.pages
        self.bytes_written = 0
        self.bytes_copied = 0
        self.pages_allocated = 0

    # -- allocation -----------------------------------------------------------------------------------

    def alloc(self, n: int, after: int | None = None) -> list[int] | None:
        """n page ids, or None (nothing taken) if fewer are free. `after`: the session's last page, whose
        successor is taken first when free (the session's run grows in place)."""
        if n <= 0:
            return []
        if n > self.free_pages:
            return None
        out: list[int] = []
        if after is not None:
            i = bisect.bisect_left(self._free, (after + 1, 0))
            if i < len(self._free) and self._free[i][0] == after + 1:
                out += self._take(i, n)
        while len(out) < n:
            need = n - len(out)
            fits = [i for i, (_, ln) in enumerate(self._free) if ln >= need]
            if fits:  # the smallest free run that holds the rest
                i = min(fits, key=lambda j: (self._free[j][1], self._free[j][0]))
            else:  # scattered free pages: take the largest run, then the next
                i = max(range(len(self._free)), key=lambda j: (self._free[j][1], -self._free[j][0]))
            out += self._take(i, need)
        self.pages_allocated += n
        return out

    def _take(self, i: int, n: int) -> list[int]:
        first, ln = self._free[i]
        m = min(n, ln)
        if m == ln:
            del self._free[i]
        else:
            self._free[i] = (first + m, ln - m)
        self.free_pages -= m
        return list(range(first, first + m))

    def free(self, pages: list[int]) -> None:
        for _, first, n in runs_of(sorted(pages)):
            i = bisect.bisect(self._free, (first, n))
            self._free.insert(i, (first, n))
            if i + 1 < len(self._free) and first + n == self._free[i + 1][0]:  # merge with the next run
                self._free[i] = (first, n + self._free[i + 1][1])
                del self._free[i + 1]
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == first:  # and with the previous one
                self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
                del self._free[i]
            self.free_pages += n

    # -- addressing -----------------------------------------------------------------------------------

    def flat(self, which: str, layers: slice | int = slice(None)) -> torch.Tensor:
        """k or v of `layers` with pages and slots flattened: (..., N*S, Hkv, D), a view."""
        t = self.k if which == "k" else self.v
        g = self.geometry
        t = t[layers]
        return t.reshape(*t.shape[:-4], self.pages * g.block, g.kv_heads, g.head_dim)

    def slot_runs(self, pages: list[int], start: int, end: int, per_page: int | None = None
                  ) -> list[tuple[int, int, int]]:
        """Storage slots [start, end) of a session with these pages, as contiguous pieces of the flat
        pool: (storage offset, flat offset, length). per_page: token slots per page (a packed KV format
        holds more than `block`)."""
        S = per_page or self.geometry.block
        out = []
        for i, first, n in runs_of(pages):
            lo, hi = max(start, i * S), min(end, (i + n) * S)
            if hi > lo:
                out.append((lo, first * S + lo - i * S, hi - lo))
        return out

    def slots(self, pages: list[int], start: int, end: int, per_page: int | None = None) -> torch.Tensor:
        """(end - start,) int64 flat slot of each storage slot in [start, end), on the pool's device."""
        S = per_page or self.geometry.block
        i = torch.arange(start, end)
        table = torch.as_tensor(pages, dtype=torch.int64)
        return (table[i // S] * S + i % S).to(self.device)

    # -- bulk copies between pools (tier moves) and tensors (Redis values) ---------------------------

    def copy_pages_to(self, dst: "PagePool", src_pages: list[int], dst_pages: list[int], *, non_blocking=False) -> None:
        """Copy whole pages (all layers, K and V) into another pool, run by run."""
        S = self.geometry.block
        sk, sv, dk, dv = self.flat("k"), self.flat("v"), dst.flat("k"), dst.flat("v")
        i = 0
        while i < len(src_pages):  # the longest stretch where both sides are consecutive
            n = 1
            while (i + n < len(src_pages) and src_pages[i + n] == src_pages[i] + n
                   and dst_pages[i + n] == dst_pages[i] + n):
                n += 1
            a, b = src_pages[i] * S, dst_pages[i] * S
            dk[:, b:b + n * S].copy_(sk[:, a:a + n * S], non_blocking=non_blocking)
            dv[:, b:b + n * S].copy_(sv[:, a:a + n * S], non_blocking=non_blocking)
            i += n
        nbytes = len(src_pages) * self.geometry.page_bytes
        self.bytes_copied += nbytes  # each pool counts what was copied out of or into it
        dst.bytes_copied += nbytes

    def read(self, pages: list[int], layers: slice, start: int, end: int, dst_k: torch.Tensor,
             dst_v: torch.Tensor) -> None:
        """Copy storage slots [start, end) of `layers` into dst_k, dst_v (l, end - start, Hkv, D)."""
        k, v = self.flat("k", layers), self.flat("v", layers)
        for off, f, n in self.slot_runs(pages, start, end):
            dst_k[:, off - start:off - start + n].copy_(k[:, f:f + n])
            dst_v[:, off - start:off - start + n].copy_(v[:, f:f + n])
        self.bytes_copied += dst_k.numel() * dst_k.element_size() * 2

    def fill(self, pages: list[int], layers: slice, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v (l, T, Hkv, D) of `layers` into storage slots [start, start + T)."""
        dk, dv = self.flat("k", layers), self.flat("v", layers)
        end = start + k.shape[1]
        for off, f, n in self.slot_runs(pages, start, end):
            dk[:, f:f + n].copy_(k[:, off - start:off - start + n])  # blocking: k may be a reused staging buffer
            dv[:, f:f + n].copy_(v[:, off - start:off - start + n])
        self.bytes_copied += k.numel() * k.element_size() * 2


class KVView:
    """A session's pages on the device tier, as the engine and attention see them while a request runs.

    `pages` is the session's own page list (it grows when the store reserves more); `length` the
    storage slots holding tokens; `lay` the session's KV format (kvcodec.py: how many token slots a
    page holds and how they are packed). Writes go straight into the pool; reads are views or
    page-table kernel calls, never a working copy (the CPU path decodes a packed format per run).
    """

    def __init__(self, pool: PagePool, pages: list[int], length: int, session: str = "", lay=None):
        from .kvcodec import layout

        g = pool.geometry
        self.pool, self.pages, self.length, self.session = pool, pages, length, session
        self.lay = lay or layout("exact", g.block, g.kv_heads, g.head_dim, g.dtype)
        self.owner = None  # the store's record of the session while the view is leased
        self.prereserved = False  # pages for the whole request were reserved up front (by every rank)
        self._table: torch.Tensor | None = None
        self._table_len = -1

    @property
    def format(self) -> str:
        return self.lay.format

    @property
    def packed(self) -> bool:
        return self.lay.format != "exact"

    @property
    def block(self) -> int:
        """Token slots per page in this session's format."""
        return self.lay.tokens

    @property
    def capacity(self) -> int:
        return len(self.pages) * self.block

    def table(self) -> torch.Tensor:
        """(1, n_pages) int32 page table on the pool's device (rebuilt only when pages were added)."""
        if self._table_len != len(self.pages):
            self._table = torch.as_tensor(self.pages or [0], dtype=torch.int32).view(1, -1).to(self.pool.device)
            self._table_len = len(self.pages)
        return self._table

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """This layer of the pool in the session's format, for the paged kernel: k data (N, S_F, Hkv, Db),
        k scales (N, S_F, Hkv, ns) or None, v data, v scales."""
        from .kvcodec import views

        kd, ks = views(self.pool.k[layer], self.lay)
        vd, vs = views(self.pool.v[layer], self.lay)
        return kd, ks, vd, vs

    def layer_runs(self, layer: int, end: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Storage slots [0, end) of one layer as contiguous pieces [(storage offset, k, v)], each
        (n, Hkv, D) in the model dtype: views of the pool for the exact format, decoded per run of
        pages for a packed one."""
        if not self.packed:
            k, v = self.pool.flat("k", layer), self.pool.flat("v", layer)
            return [(off, k[f:f + n], v[f:f + n]) for off, f, n in self.pool.slot_runs(self.pages, 0, end)]
        from .kvcodec import decode

        kd, ks, vd, vs = self.layer(layer)
        S, dt = self.block, self.pool.geometry.dtype
        out = []
        for off, f, n in self.pool.slot_runs(self.pages, 0, end, S):
            pages = torch.arange(f // S, (f + n - 1) // S + 1)
            a, b = f - (f // S) * S, f - (f // S) * S + n

            def cut(t):
                return t[pages].flatten(0, 1)[a:b]
            out.append((off, decode(self.format, cut(kd), cut(ks), dt), decode(self.format, cut(vd), cut(vs), dt)))
        return out

    def slots(self, start: int, end: int) -> torch.Tensor:
        """Flat slot (page * S_F + slot) of storage slots [start, end) in this session's format."""
        return self.pool.slots(self.pages, start, end, self.block)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (T, Hkv, D) of one layer at the flat slots `slots` (T,) (from `slots()`), encoded in
        the session's format."""
        if k.shape[0] == 0:
            return
        if not self.packed:
            self.pool.flat("k", layer).index_copy_(0, slots, k)
            self.pool.flat("v", layer).index_copy_(0, slots, v)
        else:
            from .kvcodec import encode

            kd, ks, vd, vs = self.layer(layer)
            page, slot = slots // self.block, slots % self.block
            for data, scales, x in ((kd, ks, k), (vd, vs, v)):
                d, sc = encode(self.format, x)
                data[page, slot] = d
                scales[page, slot] = sc.to(scales.dtype)
        self.pool.bytes_written += 2 * k.shape[0] * k.shape[1] * k.shape[2] * k.element_size() * \
            self.pool.geometry.block // self.block  # the bytes the tokens take in their pages
