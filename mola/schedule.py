"""How many optimizer steps a run takes, from its example count alone.

Torch-free on purpose, like :mod:`mola.sizing`: `mola.train` runs by these numbers, and the
service plans a job with them (`POST /jobs/plan`) before any model or tokenizer is loaded.
"""

from __future__ import annotations

import math

DEFAULT_WARMUP_RATIO = 0.03  # the warm-up when no warmup_steps are given: 3% of the steps


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Optimizer steps in one pass: the last batch may be short, never empty."""
    return max(1, math.ceil(num_examples / batch_size))


def total_steps(num_examples: int, batch_size: int, epochs: float, max_steps: int | None = None) -> int:
    """``max_steps`` when given, else ``epochs`` passes (fractions allowed), at least one step."""
    if max_steps is not None:
        return max_steps
    return max(1, math.ceil(steps_per_epoch(num_examples, batch_size) * epochs))


def warmup_steps(warmup_steps: int | None, warmup_ratio: float, total: int) -> int:
    """The warm-up length in steps: ``warmup_steps``, else ``warmup_ratio`` of the total."""
    return warmup_steps if warmup_steps is not None else round(warmup_ratio * total)
