"""How many trainable parameters an adapter will have, from module shapes alone.

Torch-free on purpose, like :mod:`mola.config`: the service counts a job's adapter when the job
is requested, from the shapes the model catalogue recorded, before any model is loaded.

    MoLA module (N experts, rank r):  N * r * (in + out)  +  N * in     (experts + router)
    LoRA module (rank R):             R * (in + out)

A target names a module inside a decoder layer by its path or a dotted suffix of it:
``q_proj`` and ``self_attn.q_proj`` both name ``self_attn.q_proj``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# Per decoder layer, {path inside the layer: (in_features, out_features)} of its linear modules.
LayerShapes = Sequence[Mapping[str, Sequence[int]]]


def matches_target(path: str, target: str) -> bool:
    """Whether ``target`` names the module at ``path`` (inside a decoder layer)."""
    return path == target or path.endswith("." + target)


def mola_module_parameters(num_experts: int, rank: int, in_features: int, out_features: int) -> int:
    """One MoLA module: ``num_experts`` rank-``rank`` experts (A: r x in, B: out x r) and the
    router (num_experts x in, no bias)."""
    return num_experts * rank * (in_features + out_features) + num_experts * in_features


def lora_module_parameters(rank: int, in_features: int, out_features: int) -> int:
    return rank * (in_features + out_features)


def lora_rank_of_size(layer_shapes: LayerShapes, targets: Sequence[str], parameters: int) -> int:
    """The plain LoRA rank whose adapter on the same targets comes closest to ``parameters``
    trainable parameters (at least 1): a MoLA adapter's baseline of equal size.

        LoRA parameters = R * sum over the targeted modules of (in + out)
    """
    per_rank = adapter_parameter_count(layer_shapes, targets, 1)
    if per_rank == 0:
        raise ValueError(f"no module of the model matches the targets {list(targets)}")
    return max(1, round(parameters / per_rank))


def adapter_parameter_count(
    layer_shapes: LayerShapes, targets: Sequence[str], rank: int, experts: Sequence[int] | None = None
) -> int:
    """Trainable parameters of the adapter on every module of ``layer_shapes`` a target names:
    MoLA with ``experts[j]`` experts in layer j, or plain LoRA when ``experts`` is None."""
    if experts is not None and len(experts) != len(layer_shapes):
        raise ValueError(f"experts has {len(experts)} entries for {len(layer_shapes)} layers")
    total = 0
    for index, shapes in enumerate(layer_shapes):
        for path, (in_features, out_features) in shapes.items():
            if not any(matches_target(path, target) for target in targets):
                continue
            if experts is None:
                total += lora_module_parameters(rank, in_features, out_features)
            else:
                total += mola_module_parameters(experts[index], rank, in_features, out_features)
    return total
