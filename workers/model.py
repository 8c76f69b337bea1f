"""One plain decoder for the Llama family and its long-context relatives, with switches, not subclasses.

RMSNorm, RoPE with scaling, GQA, tied or untied embeddings, and per family:
    qwen2        bias on the q/k/v projections
    qwen3        RMSNorm over D on q and k before RoPE (`qk_norm`), an explicit head_dim
    qwen3_moe    qwen3 attention + a top-k mixture of SwiGLU experts (workers/moe.py) on sparse layers
    mistral      an explicit head_dim (Nemo: E 5120, H 32, D 128)

The model knows nothing of process groups or KV caches: attention is a function passed in
(`AttentionFn`), as gpt-fast keeps parallelism out of its model.py. Single-device attention, ring
prefill and sequence-parallel decode are different functions over the same model.

Shape alphabet (used in every comment below and across ringserve):
    T    tokens in this forward call          H    query heads
    Hkv  KV heads (H % Hkv == 0; GQA)         D    head dim
    E    model (embedding) width              F    MLP hidden width
    V    vocabulary size                      L    layers
    P    ranks of a sequence-parallel group    X    experts of an MoE FFN
    K    experts each token is routed to       Fx   an expert's hidden width
A forward call handles one sequence (a session), so there is no batch dimension.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .moe import MoEFeedForward

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as in Hugging Face `rope_scaling` / `rope_parameters`."""

    type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0
    # the context length the model was trained at; defaults to ModelConfig.max_position_embeddings
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    attention_factor: float | None = None  # yarn: scale of cos/sin; derived from factor when None
    truncate: bool = True  # yarn: round the correction range to whole dimensions

    def __post_init__(self):
        if self.type not in ROPE_TYPES:
            raise ValueError(f"unsupported RoPE scaling type {self.type!r}; supported: {', '.join(ROPE_TYPES)}")
        if self.type != "default" and self.factor <= 0:
            raise ValueError(f"RoPE scaling factor must be > 0, got {self.factor}")

    @classmethod
    def from_hf(cls, d: dict | None) -> "RopeScaling":
        """Parse a Hugging Face `rope_scaling` (or `rope_parameters`) dict."""
        if not d:
            return cls()
        t = d.get("rope_type", d.get("type", "default"))
        kw = {k: d[k] for k in ("factor", "original_max_position_embeddings", "low_freq_factor",
                                "high_freq_factor", "beta_fast", "beta_slow", "mscale",
                                "mscale_all_dim", "attention_factor", "truncate")
              if d.get(k) is not None}
        return cls(type=t, **kw)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int  # E
    n_layers: int  # L
    n_heads: int  # H
    n_kv_heads: int  # Hkv
    intermediate_size: int  # F
    head_dim: int = 0  # D; 0 means dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    # llama.cpp stores llama3-style scaling as per-frequency divisors (`rope_freqs.weight`)
    rope_freq_factors: tuple[float, ...] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    arch: str = "llama"
    # attention switches
    qkv_bias: bool = False  # bias on the q, k, v projections (qwen2; attention_bias in llama / qwen3)
    o_bias: bool = False  # bias on the output projection (attention_bias in llama / qwen3)
    qk_norm: bool = False  # RMSNorm over D on q and on k, before RoPE (qwen3, qwen3_moe)
    # mixture of experts (qwen3_moe); n_experts = 0: every FFN is one dense SwiGLU of width F
    n_experts: int = 0  # X
    n_experts_per_tok: int = 0  # K
    moe_intermediate_size: int = 0  # Fx
    norm_topk_prob: bool = True  # renormalise the K routing weights to sum to 1
    decoder_sparse_step: int = 1  # layer i is sparse when (i + 1) % step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and i is not listed here
    # a limit below the RoPE-derived length, and why (e.g. a -1M config without Dual Chunk Attention);
    # 0 = none. The reason is logged once at load and named when a longer session is refused.
    context_cap: int = 0
    context_note: str = ""

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.n_experts and not 0 < self.n_experts_per_tok <= self.n_experts:
            raise ValueError(f"n_experts_per_tok must be in [1, {self.n_experts}], got {self.n_experts_per_tok}")
        if self.n_experts and (self.moe_intermediate_size <= 0 or self.decoder_sparse_step <= 0):
            raise ValueError("an MoE config needs moe_intermediate_size > 0 and decoder_sparse_step > 0")

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i's FFN is the mixture of experts (the rule of transformers' Qwen3-MoE)."""
        return (self.n_experts > 0 and i not in self.mlp_only_layers
                and (i + 1) % self.decoder_sparse_step == 0)

    @property
    def rope_context(self) -> int:
        """The trained length times any RoPE scaling factor."""
        rs = self.rope_scaling
        if rs.type == "default":
            return self.max_position_embeddings
        if rs.type in ("llama3", "yarn") and rs.original_max_position_embeddings:
            return max(self.max_position_embeddings, int(rs.original_max_position_embeddings * rs.factor))
        return int(self.max_position_embeddings * rs.factor)

    @property
    def max_context(self) -> int:
        """Longest sequence ringserve serves this model at: the RoPE-derived length, lowered to
        `context_cap` where the config needs something ringserve does not implement to go further."""
        n = self.rope_context
        return min(n, self.context_cap) if self.context_cap else n

    def context_limit(self, requested: int | None = None, *, beyond_model: bool = False) -> int:
        """The context a deployment serves: `requested` (a configured max_context) may lower the
        model's limit; raising it past `max_context` needs `beyond_model` (an explicit override)."""
        if not requested:
            return self.max_context
        if requested > self.max_context and not beyond_model:
            why = f" ({self.context_note})" if self.context_note else ""
            raise ValueError(f"max_context {requested} exceeds what this model supports, {self.max_context} "
                             f"tokens{why}; lower it, or set the override to serve beyond the model's limit")
        return requested

    def kv_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of K and V over all layers for one token."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------------------------- RoPE


def rope_inv_freq(cfg: ModelConfig, seq_len: int | None = None, dtype: torch.dtype = torch.float32
                  ) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (D/2,) and the cos/sin scale ("attention factor") for `cfg`.

    Computed in float64 and returned in `dtype`: with θ of 1e7 (Qwen2.5-1M) to 3.6e9 (Gradient-1048k)
    the low frequencies and the position x frequency products need more than fp32's 24 bits.
    `seq_len` matters only for dynamic NTK scaling, which grows the base once the sequence is longer
    than the trained context (Hugging Face semantics: the whole sequence uses the grown base).
    """
    D, base, rs = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling
    f64 = torch.float64
    idx = torch.arange(0, D, 2, dtype=torch.int64).to(f64) / D  # (D/2,)
    orig = rs.original_max_position_embeddings or cfg.max_position_embeddings
    scale = 1.0
    if rs.type == "dynamic":
        n = max(seq_len or 0, cfg.max_position_embeddings)
        base = base * ((rs.factor * n / cfg.max_position_embeddings) - (rs.factor - 1)) ** (D / (D - 2))
    inv_freq = 1.0 / (base ** idx)
    if rs.type == "linear":
        inv_freq = inv_freq / rs.factor
    elif rs.type == "llama3":
        low_wavelen = orig / rs.low_freq_factor
        high_wavelen = orig / rs.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
        smooth = (orig / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif rs.type == "yarn":
        def mscale(s, m=1.0):
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

        if rs.attention_factor is not None:
            scale = rs.attention_factor
        elif rs.mscale and rs.mscale_all_dim:
            scale = mscale(rs.factor, rs.mscale) / mscale(rs.factor, rs.mscale_all_dim)
        else:
            scale = mscale(rs.factor)

        def correction_dim(rotations):  # the dimension at which `rotations` full turns fit in `orig`
            return D * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

        lo, hi = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
        if rs.truncate:
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, D - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(D // 2, dtype=f64) - lo) / (hi - lo)).clamp(0, 1)
        extrapolate = 1 - ramp  # 1: keep the trained frequency, 0: interpolate by `factor`
        inv_freq = (inv_freq / rs.factor) * (1 - extrapolate) + inv_freq * extrapolate
    if cfg.rope_freq_factors is not None:
        inv_freq = inv_freq / torch.tensor(cfg.rope_freq_factors, dtype=f64)
    return inv_freq.to(dtype), scale


def rope_cos_sin(cfg: ModelConfig, positions: torch.Tensor, seq_len: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, D) in fp32 for absolute `positions` (T,); the angles are taken in
    float64 (at position 1M an fp32 angle is off by up to 0.06 rad)."""
    inv_freq, scale = rope_inv_freq(cfg, seq_len, torch.float64)
    freqs = positions.to(torch.float64)[:, None] * inv_freq.to(positions.device)[None, :]  # (T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, D)
    return (emb.cos() * scale).float(), (emb.sin() * scale).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (T, H, D) by the half-split ("NeoX") convention that HF Llama checkpoints use."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)  # (T, 1, D)
    return x * cos + rotated * sin


# --------------------------------------------------------------------------------------------- layers


class AttentionFn(Protocol):
    """Attention for one layer: takes this call's q (T, H, D), k/v (T, Hkv, D) after RoPE, returns (T, H, D).

    The function owns whatever context the new tokens attend to (a KV cache, a shard of one on
    another rank, a ring of peers); the model only hands over the new tokens' projections.
    """

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, Hkv, D, E = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim
        self.H, self.Hkv, self.D = H, Hkv, D
        self.wq = nn.Linear(E, H * D, bias=cfg.qkv_bias)
        self.wk = nn.Linear(E, Hkv * D, bias=cfg.qkv_bias)
        self.wv = nn.Linear(E, Hkv * D, bias=cfg.qkv_bias)
        self.wo = nn.Linear(H * D, E, bias=cfg.o_bias)  # H * D need not equal E (Qwen3, Mistral-Nemo)
        self.q_norm = RMSNorm(D, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(D, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, attn: AttentionFn, layer: int) -> torch.Tensor:
        T = x.shape[0]
        q = self.wq(x).view(T, self.H, self.D)  # (T, H, D)
        k = self.wk(x).view(T, self.Hkv, self.D)  # (T, Hkv, D)
        v = self.wv(x).view(T, self.Hkv, self.D)  # (T, Hkv, D)
        if self.q_norm is not None:  # per head, over D
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attn(layer, q, k, v)  # (T, H, D)
        return self.wo(y.reshape(T, self.H * self.D))  # (T, E)


class FeedForward(nn.Module):
    """Dense SwiGLU of width F. (The sparse alternative, MoEFeedForward, is in workers/moe.py.)"""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (T, E)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = MoEFeedForward(cfg) if cfg.is_moe_layer(layer) else FeedForward(cfg)

    def forward(self, x, cos, sin, attn: AttentionFn, layer: int) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, attn, layer)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attn: AttentionFn, *,
                logits: str = "last", seq_len: int | None = None) -> torch.Tensor:
        """tokens, positions: (T,) int64. Returns logits (T, V) for logits="all", (1, V) for "last",
        or the final hidden states (T, E) for logits="none". `seq_len`: total sequence length after
        this call (for dynamic NTK RoPE); defaults to the largest position + 1."""
        if seq_len is None:
            seq_len = int(positions.max()) + 1 if positions.numel() else 0
        cos, sin = rope_cos_sin(self.config, positions, seq_len)  # (T, D) each
        x = self.tok_embeddings(tokens)  # (T, E)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, attn, i)
        if logits == "none":
            return x
        if logits == "last":
            x = x[-1:]
        return self.output(self.norm(x)).float()  # (T or 1, V)

    def with_config(self, **changes) -> ModelConfig:
        return replace(self.config, **changes)


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
