"""`MolaLinear`: a frozen linear layer plus a routed mixture of LoRA experts.

For input x (..., in), with N experts of rank r, top-k K and scaling s = alpha / r::

    p   = softmax(R x)                       # (T, N) router probabilities, float32
    w   = renormalised top-K of p, 0 elsewhere  # (T, N)
    y   = W x + s * sum_e w_e * B_e A_e dropout(x)

The sum over experts is computed without a Python loop over experts: all experts' A are one
(N*r, in) matrix, the gate scales each expert's r columns of the hidden activation, and all B are
one (N*r, out) matrix. So the cost is that of one LoRA of rank N*r plus the router.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mola.router import RoutingStats, routing_stats, top_k_gates

try:  # GPT-2 style layers store the weight transposed, as (in, out).
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency, but stay importable
    Conv1D = ()  # type: ignore[assignment]


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an `nn.Linear` or a transformers `Conv1D`."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if Conv1D and isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
        return in_features, out_features
    raise TypeError(
        f"MoLA can adapt nn.Linear and transformers Conv1D modules, not {type(module).__name__}"
    )


class RoutingRecorder:
    """Collects the routing statistics of the current forward pass, keyed by decoder layer.

    Shared by all `MolaLinear` modules of a model. The model wrapper turns it on for a forward
    pass, gives it the token mask (to leave padding out), and reads the statistics back to build
    the load-balancing loss.
    """

    def __init__(self) -> None:
        self.active = False
        self.token_mask: Tensor | None = None  # (B*T,) bool/float, or None
        self.records: list[tuple[MolaLinear, RoutingStats]] = []

    def start(self, token_mask: Tensor | None) -> None:
        self.active = True
        # float32 once per forward pass, not once per module
        self.token_mask = token_mask.float() if token_mask is not None else None
        self.records = []

    def stop(self) -> list[tuple[MolaLinear, RoutingStats]]:
        # The token mask stays: activation checkpointing re-runs the forward during backward,
        # and that recomputation must repeat the same statistics ops (see `observe`).
        records, self.records, self.active = self.records, [], False
        return records

    def observe(self, module: MolaLinear, gates: Tensor, probs: Tensor, selected: Tensor) -> None:
        """Compute the statistics of one module's routing; keep them while active.

        Called on every training-mode forward, recorded or not, so that a checkpointed
        recomputation saves exactly the tensors the original forward saved.
        """
        mask = self.token_mask
        if mask is not None and mask.shape[0] != probs.shape[0]:
            mask = None  # e.g. incremental decoding with a cache: count every token
        stats = routing_stats(gates, probs, selected, mask)
        if self.active:
            self.records.append((module, stats))


class MolaLinear(nn.Module):
    """A frozen base linear layer with a mixture of LoRA experts.

    Attributes (read them for analysis; shapes are part of the public contract):
        base_layer: the original, frozen module (`nn.Linear` or `Conv1D`).
        router: ``nn.Linear(in_features, num_experts, bias=False)``.
        lora_A: parameter of shape (num_experts, rank, in_features).
        lora_B: parameter of shape (num_experts, out_features, rank), zero at init.
        num_experts, top_k, rank, scaling, layer_index.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        num_experts: int,
        top_k: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        layer_index: int = 0,
        recorder: RoutingRecorder | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
        self.in_features, self.out_features = linear_features(base_layer)
        self.base_layer = base_layer
        self.num_experts = num_experts
        self.top_k = top_k
        self.rank = rank
        self.scaling = alpha / rank
        self.layer_index = layer_index
        self.recorder = recorder
        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype}
        self.router = nn.Linear(self.in_features, num_experts, bias=False, **factory)
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(num_experts, self.out_features, rank, **factory))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A and the router as `nn.Linear` initialises its weight (kaiming-uniform, a=sqrt(5)),
        B zero: at init the layer computes exactly the base layer."""
        nn.init.kaiming_uniform_(self.router.weight, a=math.sqrt(5))
        for expert in range(self.num_experts):
            nn.init.kaiming_uniform_(self.lora_A.data[expert], a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (T, in), in the adapter's dtype or under autocast -> (gates, probs, selected),
        each (T, N) float32."""
        return top_k_gates(self.router(x), self.top_k)  # router logits (T, N)

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)  # (..., out)
        n, r = self.num_experts, self.rank
        x2 = x.reshape(-1, self.in_features)  # (T, in)
        # One input for the router and the experts. Under autocast the matmuls cast to bf16
        # themselves, so an fp32 copy would only cost bandwidth and saved memory.
        if not torch.is_autocast_enabled(x.device.type):
            x2 = x2.to(self.lora_A.dtype)
        gates, probs, selected = self.route(x2)
        if self.recorder is not None and (self.recorder.active or self.training):
            self.recorder.observe(self, gates, probs, selected)
        a = self.lora_A.reshape(n * r, self.in_features)  # (N*r, in)
        b = self.lora_B.permute(1, 0, 2).reshape(self.out_features, n * r)  # (out, N*r)
        h = self.lora_dropout(x2) @ a.t()  # (T, N*r)
        h = h.view(-1, n, r) * (gates * self.scaling).to(h.dtype).unsqueeze(-1)  # (T, N, r)
        delta = h.view(-1, n * r) @ b.t()  # (T, out)
        return result + delta.view(result.shape).to(result.dtype)

    def delta_weights(self) -> Tensor:
        """Each expert's full update s * B_e A_e as an (N, out, in) tensor (for analysis)."""
        return self.scaling * torch.bmm(self.lora_B, self.lora_A)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_experts={self.num_experts}, top_k={self.top_k}, rank={self.rank}, "
            f"scaling={self.scaling:g}, layer_index={self.layer_index}"
        )
