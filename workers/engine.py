"""The per-rank engine: a model, the KV cache of its sequences, and generation.

This file has no Ray and no process groups. In this version the engine runs on one device with
single-device attention (`SingleDeviceAttention`, PyTorch SDPA over a preallocated KV cache);
ring prefill and sequence-parallel decode plug in as other attention functions.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .loader import LoadedModel
from .model import ModelConfig, Transformer
from .ring import ShardLayout
from .sampling import SamplingParams, sample


class PromptError(ValueError):
    """The prompt cannot be served as given (empty, or longer than the configured maximum)."""


class KVCache:
    """K and V of one sequence for every layer, preallocated and grown by doubling.

    Stored as (L, Hkv, capacity, D) so that the first `length` tokens of a layer are a view that
    SDPA reads without a copy; `keys(layer)` returns that view as (T, Hkv, D) in the shared alphabet.
    """

    def __init__(self, cfg: ModelConfig, capacity: int, *, device, dtype):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.length = 0
        self._alloc(max(capacity, 16))

    def _alloc(self, capacity: int):
        L, Hkv, D = self.cfg.n_layers, self.cfg.n_kv_heads, self.cfg.head_dim
        k = torch.empty(L, Hkv, capacity, D, device=self.device, dtype=self.dtype)
        v = torch.empty_like(k)
        if hasattr(self, "k"):
            k[:, :, : self.length] = self.k[:, :, : self.length]
            v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v, self.capacity = k, v, capacity

    def reserve(self, total: int):
        if total > self.capacity:
            cap = self.capacity
            while cap < total:
                cap *= 2
            self._alloc(cap)

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (T, Hkv, D) at positions start..start+T-1."""
        T = k.shape[0]
        self.k[layer, :, start:start + T] = k.transpose(0, 1)
        self.v[layer, :, start:start + T] = v.transpose(0, 1)

    def keys(self, layer: int, end: int) -> torch.Tensor:
        return self.k[layer, :, :end].transpose(0, 1)  # (T, Hkv, D)

    def values(self, layer: int, end: int) -> torch.Tensor:
        return self.v[layer, :, :end].transpose(0, 1)  # (T, Hkv, D)

    @property
    def nbytes(self) -> int:
        return 2 * self.k[:, :, : self.length].numel() * self.k.element_size()


@dataclass
class SingleDeviceAttention:
    """Attention of new tokens at positions start..start+T-1 against the cache, causal by position."""

    cache: KVCache
    start: int

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        T, H, D = q.shape
        end = self.start + T
        self.cache.write(layer, self.start, k, v)
        kk = self.cache.k[layer, :, :end].unsqueeze(0)  # (1, Hkv, end, D)
        vv = self.cache.v[layer, :, :end].unsqueeze(0)  # (1, Hkv, end, D)
        qq = q.transpose(0, 1).unsqueeze(0)  # (1, H, T, D)
        gqa = H != kk.shape[1]
        if gqa and q.device.type == "cuda":  # the fused CUDA kernels want equal head counts
            kk, vv = kk.repeat_interleave(H // kk.shape[1], 1), vv.repeat_interleave(H // vv.shape[1], 1)
            gqa = False
        if T == 1:  # decode: the new token sees everything before it
            out = F.scaled_dot_product_attention(qq, kk, vv, enable_gqa=gqa)
        elif self.start == 0:
            out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=gqa)
        else:  # a chunk after cached context: query i at position start+i sees keys 0..start+i
            mask = torch.ones(T, end, dtype=torch.bool, device=q.device).tril(diagonal=self.start)
            out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, enable_gqa=gqa)
        return out[0].transpose(0, 1)  # (T, H, D)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stop_reason: str = ""  # "stop" (a stop token), "length" (max_tokens), or "context" (window full)


class Engine:
    """Prefill and decode on one device.

    max_context: the longest sequence (prompt + generated tokens) this engine accepts; defaults to
    the model's trained context (times its RoPE scaling factor).
    prefill_chunk: prompts longer than this are prefilled in chunks, bounding activation memory.
    """

    def __init__(self, loaded: LoadedModel, *, max_context: int | None = None, prefill_chunk: int = 8192):
        self.loaded = loaded
        self.model: Transformer = loaded.model
        self.tokenizer = loaded.tokenizer
        self.cfg = loaded.config
        self.max_context = max_context or self.cfg.max_context
        self.prefill_chunk = prefill_chunk
        p = next(self.model.parameters())
        self.device, self.dtype = p.device, p.dtype

    def check_prompt(self, ids: Sequence[int]):
        if len(ids) == 0:
            raise PromptError("the prompt is empty: give at least one token of text")
        if len(ids) >= self.max_context:
            raise PromptError(f"the prompt has {len(ids)} tokens; this model is configured for at most "
                              f"{self.max_context} tokens including the answer (--max-context to change)")
        bad = [i for i in ids if not 0 <= i < self.cfg.vocab_size]
        if bad:
            raise PromptError(f"token ids out of range [0, {self.cfg.vocab_size}): {bad[:5]}")

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.cfg, capacity, device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def forward(self, cache: KVCache, ids: Sequence[int], *, logits: str = "last") -> torch.Tensor:
        """Run `ids` after what `cache` holds; returns logits for the last token (1, V) or all (T, V)."""
        start, T = cache.length, len(ids)
        cache.reserve(start + T)
        tokens = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        outs = []
        for c0 in range(0, T, self.prefill_chunk):
            chunk = tokens[c0:c0 + self.prefill_chunk]
            pos = torch.arange(start + c0, start + c0 + chunk.numel(), device=self.device)
            last = c0 + self.prefill_chunk >= T
            mode = logits if (logits == "all" or last) else "none"
            y = self.model(chunk, pos, SingleDeviceAttention(cache, start + c0), logits=mode,
                           seq_len=start + T)
            cache.length = start + c0 + chunk.numel()
            if mode != "none":
                outs.append(y)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Logits (T, V) fp32 of every position of a fresh sequence (for tests and scoring)."""
        self.check_prompt(ids)
        return self.forward(self.new_cache(len(ids)), ids, logits="all")

    def generate(self, ids: Sequence[int], params: SamplingParams = SamplingParams(), *,
                 stop_ids: frozenset[int] | None = None, stats: GenerationStats | None = None
                 ) -> Iterator[int]:
        """Yield generated token ids (the stop token is not yielded)."""
        import time

        self.check_prompt(ids)
        stop = self.tokenizer.stop_ids if stop_ids is None else stop_ids
        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens = len(ids)
        budget = min(params.max_tokens, self.max_context - len(ids))
        cache = self.new_cache(len(ids) + budget + 1)
        gen = params.generator()
        t0 = time.perf_counter()
        logits = self.forward(cache, ids)
        stats.prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats.stop_reason = "length" if budget == params.max_tokens else "context"
        for _ in range(budget):
            tok = sample(logits, params, gen)
            if tok in stop:
                stats.stop_reason = "stop"
                break
            stats.generated_tokens += 1
            yield tok
            logits = self.forward(cache, [tok])
        stats.decode_s = time.perf_counter() - t0


# ------------------------------------------------------------------------------- sequence parallel


class SessionError(KeyError):
    """The engine holds no session by that id."""

    def __str__(self):
        return str(self.args[0]) if self.args else "unknown session"


@dataclass
class SessionShard:
    """One rank's part of a session: the KV of the positions it holds, and the group-wide layout."""

    cache: KVCache
    layout: "ShardLayout"

    @property
    def length(self) -> int:  # tokens in the whole session (all ranks)
        return self.layout.length


class _RingPrefill:
    """Attention function for a prefill chunk: new K/V into the local cache, then pass-KV ring."""

    def __init__(self, comm, cache: KVCache, start: int, q_segs, segs_by_rank, scale: float, *,
                 overlap: bool = True, backend: str = "auto"):
        self.comm, self.cache, self.start, self.q_segs, self.segs, self.scale = comm, cache, start, q_segs, segs_by_rank, scale
        self.overlap, self.backend = overlap, backend

    def __call__(self, layer, q, k, v):
        from .ring import attend_segments, ring_attention

        end = self.start + q.shape[0]
        self.cache.write(layer, self.start, k, v)
        kk, vv = self.cache.keys(layer, end), self.cache.values(layer, end)  # (T_local, Hkv, D)
        if self.comm is None:
            out, _ = attend_segments(q, self.q_segs, kk, vv, self.segs[0], self.scale, self.backend)
        else:
            out, _ = ring_attention(self.comm, q, self.q_segs, kk, vv, self.segs, self.scale,
                                    overlap=self.overlap, backend=self.backend)
        return out.to(q.dtype)


class _Replicated:
    """Attention function for tokens every rank computes (decode, short appends): the rank stores the
    rows it owns, attends all new queries over its shard, and the partials merge across ranks."""

    def __init__(self, group, cache: KVCache, start: int, rows: torch.Tensor, q_start: int, segs, scale: float):
        self.group, self.cache, self.start, self.rows = group, cache, start, rows
        self.q_start, self.segs, self.scale = q_start, segs, scale

    def __call__(self, layer, q, k, v):
        from .ring import attend_segments, replicated_attention

        end = self.start + self.rows.numel()
        if self.rows.numel():
            self.cache.write(layer, self.start, k[self.rows], v[self.rows])
        kk, vv = self.cache.keys(layer, end), self.cache.values(layer, end)
        if self.group is None:
            out, _ = attend_segments(q, [(self.q_start, q.shape[0])], kk, vv, self.segs, self.scale)
        else:
            out = replicated_attention(self.group, q, self.q_start, kk, vv, self.segs, self.scale)
        return out.to(q.dtype)


class ShardEngine:
    """The engine of one rank of a sequence-parallel group (P = 1 without a process group).

    Every rank of a group calls the same methods with the same arguments in the same order (the
    group driver fans each call out to all ranks); the ranks exchange K/V (prefill) or partial
    attention outputs (decode) through the process group. Sampling happens on rank 0 and the token
    is broadcast, so all ranks continue with the same token.

    prefill_chunk bounds activation memory: a prompt is prefilled `prefill_chunk` tokens at a time,
    so each rank holds the activations of at most prefill_chunk / P tokens per layer (plus its KV
    shard and two ring buffers of one shard's K/V for one layer).
    """

    def __init__(self, loaded: LoadedModel, group=None, *, max_context: int | None = None,
                 prefill_chunk: int = 8192, block: int = 256, timeout_s: float = 120.0,
                 overlap: bool = True, attn_backend: str = "auto", kvstore=None):
        import torch.distributed as dist

        from .ring import RingComm

        self.loaded, self.model, self.cfg = loaded, loaded.model, loaded.config
        self.tokenizer = loaded.tokenizer
        self.group = group
        self.rank = dist.get_rank(group) if group is not None else 0
        self.world = dist.get_world_size(group) if group is not None else 1
        self.comm = RingComm(group, timeout_s) if group is not None and self.world > 1 else None
        if group is not None and self.world == 1:
            self.group = None
        self.max_context = max_context or self.cfg.max_context
        self.prefill_chunk, self.block = prefill_chunk, block
        self.overlap, self.attn_backend = overlap, attn_backend  # ring overlap; kernels backend on CUDA
        self.scale = self.cfg.head_dim ** -0.5
        p = next(self.model.parameters())
        self.device, self.dtype = p.device, p.dtype
        # Without a store, sessions live in `sessions`. With a `KVStore` (workers/kvstore.py) the store
        # owns every retained session's KV in its tiers; `sessions` then holds only the working copy
        # of a session while a request runs on it.
        self.kvstore = kvstore
        self.sessions: dict[str, SessionShard] = {}

    # -- sessions

    def session(self, sid: str) -> SessionShard:
        """This rank's part of session `sid`, promoted from the store's tiers when it has one."""
        s = self.sessions.get(sid)
        if s is not None:
            return s
        if self.kvstore is not None:
            from .kvformat import KVNotFoundError

            try:
                shard = self.kvstore.get(sid)
            except KVNotFoundError:
                raise SessionError(f"session {sid!r} is not held by this group") from None
            cache = KVCache(self.cfg, shard.num_tokens + 2 * self.block, device=self.device, dtype=self.dtype)
            shard.into_cache(cache)
            s = SessionShard(cache, ShardLayout.from_dict(shard.meta["layout"]))
            self.sessions[sid] = s
            return s
        raise SessionError(f"session {sid!r} is not held by this group")

    def drop(self, sid: str) -> None:
        """Forget session `sid` on this rank, on every tier."""
        self.sessions.pop(sid, None)
        if self.kvstore is not None:
            from .kvformat import KVNotFoundError

            try:
                self.kvstore.delete(sid)
            except KVNotFoundError:
                pass

    def restore(self, sid: str) -> dict:
        """Adopt a persisted session (written by another group with the same P) from Redis."""
        from .kvformat import KVNotFoundError

        try:
            st = self.kvstore.restore(sid)
        except KVNotFoundError:
            raise SessionError(f"session {sid!r} was never persisted to Redis") from None
        return {"tier": st.tier, "tokens": st.tokens}

    def _shard(self, sess: SessionShard, start: int, end: int):
        """This rank's tokens [start, end) of storage as a KVShard for the store, with the layout."""
        from .kvformat import KVShard
        from .ring import positions_of

        c = sess.cache
        pos = positions_of(sess.layout.segments(self.rank))[start:end]
        return KVShard(c.k[:, :, start:end].contiguous(), c.v[:, :, start:end].contiguous(), pos,
                       {"layout": sess.layout.to_dict(), "length": sess.length})

    @contextmanager
    def _working(self, sid: str, *, retain: bool = True):
        """Run a request on session `sid`: tokens it adds are kept (retain) or cut back afterwards, and
        with a store the kept tokens are appended there and the working copy is released."""
        sess = self.session(sid)
        base_len, base_local = sess.length, sess.cache.length
        ok = False
        try:
            yield sess
            ok = True
        finally:
            if not ok or not retain:
                self.truncate(sid, base_len)
            if self.kvstore is not None:
                if ok and retain and sess.cache.length > base_local:
                    self.kvstore.append(sid, self._shard(sess, base_local, sess.cache.length))
                self.sessions.pop(sid, None)

    def _check_new(self, sess_len: int, ids: Sequence[int]):
        if len(ids) == 0:
            raise PromptError("the prompt is empty: give at least one token of text")
        if sess_len + len(ids) >= self.max_context:
            raise PromptError(f"the session would hold {sess_len + len(ids)} tokens; this group is configured "
                              f"for at most {self.max_context} tokens including the answer")
        bad = [i for i in ids if not 0 <= i < self.cfg.vocab_size]
        if bad:
            raise PromptError(f"token ids out of range [0, {self.cfg.vocab_size}): {bad[:5]}")

    @torch.inference_mode()
    def prefill(self, sid: str, ids: Sequence[int], *, progress: Callable[[int, int], None] | None = None,
                logits: str = "last", retention: str = "standard", persist: str = "on_demote",
                ttl_s: float | None = None, allow_quantized: bool = False):
        """Create session `sid` from `ids` with chunked ring prefill. Returns the last token's logits
        (1, V) on every rank, or with logits="all" this rank's (logits (T_local, V), positions).
        With a store, the session's KV is handed to it with the retention class, persist mode
        ("on_demote" / "write_through") and time to live given."""
        if sid in self.sessions or (self.kvstore is not None and sid in self.kvstore.sessions()):
            raise ValueError(f"session {sid!r} already exists")
        self._check_new(0, ids)
        sess = SessionShard(KVCache(self.cfg, max(16, len(ids) // self.world + 2 * self.block),
                                    device=self.device, dtype=self.dtype), ShardLayout(self.world, self.block))
        self.sessions[sid] = sess
        try:
            out = self._ring_chunks(sess, ids, progress, logits)
        except BaseException:
            self.sessions.pop(sid, None)
            raise
        if self.kvstore is not None:
            expire_at = self.kvstore.clock() + ttl_s if ttl_s else None
            try:
                self.kvstore.put(sid, self._shard(sess, 0, sess.cache.length), retention=retention,
                                 persist=persist, expire_at=expire_at, allow_quantized=allow_quantized)
            finally:
                self.sessions.pop(sid, None)
        return out

    def _ring_chunks(self, sess: SessionShard, ids, progress, logits):
        from .ring import positions_of

        ids_t = torch.as_tensor(list(ids), dtype=torch.long)
        total, done = len(ids), 0
        last = None
        all_logits, all_pos = [], []
        base = sess.layout.length
        while done < total:
            n = min(self.prefill_chunk, total - done)
            s = base + done
            mine = sess.layout.add_zigzag(n)[self.rank]
            segs = [sess.layout.segments(r) for r in range(self.world)]
            pos = positions_of(mine)
            cache = sess.cache
            cache.reserve(cache.length + pos.numel())
            attn = _RingPrefill(self.comm, cache, cache.length, mine, segs, self.scale,
                                overlap=self.overlap, backend=self.attn_backend)
            final = done + n == total
            owner = sess.layout.owner(s + n - 1)
            mode = "all" if logits == "all" else ("last" if final and owner == self.rank and pos.numel() else "none")
            y = self.model(ids_t[pos - base].to(self.device), pos.to(self.device), attn, logits=mode, seq_len=s + n)
            cache.length += pos.numel()
            if logits == "all":
                all_logits.append(y)
                all_pos.append(pos)
            elif final:
                last = self._share(y if owner == self.rank else None, owner)
            done += n
            if progress is not None:
                progress(done, total)
        if logits == "all":
            return torch.cat(all_logits), torch.cat(all_pos)
        return last

    def _share(self, logits, src: int) -> torch.Tensor:
        """Logits (1, V) from rank `src` to every rank."""
        if self.group is None:
            return logits
        import torch.distributed as dist

        buf = logits.contiguous() if logits is not None else torch.empty(1, self.cfg.vocab_size, dtype=torch.float32, device=self.device)
        dist.broadcast(buf, dist.get_global_rank(self.group, src), group=self.group)
        return buf

    def append(self, sid: str, ids: Sequence[int], *, mode: str | None = None,
               progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Add `ids` (a turn, a document) after the session's tokens and keep them; returns the last
        token's logits (1, V) on every rank. mode: "ring" (pass-KV), "replicated" (pass-Q) or None
        to choose by the bytes each moves."""
        with self._working(sid) as sess:
            return self._append(sess, ids, mode=mode, progress=progress)

    @torch.inference_mode()
    def _append(self, sess: SessionShard, ids: Sequence[int], *, mode: str | None = None,
                progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        from .ring import choose_mode, positions_of

        self._check_new(sess.length, ids)
        mode = mode or choose_mode(len(ids), sess.length, self.cfg.n_heads, self.cfg.n_kv_heads)
        if mode == "ring":
            return self._ring_chunks(sess, ids, progress, "last")
        s = sess.length
        mine = sess.layout.add_blocks(len(ids))[self.rank]
        rows = positions_of(mine) - s
        cache = sess.cache
        cache.reserve(cache.length + rows.numel())
        attn = _Replicated(self.group, cache, cache.length, rows.to(self.device), s,
                           sess.layout.segments(self.rank), self.scale)
        pos = torch.arange(s, s + len(ids), device=self.device)
        y = self.model(torch.as_tensor(list(ids), dtype=torch.long, device=self.device), pos, attn,
                       logits="last", seq_len=s + len(ids))
        cache.length += rows.numel()
        if progress is not None:
            progress(len(ids), len(ids))
        return y

    def truncate(self, sid: str, length: int) -> None:
        """Forget every token at position >= length (a turn that is not retained)."""
        sess = self.sessions.get(sid)
        if sess is None:
            return
        lay = sess.layout
        while lay.regions and lay.regions[-1].start >= length:
            lay.regions.pop()
        if lay.regions and lay.regions[-1].end > length:
            if lay.regions[-1].kind != "blocks":
                raise ValueError("can only cut back tokens added after the prefill")
            lay.regions[-1].end = length
        sess.cache.length = sum(n for _, n in lay.segments(self.rank))

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
        """Append `ids` (e.g. a question) to session `sid` and yield generated tokens. Without
        `retain`, the question and answer are forgotten afterwards (the session is as before)."""
        import time

        stop = self.tokenizer.stop_ids if stop_ids is None else stop_ids
        stats = stats if stats is not None else GenerationStats()
        if len(ids) == 0:
            raise PromptError("the prompt is empty: give at least one token of text")
        gen = params.generator()
        with self._working(sid, retain=retain) as sess:
            base = sess.length
            # room is left for the last token, so a retained turn can keep it
            budget = min(params.max_tokens, self.max_context - base - len(ids) - 1)
            t0 = time.perf_counter()
            logits = self._append(sess, ids)
            stats.prompt_tokens, stats.prefill_s = len(ids), time.perf_counter() - t0
            t0 = time.perf_counter()
            stats.stop_reason = "length" if budget == params.max_tokens else "context"
            try:
                for _ in range(max(budget, 0)):
                    tok = self._pick(logits, params, gen)
                    if tok in stop:
                        stats.stop_reason = "stop"
                        if retain:
                            self._append(sess, [tok], mode="replicated")
                        break
                    stats.generated_tokens += 1
                    yield tok
                    logits = self._append(sess, [tok], mode="replicated")
            finally:
                stats.decode_s = time.perf_counter() - t0
