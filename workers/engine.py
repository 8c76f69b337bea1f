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
from .protocol import ContextLimit, KVCapacityError, KVNotFoundError, Progress, PromptError, SessionError
from .ring import RingComm, choose_mode, context_attention, replicated_attention, ring_attention
from .sampling import SamplingParams, sample

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
        self.limit = ContextLimit(self.cfg.context_limit(max_context, beyond_model=beyond_model))
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
    def _meta(layout: ShardLayout) -> dict:
        return {"layout": layout.to_dict(), "length": layout.length}

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

    def prefill_steps(self, sid: str, ids: Sequence[int], *, logits: str = "last", retention: str = "standard",
                      persist: str = "on_demote", ttl_s: float | None = None, allow_quantized: bool = False
                      ) -> Generator[Progress, None, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """Create session `sid` from `ids` with chunked ring prefill, yielding Progress after each chunk.
        Returns the last token's logits (1, V) on every rank, or with logits="all" this rank's
        (logits (T_local, V), positions). The KV is retained in the store with the retention class,
        persist mode ("on_demote" / "write_through") and time to live given."""
        self._check_ids(ids)
        self.limit.check_add(0, len(ids))
        expire_at = self.store.clock() + ttl_s if ttl_s else None
        layout = ShardLayout(self.world, self.block)
        self.store.create(sid, meta=self._meta(layout), retention=retention, persist=persist, expire_at=expire_at,
                          quantized=allow_quantized)
        try:
            with self.store.lease(sid) as kv:
                out = yield from self._extend(sid, kv, layout, ids, "ring", logits)
                self.store.commit(sid, kv.length, self._meta(layout))
        except BaseException:
            self.drop(sid)
            raise
        return out

    def append_steps(self, sid: str, ids: Sequence[int], *, mode: str | None = None
                     ) -> Generator[Progress, None, torch.Tensor]:
        """Add `ids` (a turn, a document) after the session's tokens and keep them, yielding Progress
        after each chunk; returns the last token's logits (1, V) on every rank. mode: "ring",
        "replicated", or None to choose for the whole call (`choose_mode`)."""
        self._check_ids(ids)
        layout = self._layout(sid)
        self.limit.check_add(layout.length, len(ids))
        with self.store.lease(sid) as kv:
            out = yield from self._extend(sid, kv, layout, ids, mode or choose_mode(len(ids), layout.length), "last")
            self.store.commit(sid, kv.length, self._meta(layout))
        return out

    def prefill(self, sid: str, ids: Sequence[int], *, progress: Callable[[int, int], None] | None = None, **kw):
        return _drive(self.prefill_steps(sid, ids, **kw), progress)

    def append(self, sid: str, ids: Sequence[int], *, mode: str | None = None,
               progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        return _drive(self.append_steps(sid, ids, mode=mode), progress)

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
        ranks cross a page boundary; when any does, one all-reduce tells every rank whether all got
        their pages, and if one did not, every rank raises the same KVCapacityError (with that rank's
        numbers), so no rank is left waiting in a collective the others never reach."""
        pages = self.geometry.pages_for
        if all(pages(a) == pages(b) for a, b in zip(after, before)):
            return
        err = None
        try:
            self.store.reserve(kv.session, after[self.rank])
        except KVCapacityError as e:
            err = e
        if self.group is None:
            if err is not None:
                raise err
            return
        import torch.distributed as dist

        ok = torch.tensor([0 if err else 1], dtype=torch.int32, device=self.device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.group)
        if int(ok):
            return
        msgs: list = [None] * self.world
        dist.all_gather_object(msgs, None if err is None else str(err), group=self.group)
        rank, msg = next((r, m) for r, m in enumerate(msgs) if m)
        raise KVCapacityError(f"rank {rank} of {self.world}: {msg}")

    def _share(self, logits, src: int) -> torch.Tensor:
        """Logits (1, V) from rank `src` to every rank."""
        if self.group is None:
            return logits
        import torch.distributed as dist

        buf = logits.contiguous() if logits is not None else torch.empty(1, self.cfg.vocab_size, dtype=torch.float32, device=self.device)
        dist.broadcast(buf, dist.get_global_rank(self.group, src), group=self.group)
        return buf

    # -- generation ----------------------------------------------------------------------------------

    def _pick(self, logits: torch.Tensor, params: SamplingParams, gen) -> int:
        """Rank 0 samples; every rank gets its token."""
        tok = sample(logits, params, gen) if self.rank == 0 else 0
        if self.group is None:
            return tok
        import torch.distributed as dist

        t = torch.tensor([tok], dtype=torch.long, device=self.device)
        dist.broadcast(t, dist.get_global_rank(self.group, 0), group=self.group)
        return int(t)

    def generate(self, sid: str, ids: Sequence[int], params: SamplingParams = SamplingParams(), *,
                 retain: bool = False, stop_ids: frozenset[int] | None = None,
                 stats: GenerationStats | None = None) -> Iterator[int]:
        """Add `ids` (e.g. a question) to session `sid` and yield generated tokens (a stop token is not
        yielded). With `retain` the question, the answer and the stop token stay in the session;
        without, the session is afterwards as it was."""
        stop = self.tokenizer.stop_ids if stop_ids is None else stop_ids
        stats = stats if stats is not None else GenerationStats()
        self._check_ids(ids)
        layout = self._layout(sid)
        base = layout.length
        budget = self.limit.generate_budget(base, len(ids), params.max_tokens)
        gen = params.generator()
        with self.store.lease(sid) as kv:
            t0 = time.perf_counter()
            logits = _drive(self._extend(sid, kv, layout, ids, choose_mode(len(ids), base), "last"))
            stats.prompt_tokens, stats.prefill_s = len(ids), time.perf_counter() - t0
            t0 = time.perf_counter()
            stats.stop_reason = "length" if budget == params.max_tokens else "context"
            try:
                for i in range(budget):
                    tok = self._pick(logits, params, gen)
                    if tok in stop:
                        stats.stop_reason = "stop"
                        if retain:  # the end-of-turn token closes the retained turn
                            _drive(self._extend(sid, kv, layout, [tok], "replicated", "last"))
                        break
                    stats.generated_tokens += 1
                    yield tok
                    if i + 1 < budget or retain:  # the last token's KV is needed only to keep it
                        logits = _drive(self._extend(sid, kv, layout, [tok], "replicated", "last"))
                if retain:
                    self.store.commit(sid, kv.length, self._meta(layout))
                    stats.retained_tokens = layout.length - base
            finally:
                stats.decode_s = time.perf_counter() - t0


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
