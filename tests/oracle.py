"""The straightforward MoLA layer: a Python loop over experts, as the reference code does.

It is the oracle the fast `MolaLinear` is checked against (forward output, routing statistics,
gradients), and the "loop" baseline in `bench/`. It reads the parameters of an existing
`MolaLinear`, so both compute with the very same weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mola.layer import MolaLinear


def loop_forward(layer: MolaLinear, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (output, router probabilities (T, N), top-k mask (T, N)) for x (..., in)."""
    result = layer.base_layer(x)
    x2 = x.reshape(-1, layer.in_features)
    probs = torch.softmax(layer.router(x2.to(layer.router.weight.dtype)).float(), dim=-1)
    top_probs, top_index = probs.topk(layer.top_k, dim=-1)
    top_probs = top_probs / top_probs.sum(-1, keepdim=True)
    dropped = layer.lora_dropout(x2.to(layer.lora_A.dtype))
    delta = torch.zeros(x2.shape[0], layer.out_features, dtype=layer.lora_A.dtype, device=x.device)
    mask = torch.zeros_like(probs)
    for expert in range(layer.num_experts):
        chosen = top_index == expert  # (T, K)
        weight = (top_probs * chosen).sum(-1)  # (T,)
        mask[:, expert] = chosen.any(-1).float()
        if not chosen.any().item():  # the host sync per expert that the fast path avoids
            continue
        update = dropped @ layer.lora_A[expert].t() @ layer.lora_B[expert].t()  # (T, out)
        delta = delta + layer.scaling * weight.unsqueeze(-1).to(update.dtype) * update
    return result + delta.view(result.shape).to(result.dtype), probs, mask


def loop_aux_loss(probs: list[Tensor], masks: list[Tensor], top_k: int) -> Tensor:
    """Switch load-balancing loss over a layer's modules, from their (T, N) probs and masks."""
    p = torch.cat(probs).mean(0)  # (N,)
    f = torch.cat(masks).sum(0) / (torch.cat(masks).shape[0] * top_k)  # (N,)
    return p.shape[0] * (f * p).sum()


class LoopMolaLinear(torch.nn.Module):
    """Drop-in module running `loop_forward` on a `MolaLinear`'s parameters (for benchmarks)."""

    def __init__(self, layer: MolaLinear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return loop_forward(self.layer, x)[0]
