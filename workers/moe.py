"""The sparse FFN of Qwen3-MoE: a router picks K of X SwiGLU experts per token.

Beside model.py (which picks this or the dense `FeedForward` per layer) so that file stays short.
Shapes use model.py's alphabet: T tokens, E model width, X experts, K experts per token, Fx an
expert's hidden width.

    router     softmax over X in fp32, top K, optionally renormalised to sum to 1 (`norm_topk_prob`),
               cast back to the activations' dtype (as transformers does)
    experts    y_t = sum_k w_tk * down_e(silu(gate_e(x_t)) * up_e(x_t)),  e = the k-th expert of t

`MoEFeedForward` groups the T*K (token, expert) assignments by expert and runs one matmul per
expert that received tokens — a Python loop over experts, never over tokens. `moe_dense_ref` is its
reference twin: every expert on every token, weighted by the same routing (the test oracle and the
GPU benchmark's baseline).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .model import ModelConfig


class MoEFeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        X, E, Fx = cfg.n_experts, cfg.dim, cfg.moe_intermediate_size
        self.K, self.norm_topk_prob = cfg.n_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(E, X, bias=False)  # the router
        # gate and up of every expert stacked in one tensor, so each expert is one matmul
        self.w13 = nn.Parameter(torch.empty(X, 2 * Fx, E))  # (X, 2Fx, E): rows [gate; up]
        self.w2 = nn.Parameter(torch.empty(X, E, Fx))  # (X, E, Fx): down

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights (T, K) in x's dtype and expert ids (T, K) of x (T, E)."""
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # (T, X)
        weights, experts = probs.topk(self.K, dim=-1)  # (T, K) each
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights.to(x.dtype), experts

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's SwiGLU on x (n, E) -> (n, E)."""
        gate, up = F.linear(x, self.w13[e]).chunk(2, dim=-1)  # (n, Fx) each
        return F.linear(F.silu(gate) * up, self.w2[e])  # (n, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, K = x.shape[0], self.K
        weights, experts = self.route(x)  # (T, K)
        flat = experts.reshape(-1)  # (T*K,) assignment a = t*K + k
        order = flat.argsort(stable=True)  # assignments grouped by expert
        counts = torch.bincount(flat, minlength=self.w13.shape[0]).tolist()  # one device sync per layer
        tokens = order // K  # (T*K,) the token of each grouped assignment
        xs = x[tokens]  # (T*K, E)
        ys = torch.empty_like(xs)  # (T*K, E)
        start = 0
        for e, n in enumerate(counts):
            if n:
                ys[start:start + n] = self.expert(e, xs[start:start + n])
                start += n
        ys = ys * weights.reshape(-1)[order, None]  # (T*K, E)
        return torch.zeros_like(x).index_add_(0, tokens, ys)  # (T, E)


def moe_dense_ref(ffn: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """The same FFN computed densely: every expert on every token, then the routing weights applied
    (zero for experts a token was not routed to). X/K times the work of `MoEFeedForward`."""
    weights, experts = ffn.route(x)  # (T, K)
    dense = torch.zeros(x.shape[0], ffn.w13.shape[0], dtype=x.dtype, device=x.device)  # (T, X)
    dense.scatter_(1, experts, weights)
    y = torch.zeros_like(x)  # (T, E)
    for e in range(ffn.w13.shape[0]):
        y += dense[:, e:e + 1] * ffn.expert(e, x)
    return y
