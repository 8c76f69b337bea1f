"""The KEEP format: a retained session keeps only a fraction of its tokens, chosen without its questions.

A retained context is compressed before its questions are known, so the choice must be query-agnostic
(query-aware eviction — SnapKV, TOVA — degrades when the cache is reused for other questions). This is
Expected Attention (Devoto et al.; kvpress's ExpectedAttentionPress), in closed form:

  * the future queries of a KV head are modelled as a Gaussian, fitted to the queries of the session's
    last PROBE tokens (re-run through the model without writing anything: their queries at every
    layer, after RoPE — the most recent queries are the best estimate of the next ones);
  * the expected attention logit of a key k under q ~ N(mu, Sigma) is  mu.k / sqrt(D) + k' Sigma k / (2 D)
    (the log of E[exp(q.k / sqrt(D))]); a softmax over the rank's keys gives each key's expected share;
  * a token's score is that share times the norm of its value, summed over KV heads and layers (one
    kept set per token, the same for every layer, so the storage stays one index);
  * scores are max-pooled over POOL neighbouring tokens (as SnapKV pools), so what is kept comes in spans:
    the expected attention of a number written as digit tokens sits on its first digits, and without the
    pooling the rest were evicted (measured, niah_single at 2K, keep:0.5: the answers were the needle's
    first digits, 20 %; a 7-token window kept 3–4 digits; 15 kept whole numbers, BENCHMARKS.md §9);
  * the first SINKS positions (attention sinks) and the last RECENT positions are always kept.

Each rank chooses among the tokens it holds (`keep_count` of them, a number every rank can compute for
every rank from the layout, so the layout stays identical everywhere); the kept tokens stay in position
order, so attention over them needs nothing new. The same content gives the same kept set: nothing
here depends on what is asked later.
"""

from __future__ import annotations

import math

import torch

from .layout import ShardLayout, positions_of

SINKS = 4  # attention sinks: the first positions are always kept
RECENT = 64  # and the last positions of the session
PROBE = 64  # tokens whose queries stand for the future ones
POOL = 15  # scores are max-pooled over this many neighbouring tokens before choosing


def forced(layout: ShardLayout, rank: int) -> torch.Tensor:
    """(n,) bool over rank's stored tokens: the sinks and the recent window."""
    pos = positions_of(layout.segments(rank))
    return (pos < SINKS) | (pos >= layout.length - RECENT)


def keep_count(layout: ShardLayout, rank: int, fraction: float) -> int:
    """Tokens rank keeps of the ones it holds: the fraction, and never fewer than the forced ones."""
    f = forced(layout, rank)
    return min(f.numel(), max(int(f.sum()), math.ceil(fraction * f.numel())))


def expected_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scores (n,) of n keys / values (n, Hkv, D) under queries q (W, H, D) of one layer."""
    W, H, D = q.shape
    n, Hkv, _ = k.shape
    G = H // Hkv
    qs = q.float().view(W, Hkv, G, D).permute(1, 0, 2, 3).reshape(Hkv, W * G, D)  # the samples of each KV head
    mu = qs.mean(1)  # (Hkv, D)
    c = qs - mu[:, None]
    sigma = c.transpose(1, 2) @ c / max(1, qs.shape[1] - 1)  # (Hkv, D, D)
    kf = k.float().transpose(0, 1)  # (Hkv, n, D)
    logit = (kf @ mu[..., None])[..., 0] / math.sqrt(D) + ((kf @ sigma) * kf).sum(-1) / (2 * D)  # (Hkv, n)
    share = torch.softmax(logit, -1)
    return (share * v.float().norm(dim=-1).transpose(0, 1)).sum(0)  # (n,)


def kept_index(scores: torch.Tensor, must: torch.Tensor, count: int) -> torch.Tensor:
    """Storage indices to keep, in order: every forced one, then the best scores up to `count`. A token's
    score is first the best of its POOL neighbours' (SnapKV's pooling), so a kept token keeps its span: a
    number written as digit tokens is kept whole, not cut after its first digits."""
    s = torch.nn.functional.max_pool1d(scores.float()[None, None], POOL, 1, POOL // 2)[0, 0]
    s[must] = float("inf")
    top = torch.topk(s, count).indices
    return top.sort().values
