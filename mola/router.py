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
    """Sum the routing decisions over tokens; ``token_mask`` (T,) excludes padding.

    The three sums are one reduction over a (T, 3N) block, to launch fewer kernels.
    """
    n = probs.shape[-1]
    cols = torch.cat([selected, probs, gates.detach()], dim=-1)  # (T, 3N)
    with torch.autocast(probs.device.type, enabled=False):  # counts up to T must not round to bf16
        if token_mask is None:
            sums = cols.sum(0)  # (3N,)
            tokens = probs.new_full((), float(probs.shape[0]))  # a fill, not a host-to-device copy
        else:
            m = token_mask.to(probs.dtype)  # (T,)
            sums, tokens = m @ cols, m.sum()  # (3N,), ()
    dispatch, probs_sum, weights = sums.split(n)
    return RoutingStats(dispatch, probs_sum, weights, tokens)


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
    # A Python factor, not new_tensor(N): that is a blocking host-to-device copy on CUDA.
    return (f * p).sum() * float(dispatch.shape[0])
