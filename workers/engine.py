"""The per-rank engine: a model, the KV cache of its sequences, and generation.

This file has no Ray and no process groups. In this version the engine runs on one device with
single-device attention (`SingleDeviceAttention`, PyTorch SDPA over a preallocated KV cache);
ring prefill and sequence-parallel decode plug in as other attention functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .loader import LoadedModel
from .model import ModelConfig, Transformer
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
