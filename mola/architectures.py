"""Find a causal LM's decoder layers and the modules to adapt in each, from its structure.

The decoder stack is the `nn.ModuleList` whose length is the config's number of hidden layers
(`model.model.layers` for LLaMA, Mistral and Qwen2; `model.transformer.h` for GPT-2). Layer
indices come from positions in that list, never from parsing module names.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mola.layer import Conv1D
from mola.sizing import matches_target


@dataclass(frozen=True)
class TargetModule:
    layer_index: int
    name: str  # full dotted path in the model, e.g. "model.layers.3.self_attn.q_proj"
    relative_name: str  # path inside the decoder layer, e.g. "self_attn.q_proj"
    module: nn.Module


def num_decoder_layers(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for attribute in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError("cannot tell the number of decoder layers: the model config has no num_hidden_layers")


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's position embeddings cover, from its config
    (``max_position_embeddings``; GPT-2's ``n_positions``), or None when the config says not."""
    config = getattr(model, "config", None)
    for attribute in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted path, ModuleList) of the decoder stack."""
    expected = num_decoder_layers(model)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == expected
    ]
    if not candidates:
        raise TypeError(
            f"{type(model).__name__}: found no list of {expected} decoder layers in the model"
        )
    # The shallowest such list is the decoder stack (deeper ones would sit inside a layer).
    return min(candidates, key=lambda item: item[0].count("."))


def find_target_modules(model: nn.Module, targets: list[str]) -> list[TargetModule]:
    """All modules inside decoder layers whose path ends with one of ``targets``.

    Raises ``ValueError`` when a target matches nothing (listing the names that exist) and
    ``TypeError`` when a match is not a linear layer MoLA can adapt.
    """
    stack_name, layers = find_decoder_layers(model)
    found: list[TargetModule] = []
    used: set[str] = set()
    available: set[str] = set()
    for index, layer in enumerate(layers):
        for relative, module in layer.named_modules():
            if not relative:
                continue
            if isinstance(module, (nn.Linear, Conv1D)) if Conv1D else isinstance(module, nn.Linear):
                available.add(relative.rsplit(".", 1)[-1])
            hits = [t for t in targets if matches_target(relative, t)]
            if not hits:
                continue
            if not (isinstance(module, nn.Linear) or (Conv1D and isinstance(module, Conv1D))):
                raise TypeError(
                    f"target {hits[0]!r} matches {stack_name}.{index}.{relative}, a "
                    f"{type(module).__name__}; MoLA adapts only nn.Linear and Conv1D modules"
                )
            used.update(hits)
            found.append(TargetModule(index, f"{stack_name}.{index}.{relative}", relative, module))
    missing = [t for t in targets if t not in used]
    if missing:
        raise ValueError(
            f"target_modules {missing} match no module in the decoder layers; "
            f"linear modules there: {', '.join(sorted(available))}"
        )
    return found


def set_submodule(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
