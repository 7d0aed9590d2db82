"""`MolaConfig`: every option of a MoLA adapter, validated when it is built.

Torch-free on purpose, like :mod:`mola.allocation`, so that a service can validate a request
against the same rules the trainer applies.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from mola.allocation import expand_allocation, expand_top_k

# Default projections per architecture (Hugging Face `model_type`). LLaMA-family names follow
# the paper (all seven projections). GPT-2 fuses q/k/v into `c_attn`; `c_proj` names both the
# attention output and the MLP output projections there.
DEFAULT_TARGETS: dict[str, list[str]] = {
    **{
        name: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2")
    },
    # Mixtral's MLP experts are one fused parameter per layer (transformers 5), not linear
    # modules: the attention projections are what can be adapted.
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}


def _nominal_depth(spec: Any) -> int:
    """A depth to check an allocation's syntax against before the model is known: its own
    length when it has one per layer, else enough layers for every group it names. A preset is
    checked on one layer: its name and average are what can be wrong before the model is
    known, while its largest layer grows with the depth (`resolve` checks that against the
    limit), so a nominal deep model would refuse averages that fit the real one."""
    if isinstance(spec, (list, tuple)):
        return len(spec)
    if isinstance(spec, str) and ":" not in spec:
        groups = len(spec.split(",")) if "," in spec else len(spec.strip())
        return max(64, groups)
    return 1


def _is_finite_number(value: Any) -> bool:
    """An int or float that is not a bool, NaN or infinite (NaN passes every comparison's
    negation, so range checks alone let it through)."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


@dataclass
class MolaConfig:
    """Configuration of a MoLA adapter.

    Attributes:
        experts: the layer-wise allocation: a list with one expert count per decoder layer, a
            digit string in the paper's notation (``"2468"``: contiguous quarters of the layers
            get 2, 4, 6 and 8 experts), a comma string (``"2,4,6,8"`` or one entry per layer) or a
            preset (``{"preset": "inverted_triangle", "average": 5}``). See
            :func:`mola.allocation.expand_allocation`.
        top_k: experts mixed per token: an int for every layer or a list, one per layer. A value
            above a layer's number of experts is clamped to it (the layer then mixes all its
            experts with softmax weights).
        rank: LoRA rank r of every expert.
        alpha: LoRA alpha; the update is scaled by ``alpha / rank``.
        dropout: dropout on the experts' input (not on the router's input).
        target_modules: names of the linear modules to adapt inside each decoder layer, matched
            against the module's path within the layer (``"q_proj"`` or ``"self_attn.q_proj"``).
            ``None`` picks the architecture's default (:data:`DEFAULT_TARGETS`).
        aux_loss_coef: weight of the load-balancing loss added to the LM loss.
        base_model_name_or_path: recorded in the saved adapter; filled in by ``get_mola_model``
            from the model's config when left empty.
    """

    experts: Any = "2468"
    top_k: Any = 2
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | None = None
    aux_loss_coef: float = 0.001
    base_model_name_or_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, numbers.Integral) or not 1 <= self.rank <= 4096:
            raise ValueError(f"rank must be an integer between 1 and 4096, got {self.rank!r}")
        self.rank = int(self.rank)  # a numpy integer would not serialise to adapter_config.json
        if not _is_finite_number(self.alpha) or self.alpha <= 0:
            raise ValueError(f"alpha must be a positive finite number, got {self.alpha!r}")
        if not _is_finite_number(self.dropout) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not _is_finite_number(self.aux_loss_coef) or self.aux_loss_coef < 0:
            raise ValueError(f"aux_loss_coef must be a finite number >= 0, got {self.aux_loss_coef!r}")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = [t.strip() for t in self.target_modules.split(",") if t.strip()]
            if not self.target_modules or not all(
                isinstance(t, str) and t for t in self.target_modules
            ):
                raise ValueError(
                    f"target_modules must be a non-empty list of module names, got {self.target_modules!r}"
                )
        # Syntax of the allocation and top_k is checked now, against a nominal depth when the
        # spec does not fix one; their length is checked against the model in `resolve`.
        experts = expand_allocation(self.experts, _nominal_depth(self.experts))
        per_layer_top_k = isinstance(self.top_k, (list, tuple))
        expand_top_k(self.top_k, [max(experts)] * len(self.top_k) if per_layer_top_k else experts)
        self.alpha = float(self.alpha)
        self.dropout = float(self.dropout)
        self.aux_loss_coef = float(self.aux_loss_coef)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def resolve(self, num_layers: int) -> tuple[list[int], list[int]]:
        """Per-layer expert counts and top-k for a model with ``num_layers`` decoder layers."""
        experts = expand_allocation(self.experts, num_layers)
        return experts, expand_top_k(self.top_k, experts)

    def targets_for(self, model_type: str | None) -> list[str]:
        if self.target_modules is not None:
            return list(self.target_modules)
        if model_type in DEFAULT_TARGETS:
            return list(DEFAULT_TARGETS[model_type])
        raise ValueError(
            f"no default target modules for model type {model_type!r}; "
            f"set target_modules (known defaults: {', '.join(sorted(DEFAULT_TARGETS))})"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MolaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown MolaConfig fields: {', '.join(unknown)}")
        return cls(**data)
