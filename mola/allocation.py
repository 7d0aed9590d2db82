"""Layer-wise expert allocation: turn a user's spec into one expert count per decoder layer.

This module is deliberately free of torch so that the service can validate allocations
without loading a deep-learning stack.

Accepted specs (see :func:`expand_allocation`):

* an explicit list/tuple with one positive integer per layer;
* a digit string such as ``"2468"`` (the paper's notation): the layers are split into as many
  contiguous groups as there are digits, as equal as possible, earlier groups taking the
  remainder, and each group gets its digit;
* a comma string such as ``"2,2,4,4"``: one entry per layer, or one entry per group when it has
  fewer entries than layers (so ``"2,4,6,8"`` means the same as ``"2468"`` and allows counts
  above 9, e.g. ``"4,12"``);
* a preset: ``{"preset": "inverted_triangle", "average": 5}`` (or a ``"inverted_triangle:5"``
  string). Presets keep the total number of experts equal to ``average * num_layers``, the
  rectangle's budget; their largest layer (up to 5/3 of the average) must stay within
  :data:`MAX_EXPERTS_PER_LAYER` like any other count.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence

MAX_EXPERTS_PER_LAYER = 256
PRESETS = ("rectangle", "triangle", "inverted_triangle", "hourglass")

__all__ = [
    "MAX_EXPERTS_PER_LAYER",
    "PRESETS",
    "expand_allocation",
    "expand_top_k",
    "group_sizes",
    "describe_allocation",
]


def group_sizes(num_layers: int, num_groups: int) -> list[int]:
    """Sizes of ``num_groups`` contiguous groups covering ``num_layers`` layers, as equal as
    possible; the first ``num_layers % num_groups`` groups get one extra layer."""
    base, extra = divmod(num_layers, num_groups)
    return [base + (1 if g < extra else 0) for g in range(num_groups)]


def _per_group(values: Sequence[int], num_layers: int) -> list[int]:
    if len(values) > num_layers:
        raise ValueError(
            f"allocation has {len(values)} groups but the model has only {num_layers} layers"
        )
    out: list[int] = []
    for value, size in zip(values, group_sizes(num_layers, len(values))):
        out.extend([value] * size)
    return out


def _check_counts(counts: Sequence[object], num_layers: int, what: str, unit: str = "layer") -> list[int]:
    """``unit``: what one entry stands for in messages ("layer", "group" of layers, "entry")."""
    if len(counts) != num_layers:
        raise ValueError(
            f"{what} has {len(counts)} entries but the model has {num_layers} layers"
        )
    checked = []
    for index, value in enumerate(counts):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ValueError(f"{what}: {unit} {index} has {value!r}, expected a whole number")
        value = int(value)  # numpy's integers are whole numbers too, but not JSON's
        if value < 1:
            raise ValueError(f"{what}: {unit} {index} has {value}, expected at least 1")
        if value > MAX_EXPERTS_PER_LAYER:
            raise ValueError(
                f"{what}: {unit} {index} has {value}, more than the limit of "
                f"{MAX_EXPERTS_PER_LAYER}"
            )
        checked.append(value)
    return checked


def _preset(name: str, average: object, num_layers: int) -> list[int]:
    if name not in PRESETS:
        raise ValueError(f"unknown allocation preset {name!r}; choose one of {', '.join(PRESETS)}")
    if (
        isinstance(average, bool)
        or not isinstance(average, numbers.Real)
        or not math.isfinite(average)
        or average < 1
    ):
        raise ValueError(f"preset {name!r}: average must be a number >= 1, got {average!r}")
    if average > MAX_EXPERTS_PER_LAYER:
        raise ValueError(f"preset {name!r}: average {average} exceeds {MAX_EXPERTS_PER_LAYER}")
    total = round(average * num_layers)
    if name == "rectangle":
        shape = [1.0] * num_layers
    else:
        # Linear ramp from low to high (triangle: more experts in lower layers, as the paper's
        # MoLA-triangle "8642"; inverted triangle: more in higher layers, "2468").
        position = [(j + 0.5) / num_layers for j in range(num_layers)]
        if name == "inverted_triangle":
            shape = [0.25 + p for p in position]
        elif name == "triangle":
            shape = [1.25 - p for p in position]
        else:  # hourglass: many at both ends, few in the middle ("8228")
            shape = [0.25 + 2 * abs(p - 0.5) for p in position]
    counts = _apportion(shape, total)
    _check_preset_limit(name, average, counts)
    return counts


def _check_preset_limit(name: str, average: float, counts: Sequence[int]) -> None:
    """A ramp gives its top layers more than the average (up to 5/3 of it), so an average
    below the limit can still put more than :data:`MAX_EXPERTS_PER_LAYER` experts in a layer."""
    largest = max(counts)
    if largest > MAX_EXPERTS_PER_LAYER:
        layer = counts.index(largest)
        raise ValueError(
            f"allocation preset '{name}:{average:g}' on {len(counts)} layers: layer {layer} "
            f"has {largest}, more than the limit of {MAX_EXPERTS_PER_LAYER} (lower the average)"
        )


def _apportion(shape: Sequence[float], total: int) -> list[int]:
    """Integer counts >= 1 proportional to ``shape`` that sum exactly to ``total``
    (largest-remainder method)."""
    n = len(shape)
    total = max(total, n)
    scale = (total - n) / sum(shape)
    raw = [s * scale for s in shape]
    counts = [1 + int(r) for r in raw]
    remainders = sorted(range(n), key=lambda j: raw[j] - int(raw[j]), reverse=True)
    for j in remainders[: total - sum(counts)]:
        counts[j] += 1
    return counts


def expand_allocation(spec: object, num_layers: int) -> list[int]:
    """Expand an allocation spec into a list of expert counts, one per decoder layer.

    Raises ``ValueError`` naming the layer and the value for wrong lengths, counts below 1,
    non-integers or counts above :data:`MAX_EXPERTS_PER_LAYER`.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"preset", "average"}
        if unknown or "preset" not in spec or "average" not in spec:
            raise ValueError(
                f"an allocation mapping needs 'preset' and 'average' keys, got {sorted(spec)}"
            )
        return _preset(str(spec["preset"]), spec["average"], num_layers)
    if isinstance(spec, str):
        text = spec.strip()
        if not text:
            raise ValueError("allocation is an empty string")
        if ":" in text:
            name, _, average = text.partition(":")
            try:
                avg = float(average)
            except ValueError:
                raise ValueError(f"preset average {average!r} is not a number") from None
            return _preset(name.strip(), avg, num_layers)
        if text in PRESETS:
            raise ValueError(f"preset {text!r} needs an average, e.g. '{text}:5'")
        if re.fullmatch(r"\d+", text):
            counts = _check_counts([int(c) for c in text], len(text), "allocation", "group")
            return _per_group(counts, num_layers)
        # A comma list. Split first, then check each entry: a regex over the whole list
        # backtracks exponentially on a bad one (a trailing comma took minutes at 30 entries).
        values: list[object] = []
        for index, part in enumerate(p.strip() for p in text.split(",")):
            if not part:
                raise ValueError(f"allocation entry {index} is empty (a stray comma?)")
            if not re.fullmatch(r"-?\d+", part):
                raise ValueError(f"allocation entry {index} is {part!r}, not a whole number")
            values.append(int(part))
        # "entry": whether entries are layers or groups depends on the model's depth.
        if len(values) == num_layers:
            return _check_counts(values, num_layers, "allocation", "entry")
        counts = _check_counts(values, len(values), "allocation", "entry")
        return _per_group(counts, num_layers)
    if isinstance(spec, Sequence) and not isinstance(spec, (bytes, bytearray)):
        return _check_counts(list(spec), num_layers, "allocation")
    raise ValueError(f"allocation must be a list, a string or a preset mapping, got {spec!r}")


def expand_top_k(top_k: object, experts: Sequence[int]) -> list[int]:
    """Expand ``top_k`` (an int, or a list with one entry per layer) against per-layer expert
    counts. A top-k larger than a layer's number of experts is clamped to that number: the layer
    then mixes all of its experts (and a one-expert layer is plain LoRA)."""
    num_layers = len(experts)
    if isinstance(top_k, (list, tuple)):
        ks = _check_counts(list(top_k), num_layers, "top_k")
    else:
        ks = _check_counts([top_k] * num_layers, num_layers, "top_k")
    return [min(k, n) for k, n in zip(ks, experts)]


def describe_allocation(experts: Sequence[int]) -> str:
    """Short human form, e.g. ``'2x8 4x7 6x7 8x8 (total 150)'`` for runs of equal counts."""
    runs: list[tuple[int, int]] = []
    for n in experts:
        if runs and runs[-1][0] == n:
            runs[-1] = (n, runs[-1][1] + 1)
        else:
            runs.append((n, 1))
    return " ".join(f"{n}x{c}" for n, c in runs) + f" (total {sum(experts)})"
