"""Next-token selection: greedy, or seeded sampling with temperature, top-k and top-p.

The parameters and their checks live in protocol.py (`SamplingParams`, torch-free); this file does
the sampling. A batch of requests is sampled here at once on one rank (`sample_batch`), which marks
a request whose logits hold no valid token instead of raising, so the group can fail that request
alone.
"""

from __future__ import annotations

import torch

from .protocol import SamplingError, SamplingParams

__all__ = ["SamplingParams", "SamplingError", "make_generator", "sample", "sample_batch"]


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    g = torch.Generator(device="cpu")
    g.manual_seed(params.seed if params.seed is not None else torch.seed())
    return g


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """Pick the next token from logits (V,) or (1, V). SamplingError if no token is valid."""
    logits = logits.reshape(-1).float()
    if params.greedy:
        if not bool(torch.isfinite(logits).any()):
            raise SamplingError("the model produced no finite logit for the next token")
        return int(torch.argmax(logits.nan_to_num(nan=float("-inf"))))
    logits = logits.cpu() / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= params.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(logits, -1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        raise SamplingError(f"sampling at temperature {params.temperature:g} gave no valid distribution over "
                            "the next token (the logits overflowed); use a temperature of at least 0.01, or 0 "
                            "for greedy")
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> tuple[list[int], list[str]]:
    """Tokens for logits (B, V), one per request; a request whose sampling fails gets token -1 and its
    message (the others are unaffected)."""
    tokens, errors = [], []
    for b, (p, g) in enumerate(zip(params, generators)):
        try:
            tokens.append(sample(logits[b], p, g))
            errors.append("")
        except SamplingError as e:
            tokens.append(-1)
            errors.append(str(e))
    return tokens, errors
