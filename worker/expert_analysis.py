"""A finished MoLA job's expert analysis: how its adapter routes tokens and how far apart its
experts moved, from `mola.analysis.expert_report`, stored on the job (GET /jobs/{id}/analysis)
and summarised in the adapter's model card.

The validation examples are routed when the job has them (what the adapter was not trained
on), else the training examples; the first `ANALYSIS_EXAMPLES` of them, in the run's
micro-batches and under its autocast. It costs a forward pass over those examples, a sliver
of a training run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

# Enough tokens for stable shares (tens of thousands at a typical length), cheap to route.
ANALYSIS_EXAMPLES = 256


def analyse_experts(model: Any, tokenizer: Any, split: str, examples: Sequence[dict], batch_size: int, bf16: bool) -> dict[str, Any]:
    """``{"status": "ready", "split", "examples", "tokens", "layers", "modules"}``, or
    ``{"status": "failed", "error"}``: the adapter is what the job is for, so an analysis that
    fails (out of memory, say) is reported, never a failed job."""
    import torch

    from mola.analysis import expert_report
    from mola.data import collate
    from mola.evaluate import pad_token_id

    chosen = list(examples[:ANALYSIS_EXAMPLES])
    try:
        pad = pad_token_id(tokenizer)
        batches = (collate(chosen[i : i + batch_size], pad) for i in range(0, len(chosen), batch_size))
        report = expert_report(model, batches, autocast_dtype=torch.bfloat16 if bf16 else None)
    except Exception as exc:  # noqa: BLE001 - any failure is reported on the job, see above
        logger.warning("expert analysis failed: %s", exc, exc_info=True)
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000]}
    return {"status": "ready", "split": split, "examples": len(chosen), **report}


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def card_section(analysis: dict[str, Any] | None) -> list[str]:
    """The model card's "Experts" section: per layer, how evenly the experts are used and how
    different they are. Empty without a ready analysis."""
    if not analysis or analysis.get("status") != "ready":
        return []
    lines = [
        "",
        "## Experts",
        "",
        f"Routing of the first {analysis['examples']} {analysis['split']} examples ({analysis['tokens']:,} tokens). "
        "Busiest and idlest: the largest and the smallest share of the tokens that an expert of "
        "one of the layer's modules gets, over the fair share top-k / experts (1.00 for both is "
        "perfectly balanced; near 0, an expert its router no longer uses). "
        "Distance / norm: the mean distance between the experts' updates over their mean size "
        "(the paper's redundancy; low means similar experts).",
        "",
        "| layer | experts | top-k | busiest | idlest | distance / norm |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in analysis["layers"]:
        lines.append(
            f"| {row['layer']} | {row['num_experts']} | {row['top_k']} | {_ratio(row['max_load'])} | "
            f"{_ratio(row['min_load'])} | {_ratio(row['relative_distance'])} |"
        )
    return lines
