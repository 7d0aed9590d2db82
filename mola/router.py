"""Top-k routing and the load-balancing statistics it produces.

Everything here is a handful of dense tensor operations with static shapes: no `.item()`,
no `.tolist()`, no boolean indexing, so it runs under `torch.compile` and never makes the
host wait for the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RoutingStats:
    """Sums over the tokens one module routed (weighted by the token mask).

    ``dispatch``: (N,) number of top-k slots that picked each expert;
    ``probs``: (N,) summed softmax probability of each expert (differentiable);
    ``weights``: (N,) summed renormalised routing weight (0 where not selected);
    ``tokens``: () number of tokens counted.
    """

    dispatch: Tensor
    probs: Tensor
    weights: Tensor
    tokens: Tensor


def top_k_gates(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Dense routing weights from router logits.

    logits: (T, N). Returns ``(gates, probs, selected)``, each (T, N) float32: ``probs`` is the
    softmax over all experts, ``selected`` is 1 for the top-k experts of each token, and
    ``gates`` holds their probabilities renormalised to sum to 1, zero elsewhere.
    """
    probs = torch.softmax(logits.float(), dim=-1)  # (T, N)
    top_probs, top_index = probs.topk(top_k, dim=-1)  # (T, K)
    top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
    gates = torch.zeros_like(probs).scatter(-1, top_index, top_probs)  # (T, N)
    selected = torch.zeros_like(probs).scatter(-1, top_index, 1.0)  # (T, N)
    return gates, probs, selected


def routing_stats(gates: Tensor, probs: Tensor, selected: Tensor, token_mask: Tensor | None) -> RoutingStats:
    """Sum the routing decisions over tokens; ``token_mask`` (T,) excludes padding."""
    if token_mask is None:
        tokens = torch.tensor(float(probs.shape[0]), device=probs.device)
        return RoutingStats(selected.sum(0), probs.sum(0), gates.detach().sum(0), tokens)
    m = token_mask.to(probs.dtype).unsqueeze(-1)  # (T, 1)
    return RoutingStats(
        (selected * m).sum(0), (probs * m).sum(0), (gates.detach() * m).sum(0), m.sum()
    )


def load_balancing_loss(stats: list[RoutingStats], top_k: int) -> Tensor:
    """Switch Transformer load-balancing loss (Fedus et al., eqs. 4-6) for one decoder layer,
    pooling the routing decisions of all its MoLA modules: ``N * sum_e f_e * P_e``.

    ``f_e``: fraction of the top-k slots sent to expert e (sums to 1);
    ``P_e``: mean router probability of expert e. Equals 1 when routing is perfectly uniform.
    """
    dispatch = torch.stack([s.dispatch for s in stats]).sum(0)  # (N,)
    probs = torch.stack([s.probs for s in stats]).sum(0)  # (N,)
    tokens = torch.stack([s.tokens for s in stats]).sum().clamp_min(1.0)
    f = dispatch / (tokens * top_k)
    p = probs / tokens
    return probs.new_tensor(float(dispatch.shape[0])) * (f * p).sum()
