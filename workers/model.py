"""One plain Llama-family decoder (RMSNorm, RoPE with scaling, GQA, SwiGLU, tied or untied embeddings).

The model knows nothing of process groups or KV caches: attention is a function passed in
(`AttentionFn`), as gpt-fast keeps parallelism out of its model.py. Single-device attention, ring
prefill and sequence-parallel decode are different functions over the same model.

Shape alphabet (used in every comment below and across ringserve):
    T    tokens in this forward call          H    query heads
    Hkv  KV heads (H % Hkv == 0; GQA)         D    head dim
    E    model (embedding) width              F    MLP hidden width
    V    vocabulary size                      L    layers
    P    ranks of a sequence-parallel group
A forward call handles one sequence (a session), so there is no batch dimension.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

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

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def max_context(self) -> int:
        """Longest sequence the model is meant for: the trained length times any RoPE scaling factor."""
        rs = self.rope_scaling
        if rs.type == "default":
            return self.max_position_embeddings
        if rs.type in ("llama3", "yarn") and rs.original_max_position_embeddings:
            return max(self.max_position_embeddings, int(rs.original_max_position_embeddings * rs.factor))
        return int(self.max_position_embeddings * rs.factor)

    def kv_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of K and V over all layers for one token."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------------------------- RoPE


def rope_inv_freq(cfg: ModelConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (D/2,) fp32 and the cos/sin scale ("attention factor") for `cfg`.

    `seq_len` matters only for dynamic NTK scaling, which grows the base once the sequence is longer
    than the trained context (Hugging Face semantics: the whole sequence uses the grown base).
    """
    D, base, rs = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling
    idx = torch.arange(0, D, 2, dtype=torch.int64).float() / D  # (D/2,)
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
        ramp = ((torch.arange(D // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        extrapolate = 1 - ramp  # 1: keep the trained frequency, 0: interpolate by `factor`
        inv_freq = (inv_freq / rs.factor) * (1 - extrapolate) + inv_freq * extrapolate
    if cfg.rope_freq_factors is not None:
        inv_freq = inv_freq / torch.tensor(cfg.rope_freq_factors, dtype=torch.float32)
    return inv_freq, scale


def rope_cos_sin(cfg: ModelConfig, positions: torch.Tensor, seq_len: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, D) in fp32 for absolute `positions` (T,)."""
    inv_freq, scale = rope_inv_freq(cfg, seq_len)
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]  # (T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, D)
    return emb.cos() * scale, emb.sin() * scale


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
        self.wq = nn.Linear(E, H * D, bias=False)
        self.wk = nn.Linear(E, Hkv * D, bias=False)
        self.wv = nn.Linear(E, Hkv * D, bias=False)
        self.wo = nn.Linear(H * D, E, bias=False)

    def forward(self, x, cos, sin, attn: AttentionFn, layer: int) -> torch.Tensor:
        T = x.shape[0]
        q = self.wq(x).view(T, self.H, self.D)  # (T, H, D)
        k = self.wk(x).view(T, self.Hkv, self.D)  # (T, Hkv, D)
        v = self.wv(x).view(T, self.Hkv, self.D)  # (T, Hkv, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attn(layer, q, k, v)  # (T, H, D)
        return self.wo(y.reshape(T, self.H * self.D))  # (T, E)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (T, E)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, attn: AttentionFn, layer: int) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, attn, layer)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
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
