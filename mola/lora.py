"""The plain-LoRA baseline through peft, and LoRA ranks matched to a MoLA adapter's size.

`get_lora_model` is what the trainer uses for ``method="lora"`` and what `bench/` times next to
MoLA. `matched_rank_pattern` gives every adapted module the LoRA rank whose trainable parameter
count is nearest to that module's MoLA count, so that MoLA and LoRA are compared at equal
trainable parameters per layer:

    MoLA module (N experts, rank r):  N * r * (in + out)  +  N * in     (experts + router)
    LoRA module (rank R):             R * (in + out)
    R ~ N * r + N * in / (in + out), rounded so each decoder layer's total matches

Both locate the modules with `mola.architectures.find_target_modules` (the model's structure),
so LoRA adapts exactly the modules MoLA adapts, named by their full dotted paths.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import nn

from mola.architectures import find_target_modules, num_decoder_layers
from mola.config import DEFAULT_TARGETS, MolaConfig
from mola.layer import Conv1D, linear_features
from mola.sizing import lora_module_parameters, mola_module_parameters

logger = logging.getLogger(__name__)

__all__ = [
    "ModuleCount",
    "get_lora_model",
    "matched_rank_pattern",
    "matched_alpha_pattern",
    "parameter_counts",
    "lora_target_names",
    "mola_parameter_count",
    "lora_parameter_count",
]


def _default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(
            f"no default target modules for model type {model_type!r}; "
            f"pass target_modules (known defaults: {', '.join(sorted(DEFAULT_TARGETS))})"
        )
    return list(DEFAULT_TARGETS[model_type])


def lora_target_names(model: nn.Module, target_modules: list[str] | None = None) -> list[str]:
    """Full dotted names of the modules to adapt (``model.layers.3.self_attn.q_proj``).

    ``target_modules`` are short names matched inside each decoder layer, as for MoLA; ``None``
    picks the architecture's default (:data:`mola.config.DEFAULT_TARGETS`).
    """
    if isinstance(target_modules, str):
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    targets = list(target_modules) if target_modules else _default_targets(model)
    return [t.name for t in find_target_modules(model, targets)]


def get_lora_model(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.05,
    target_modules: list[str] | None = None,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
):
    """Wrap ``model`` in a peft LoRA adapter (a `peft.PeftModel`); the base model is frozen.

    The adapted modules are the same ones MoLA would adapt (decoder-layer modules matching
    ``target_modules``), passed to peft by full name so that nothing outside the decoder stack
    (``lm_head``, say) is caught by a suffix match. ``rank_pattern`` / ``alpha_pattern`` map full
    module names to a per-module rank / alpha (see :func:`matched_rank_pattern`).
    GPT-2's `Conv1D` stores its weight as (in, out), hence ``fan_in_fan_out``.
    """
    from peft import LoraConfig, get_peft_model  # imported here: peft is only needed for LoRA

    names = lora_target_names(model, target_modules)
    fan_in_fan_out = bool(Conv1D) and any(isinstance(model.get_submodule(n), Conv1D) for n in names)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=names,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    # peft records the base model by the path from_pretrained read (a cache folder for the
    # built-in SmolLM2; nothing for a model built from a config): record the name it was loaded
    # by instead, as a MoLA adapter does, so that loading the adapter finds its base again.
    peft_model.peft_config["default"].base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info("LoRA: %d modules, %d trainable parameters", len(names), trainable)
    return peft_model


@dataclass(frozen=True)
class ModuleCount:
    """Trainable parameters of one adapted module under MoLA and under LoRA of rank ``lora_rank``."""

    name: str
    layer_index: int
    in_features: int
    out_features: int
    num_experts: int
    mola: int
    lora_rank: int
    lora: int


def _modules(model: nn.Module, mola_config: MolaConfig):
    """(target, num_experts, in, out) for every module the MoLA config would adapt in ``model``
    (a base model, before MoLA or LoRA is injected into it)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    experts, _ = mola_config.resolve(num_decoder_layers(model))
    for target in find_target_modules(model, mola_config.targets_for(model_type)):
        in_features, out_features = linear_features(target.module)
        yield target, experts[target.layer_index], in_features, out_features


def mola_parameter_count(model: nn.Module, mola_config: MolaConfig) -> int:
    """The trainable parameters `get_mola_model(model, mola_config)` would create, from the base
    model's module shapes alone (nothing is allocated): routers, A and B of every expert."""
    return sum(mola_module_parameters(n, mola_config.rank, fan_in, fan_out) for _, n, fan_in, fan_out in _modules(model, mola_config))


def lora_parameter_count(model: nn.Module, rank: int, target_modules: list[str] | None = None) -> int:
    """The trainable parameters `get_lora_model(model, rank, target_modules=...)` would create
    (``rank * (in + out)`` per adapted module), from the module shapes alone."""
    targets = list(target_modules) if target_modules else _default_targets(model)
    return sum(lora_module_parameters(rank, *linear_features(t.module)) for t in find_target_modules(model, targets))


def matched_rank_pattern(model: nn.Module, mola_config: MolaConfig) -> dict[str, int]:
    """Per adapted module (full dotted name), a LoRA rank whose trainable parameter count
    matches the MoLA module's, ``N * r + N * in / (in + out)`` rounded to an integer.

    Rounding each module alone could leave a layer up to half a rank off per module (6% for
    N=1, r=8). So within each decoder layer the ranks are rounded up or down by error
    diffusion: modules in decreasing ``in + out``, each taking the floor or ceiling that brings
    the layer's running total closest to MoLA's. A layer's total is then off by at most half of
    its smallest module's ``in + out`` parameters, each module by at most one rank.
    Feed it to ``get_lora_model(..., rank_pattern=...)`` with :func:`matched_alpha_pattern`.
    """
    layers: dict[int, list[tuple[str, int, int]]] = {}
    for target, n, fan_in, fan_out in _modules(model, mola_config):
        mola = mola_module_parameters(n, mola_config.rank, fan_in, fan_out)
        layers.setdefault(target.layer_index, []).append((target.name, mola, fan_in + fan_out))
    ranks: dict[str, int] = {}
    for modules in layers.values():
        surplus = 0  # LoRA minus MoLA parameters so far in this layer
        for name, mola, width in sorted(modules, key=lambda m: -m[2]):
            low = max(1, mola // width)
            rank = min((low, low + 1), key=lambda k: abs(surplus + k * width - mola))
            ranks[name] = rank
            surplus += rank * width - mola
    # Back to model order, so the pattern reads like the model.
    return {name: ranks[name] for modules in layers.values() for name, _, _ in modules}


def matched_alpha_pattern(rank_pattern: dict[str, int], scaling: float) -> dict[str, float]:
    """Alphas that keep every module's scaling ``alpha / rank`` equal to ``scaling``.

    Why alpha grows with the rank: MoLA scales each expert's update by s = alpha / r; giving
    the matched LoRA the same s (alpha_R = s * R) makes ``s * B A`` respond to an optimiser step
    as MoLA's experts do, so one learning rate serves both. With a fixed alpha, a rank-68 LoRA
    would have s = 16/68 instead of 2, an 8.5x smaller effective step.
    """
    return {name: float(scaling * rank) for name, rank in rank_pattern.items()}


def parameter_counts(
    model: nn.Module, mola_config: MolaConfig, rank_pattern: dict[str, int] | None = None
) -> dict[str, Any]:
    """Trainable parameters of MoLA and of LoRA with ``rank_pattern`` (default: the matched one),
    from the module shapes alone, per module, per decoder layer and in total.

    Returns ``{"modules": [ModuleCount...], "layers": {j: {"mola", "lora"}}, "mola": int,
    "lora": int, "relative_difference": (lora - mola) / mola}``.
    """
    if rank_pattern is None:
        rank_pattern = matched_rank_pattern(model, mola_config)
    modules, layers = [], {}
    for target, n, fan_in, fan_out in _modules(model, mola_config):
        rank = rank_pattern.get(target.name, mola_config.rank)
        count = ModuleCount(
            target.name, target.layer_index, fan_in, fan_out, n,
            mola_module_parameters(n, mola_config.rank, fan_in, fan_out), rank, lora_module_parameters(rank, fan_in, fan_out),
        )  # fmt: skip
        modules.append(count)
        layer = layers.setdefault(target.layer_index, {"mola": 0, "lora": 0})
        layer["mola"] += count.mola
        layer["lora"] += count.lora
    mola_total = sum(m.mola for m in modules)
    lora_total = sum(m.lora for m in modules)
    return {
        "modules": modules,
        "layers": layers,
        "mola": mola_total,
        "lora": lora_total,
        "relative_difference": (lora_total - mola_total) / mola_total,
    }
