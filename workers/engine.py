"""The per-rank engine: a model, this rank's paged KV store, chunked prefill and generation.

There is one engine. A sequence-parallel group runs P of them, one per rank, joined by a process
group; `ringserve generate` runs one with P = 1 and no process group. Every rank of a group calls the
same methods with the same arguments in the same order (the group driver fans each call out); the
ranks exchange K/V (prefill chunks) or partial attention outputs (pass-Q, decode) through the
process group. No Ray inside, so tests drive P engines as spawned processes joined by gloo.

The engine owns chunking: a create or a long append is one call that prefills `prefill_chunk`
tokens at a time with ring attention (pass-KV) and yields `Progress` after every chunk; how the
call's tokens are attended (`ring` or `replicated`) is chosen once for the whole call
(`ring.choose_mode`) and recorded per chunk in `modes`. The KV lives in the store's pages (kvstore.py)
for the whole life of a session: a request leases the session's pages, writes its new tokens into
fresh pages and attends the rest in place. Nothing is copied in or out per request.

The one context-limit rule is `protocol.ContextLimit`; the one prompt check is `_check_ids`.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable, Generator, Iterator, Sequence

import torch

from ringserve.kernels import merge_attention

from .kvpages import KVView, PageGeometry
from .kvpolicy import TierCapacity
from .kvstore import KVStore
from .layout import ShardLayout, positions_of
from .loader import LoadedModel
from .protocol import (ContextLimit, GenerationEnd, KVCapacityError, KVNotFoundError, Progress, PromptError,
                       SessionError)
from .ring import (CPU_BATCH_GATHER_TOKENS, RingComm, batch_decode_attention, choose_mode, context_attention,
                   decode_gather_index, replicated_attention, ring_attention)
from .sampling import SamplingParams

# Tokens per prefill chunk when the config does not say. The chunk bounds activation memory (each rank
# holds the activations of prefill_chunk / P tokens per layer) and sets how often progress is reported
# and how soon a long create could yield to other work. On a GPU the chunk must be long enough that the
# ring's transfers hide behind attention (ANCHORS: ~350-700 local query tokens per step over NVLink,
# ~2.8K-5.5K over InfiniBand), so 32K tokens (4K per rank at P = 8) — the middle of the 16K-64K range
# vLLM and Meta's context-parallel inference use. Not yet measured on a GPU here (BENCHMARKS.md). On
# the CPU, 8K tokens keeps a chunk's activations under ~1 GB for the default model.
DEFAULT_PREFILL_CHUNK = {"cuda": 32768, "cpu": 8192}


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stop_reason: str = ""  # "stop" (a stop token), "length" (max_tokens), or "context" (limit reached)
    retained_tokens: int = 0  # tokens the session grew by (a retained turn)


@dataclass(frozen=True)
class ModeRecord:
    """One prefill chunk (or pass-Q call) as the engine ran it."""

    session: str
    mode: str  # "ring" | "replicated"
    tokens: int  # new tokens of the chunk (all ranks)
    context: int  # session tokens before the chunk


def default_kv_device_bytes(geometry: PageGeometry, max_context: int, world: int, device: torch.device) -> int:
    """Device-tier bytes per rank when the config gives none: on a GPU 80 % of the memory free after the
    weights were loaded; elsewhere room for two sessions of the full context (a CPU pool is reserved,
    not touched, until pages are used)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.8 * free)
    per_rank = -(-max_context // world) + 2 * geometry.block
    return 2 * geometry.pages_for(per_rank) * geometry.page_bytes


class ShardEngine:
    """The engine of one rank of a sequence-parallel group (P = 1 without a process group).

    store: this rank's KV store (the group makes one with tiers and Redis); None makes a device-only
    store of `kv_device_bytes` (default: `default_kv_device_bytes`). max_context lowers the model's
    context limit (raising it past the model's needs beyond_model). Sampling happens on rank 0 and
    the token is broadcast, so all ranks continue with the same token.
    """

    def __init__(self, loaded: LoadedModel, group=None, *, store: KVStore | None = None,
                 max_context: int | None = None, prefill_chunk: int | None = None, block: int = 256,
                 timeout_s: float = 120.0, overlap: bool = True, attn_backend: str = "auto",
                 kv_device_bytes: int | None = None, beyond_model: bool = False):
        import torch.distributed as dist

        self.loaded, self.model, self.cfg = loaded, loaded.model, loaded.config
        self.tokenizer = loaded.tokenizer
        self.rank = dist.get_rank(group) if group is not None else 0
        self.world = dist.get_world_size(group) if group is not None else 1
        self.group = group if self.world > 1 else None
        self.comm = RingComm(group, timeout_s) if self.group is not None else None
        # a configured max_context may lower the model's limit; raising it needs beyond_model
        self.limit = ContextLimit.of(self.cfg, max_context, beyond_model)
        p = next(self.model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.prefill_chunk = prefill_chunk or DEFAULT_PREFILL_CHUNK.get(self.device.type, 8192)
        self.block = block
        self.overlap, self.attn_backend = overlap, attn_backend  # ring overlap; kernels backend
        self.scale = self.cfg.head_dim ** -0.5
        self.geometry = PageGeometry(self.cfg.n_layers, self.cfg.n_kv_heads, self.cfg.head_dim, block, self.dtype)
        if store is None:
            nbytes = kv_device_bytes or default_kv_device_bytes(self.geometry, self.limit.max_tokens, self.world,
                                                                self.device)
            store = KVStore(f"local{self.world}-r{self.rank}", loaded.fingerprint, self.geometry,
                            TierCapacity(device=nbytes, host=0), device=self.device)
        if store.geometry != self.geometry:
            raise ValueError(f"the KV store's page geometry {store.geometry} does not match the model's {self.geometry}")
        self.store = store
        # the engine's own record of how each chunk was attended: the last chunks, and counts of all
        self.modes: deque[ModeRecord] = deque(maxlen=4096)
        self.mode_counts: Counter[str] = Counter()

    # -- sessions ------------------------------------------------------------------------------------

    def _layout(self, sid: str) -> ShardLayout:
        try:
            return ShardLayout.from_dict(self.store.meta(sid)["layout"])
        except KVNotFoundError:
            raise SessionError(f"session {sid!r} is not held by this group") from None

    @staticmethod
    def _meta(layout: ShardLayout, base: dict | None = None, added: Sequence[int] = ()) -> dict:
        """A session's meta after its layout changed: the layout, the length, and its last token ids (what
        KEEP probes the future queries with), keeping what `base` held."""
        from .keep import PROBE

        m = dict(base or {})
        m.update(layout=layout.to_dict(), length=layout.length)
        if added:
            m["tail"] = (list(m.get("tail", [])) + [int(t) for t in added])[-PROBE:]
        return m

    def length(self, sid: str) -> int:
        """Tokens of the whole session (all ranks)."""
        return self._layout(sid).length

    def drop(self, sid: str) -> None:
        """Forget session `sid` on this rank, on every tier (Redis included)."""
        try:
            self.store.delete(sid)
        except KVNotFoundError:
            pass

    def restore(self, sid: str) -> None:
        """Adopt a persisted session (written by another group with the same P) from Redis."""
        try:
            self.store.restore(sid)
        except KVNotFoundError as e:
            raise SessionError(f"session {sid!r} was never persisted to Redis ({e})") from None

    def _check_ids(self, ids: Sequence[int]) -> None:
        if len(ids) == 0:
            raise PromptError("the prompt is empty: give at least one token of text")
        V = self.cfg.vocab_size
        bad = [i for i in ids if not 0 <= i < V]
        if bad:
            raise PromptError(f"token ids out of range [0, {V}): {bad[:5]}")

    # -- create / append -----------------------------------------------------------------------------

    def scores(self, sid: str, ids: Sequence[int], *, progress: Callable[[int, int], None] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Create session `sid` from `ids` and return this rank's logits of every position it holds:
        (logits (T_local, V), positions) — for scoring and tests; serving never needs them."""
        self._check_ids(ids)
        self.limit.check_add(0, len(ids))
        layout = ShardLayout(self.world, self.block)
        self.store.create(sid, meta=self._meta(layout))
        try:
            with self.store.lease(sid) as kv:
                out = _drive(self._extend(sid, kv, layout, ids, "ring", "all"), progress)
                self.store.commit(sid, kv.length, self._meta(layout))
        except BaseException:
            self.drop(sid)
            raise
        return out

    # -- the served path, driven here: the same executor and step plans a group's scheduler uses --------

    def _local(self):
        """A scheduler core and an executor of this rank's own: every rank of a group that makes the same
        calls plans the same steps (the core is deterministic), so the ranks stay in lockstep."""
        if getattr(self, "_core", None) is None:
            from .executor import StepExecutor
            from .scheduler import SchedulerConfig, SchedulerCore

            self._core = SchedulerCore(SchedulerConfig(self.prefill_chunk))
            self._executor = StepExecutor(self, keep_logits=True)
        return self._core, self._executor

    def _run(self, kind: str, sid: str, ids: Sequence[int], **kw):
        from .scheduler import run_local

        core, ex = self._local()
        h = core.submit(kind, sid, ids, **kw)
        return h, ex, run_local(core, ex, h)

    def prefill(self, sid: str, ids: Sequence[int], *, progress: Callable[[int, int], None] | None = None,
                logits: str = "last", **opts):
        """Create session `sid` from `ids` (chunked ring prefill) and retain its KV. Returns the last
        token's logits (1, V) on every rank; logits="all" returns `scores` instead. opts: retention,
        persist ("on_demote" / "write_through"), ttl_s, allow_quantized."""
        if logits == "all":
            return self.scores(sid, ids, progress=progress)
        h, ex, items = self._run("create", sid, ids, opts=opts)
        _report(items, progress)
        return ex.last_logits.pop(h.id)

    def append(self, sid: str, ids: Sequence[int], *, progress: Callable[[int, int], None] | None = None
               ) -> torch.Tensor:
        """Add `ids` (a turn, a document) after the session's tokens and keep them; returns the last
        token's logits (1, V) on every rank."""
        h, ex, items = self._run("append", sid, ids)
        _report(items, progress)
        return ex.last_logits.pop(h.id)

    def set_format(self, sid: str, kv_format: str, keep_fraction: float | None = None) -> None:
        """Move a session to a smaller KV format ("fp8", "int4"), or keep a fraction of its tokens ("keep",
        chosen by expected attention — workers/keep.py)."""
        _, _, items = self._run("convert", sid, [], opts={"kv_format": kv_format, "keep_fraction": keep_fraction})
        for _ in items:
            pass

    def generate(self, sid: str, ids: Sequence[int], params: SamplingParams = SamplingParams(), *,
                 retain: bool = False, stop_ids: frozenset[int] | None = None,
                 stats: GenerationStats | None = None) -> Iterator[int]:
        """Add `ids` (e.g. a question) to session `sid` and yield generated tokens (a stop token is not
        yielded). With `retain` the question, the answer and the stop token stay in the session;
        without, the session is afterwards as it was."""
        stats = stats if stats is not None else GenerationStats()
        t0 = time.perf_counter()
        first = None
        _, _, items = self._run("generate", sid, ids, sampling=params, retain=retain,
                                stop_ids=None if stop_ids is None else tuple(stop_ids))
        try:
            for item in items:
                if isinstance(item, int):
                    if first is None:
                        first = time.perf_counter()
                    yield item
                elif isinstance(item, GenerationEnd):
                    stats.prompt_tokens, stats.generated_tokens = item.prompt_tokens, item.generated_tokens
                    stats.stop_reason, stats.retained_tokens = item.reason, item.retained_tokens
        finally:
            end = time.perf_counter()
            stats.prefill_s = (first or end) - t0
            stats.decode_s = end - (first or end)

    def _extend(self, sid: str, kv: KVView, layout: ShardLayout, ids: Sequence[int], mode: str, logits: str
                ) -> Generator[Progress, None, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """The one chunk loop: add `ids` after the session's tokens, `prefill_chunk` tokens at a time,
        attended by `mode`; yields Progress after each chunk. kv.length follows this rank's storage."""
        ids_t = torch.as_tensor(list(ids), dtype=torch.long)
        total, done, base = len(ids), 0, layout.length
        last, all_logits, all_pos = None, [], []
        while done < total:
            n = min(self.prefill_chunk, total - done)
            final = done + n == total
            if mode == "ring":
                y, pos = self._ring_chunk(kv, layout, ids_t[done:done + n], "all" if logits == "all" else
                                          ("last" if final else "none"))
            elif mode == "replicated":
                y, pos = self._replicated_chunk(kv, layout, ids_t[done:done + n], "last" if final else "none"), None
            else:
                raise ValueError(f"mode must be 'ring' or 'replicated', got {mode!r}")
            self.modes.append(ModeRecord(sid, mode, n, base + done))
            self.mode_counts[mode] += 1
            if logits == "all":
                all_logits.append(y)
                all_pos.append(pos)
            elif final:
                last = y
            done += n
            yield Progress(done, total)
        if logits == "all":
            return torch.cat(all_logits), torch.cat(all_pos)
        return last

    @torch.inference_mode()
    def _ring_chunk(self, kv: KVView, layout: ShardLayout, ids: torch.Tensor, logits: str):
        """One prefill chunk, pass-KV: this rank computes its zigzag share; returns (logits, positions):
        "all": this rank's rows; "last": the chunk's last token's (1, V) on every rank; "none": None."""
        n, s = ids.numel(), layout.length
        before = layout.local_counts()
        new = layout.add_zigzag(n)
        mine = new[self.rank]
        pos = positions_of(mine)
        ctx = kv.length
        self._reserve(kv, before, layout.local_counts())
        attn = _RingChunk(self, kv, kv.slots(ctx, ctx + pos.numel()), mine, new, ctx, has_context=s > 0)
        owner = layout.owner(s + n - 1)
        mode = "all" if logits == "all" else ("last" if logits == "last" and owner == self.rank else "none")
        y = self.model(ids[pos - s].to(self.device), pos.to(self.device), attn, logits=mode, seq_len=s + n)
        kv.length += pos.numel()
        if logits == "last":
            return self._share(y if owner == self.rank else None, owner), pos
        return (y if logits == "all" else None), pos

    @torch.inference_mode()
    def _replicated_chunk(self, kv: KVView, layout: ShardLayout, ids: torch.Tensor, logits: str):
        """Pass-Q: every rank computes all n new tokens and stores the rows it owns (round-robin blocks).
        Query t (position s + t) sees this rank's earlier tokens and its new rows at positions <= s + t."""
        n, s = ids.numel(), layout.length
        before = layout.local_counts()
        mine = layout.add_blocks(n)[self.rank]
        rows = positions_of(mine) - s  # (n_local,) which of the new tokens this rank stores
        ctx = kv.length
        self._reserve(kv, before, layout.local_counts())
        kv_len = ctx + torch.searchsorted(rows, torch.arange(n), right=True)  # (n,)
        attn = _Replicated(self, kv, kv.slots(ctx, ctx + rows.numel()), rows.to(self.device), kv_len)
        pos = torch.arange(s, s + n, device=self.device)
        y = self.model(ids.to(self.device), pos, attn, logits=logits, seq_len=s + n)
        kv.length += rows.numel()
        return y

    def _reserve(self, kv: KVView, before: list[int], after: list[int]) -> None:
        """Pages for this rank's new tokens, agreed by every rank: each rank knows from the layout which
        ranks cross a page boundary; when any does, they agree (`agree`) whether all got their pages,
        and if one did not, every rank raises the same KVCapacityError (with that rank's numbers), so no
        rank is left waiting in a collective the others never reach. Nothing to do when the request's
        pages were reserved up front (the scheduler's admission)."""
        def pages(n):  # in the session's format
            return -(-n // kv.block)
        if kv.prereserved or all(pages(a) == pages(b) for a, b in zip(after, before)):
            return
        err = None
        try:
            self.store.reserve(kv.session, after[self.rank])
        except KVCapacityError as e:
            err = e
        (err,) = self.agree([err])
        if err is not None:
            raise err

    def agree(self, errors: list[BaseException | None]) -> list[BaseException | None]:
        """Per item, the error any rank had (the first rank's that failed), the same on every rank; one
        all-reduce when nothing failed anywhere, and an all-gather of the errors only when something did."""
        if self.group is None or not errors:
            return errors
        import torch.distributed as dist

        ok = torch.tensor([e is None for e in errors], dtype=torch.int32, device=self.device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.group)
        if bool(ok.all()):
            return [None] * len(errors)
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, [None if e is None else e for e in errors], group=self.group)
        out = []
        for i, good in enumerate(ok.tolist()):
            out.append(None if good else next(g[i] for g in gathered if g[i] is not None))
        return out

    @torch.inference_mode()
    def decode_batch(self, items: list[tuple[KVView, ShardLayout, int]]) -> torch.Tensor:
        """One new token for each of B sessions in one forward: items are (pages, layout, token); each
        token goes after its session's tokens (round-robin block owner stores its K/V; pages must be
        reserved). Returns logits (B, V), identical on every rank."""
        B = len(items)
        owned, slots, kv_len, positions = [], [], [], []
        for b, (kv, layout, _) in enumerate(items):
            positions.append(layout.length)
            mine = layout.add_blocks(1)[self.rank]
            if mine:
                if kv.capacity < kv.length + 1:
                    raise RuntimeError(f"session {kv.session!r}: decode_batch needs its pages reserved first")
                owned.append(b)
                slots.append(kv.slots(kv.length, kv.length + 1))
            kv_len.append(kv.length + (1 if mine else 0))
        attn = _BatchDecode(self, [kv for kv, _, _ in items], torch.tensor(owned, dtype=torch.long, device=self.device),
                            torch.cat(slots) if slots else None, torch.tensor(kv_len, dtype=torch.int32))
        tokens = torch.tensor([t for _, _, t in items], dtype=torch.long, device=self.device)
        y = self.model(tokens, torch.tensor(positions, device=self.device), attn, logits="all",
                       seq_len=max(positions) + 1)
        for b in owned:
            items[b][0].length += 1
        self.mode_counts["decode"] += B  # tokens decoded in batches
        return y  # (B, V)

    @torch.inference_mode()
    def probe(self, kv: KVView, layout: ShardLayout, ids: Sequence[int]) -> list[torch.Tensor]:
        """The queries (W, H, D) after RoPE at every layer of the session's own last len(ids) tokens `ids`,
        attending the session as it is stored; nothing is written. The same on every rank."""
        n = len(ids)
        pos = torch.arange(layout.length - n, layout.length)
        local = positions_of(layout.segments(self.rank))
        kv_len = torch.searchsorted(local, pos, right=True)
        qs: list[torch.Tensor] = []

        def attn(layer, q, k, v):
            qs.append(q.float().clone())
            return replicated_attention(self.group, q, kv, layer, kv_len, self.scale, self.attn_backend).to(q.dtype)
        self.model(torch.as_tensor(list(ids), device=self.device), pos.to(self.device), attn, logits="none",
                   seq_len=layout.length)
        return qs

    def _share(self, logits, src: int) -> torch.Tensor:
        """Logits (1, V) from rank `src` to every rank."""
        if self.group is None:
            return logits
        import torch.distributed as dist

        buf = logits.contiguous() if logits is not None else torch.empty(1, self.cfg.vocab_size, dtype=torch.float32, device=self.device)
        dist.broadcast(buf, dist.get_global_rank(self.group, src), group=self.group)
        return buf

def _report(items: Iterator, progress: Callable[[int, int], None] | None) -> None:
    for item in items:
        if isinstance(item, Progress) and progress is not None:
            progress(item.done, item.total)


def _drive(steps: Generator, progress: Callable[[int, int], None] | None = None):
    """Run a step generator to its end, reporting Progress to `progress`; returns its value."""
    while True:
        try:
            ev = next(steps)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(ev.done, ev.total)


class _RingChunk:
    """Attention of one prefill chunk: its K/V into this rank's pages, pass-KV ring over the chunk,
    and the chunk's queries against the retained context in place; the partials merge by LSE."""

    def __init__(self, eng: ShardEngine, kv: KVView, slots: torch.Tensor, q_segs, segs_by_rank, context: int, *,
                 has_context: bool):
        self.eng, self.kv, self.slots, self.q_segs, self.segs = eng, kv, slots, q_segs, segs_by_rank
        self.context, self.has_context = context, has_context
        self.rows = [sum(n for _, n in s) for s in segs_by_rank]

    def __call__(self, layer, q, k, v):
        e = self.eng
        self.kv.write(layer, self.slots, k, v)
        out, lse = ring_attention(e.comm, q, self.q_segs, k, v, self.segs, e.scale, overlap=e.overlap,
                                  backend=e.attn_backend)
        if self.has_context:  # the same on every rank: a collective follows
            o, l = context_attention(e.group, q, self.rows, self.kv, layer, self.context, e.scale, e.attn_backend)
            merge_attention(out, lse, o, l)
        return out.to(q.dtype)


class _BatchDecode:
    """Attention of a decode batch: one token of each of B sessions. Each rank stores the tokens it
    owns, attends every query over that session's pages, and one all-gather per layer merges the
    partials of the whole batch."""

    def __init__(self, eng: ShardEngine, kvs: list[KVView], owned: torch.Tensor, slots: torch.Tensor | None,
                 kv_len: torch.Tensor):
        self.eng, self.kvs, self.owned, self.slots, self.kv_len = eng, kvs, owned, slots, kv_len
        self.gather = None  # CPU, short exact sessions: one gather index for every layer of this step
        if (eng.device.type == "cpu" and eng.attn_backend != "triton" and int(kv_len.max()) <= CPU_BATCH_GATHER_TOKENS
                and not any(kv.packed for kv in kvs)):
            self.gather = decode_gather_index(kvs, kv_len)

    def __call__(self, layer, q, k, v):
        e = self.eng
        if self.slots is not None:  # the pool is shared by every session of the rank: one write
            self.kvs[0].write(layer, self.slots, k[self.owned], v[self.owned])
        return batch_decode_attention(e.group, q, self.kvs, layer, self.kv_len, e.scale, e.attn_backend,
                                      self.gather).to(q.dtype)


class _Replicated:
    """Attention of tokens every rank computes (decode, short prompts): the rank stores the rows it
    owns, attends all new queries over its pages, and the partials merge across ranks."""

    def __init__(self, eng: ShardEngine, kv: KVView, slots: torch.Tensor, rows: torch.Tensor, kv_len: torch.Tensor):
        self.eng, self.kv, self.slots, self.rows, self.kv_len = eng, kv, slots, rows, kv_len

    def __call__(self, layer, q, k, v):
        e = self.eng
        if self.rows.numel():
            self.kv.write(layer, self.slots, k[self.rows], v[self.rows])
        return replicated_attention(e.group, q, self.kv, layer, self.kv_len, e.scale, e.attn_backend).to(q.dtype)
