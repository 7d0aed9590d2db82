"""What a job request would do, known before it runs: how many examples its datasets give,
how many steps that makes, and whether it would fail at its start.

The worker learns the examples by tokenizing. An upload's token counts (the quick task's, per
base model at the default `cutoff_len`) already say it: every row of the upload that renders
with the model's tokenizer, less those a cut at `cutoff_len` leaves without a trainable token.
Where the counts are for this job's model and `cutoff_len` (or `train_on_inputs` makes every
token trainable), the plan is exact; otherwise the row count stands in, an upper bound.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy.orm import Session

from mola import schedule
from mola.sizing import adapter_parameter_count, lora_rank_of_size
from service.errors import InvalidRequest
from service.models import BaseModelEntry, Dataset

SPLITS = (("train", "dataset_id"), ("validation", "validation_dataset_id"))
COUNTED = ("valid_rows", "dropped_at_cutoff", "cutoff_len")  # the token counts a plan needs


def split_plan(dataset: Dataset, base_model: str, hp: dict[str, Any]) -> dict[str, Any]:
    """``{"dataset_id", "rows", "examples", "exact", "over_cutoff", "dropped_at_cutoff",
    "basis"}`` for one dataset of a job (``hp``: its hyperparameters, defaults filled in)."""
    report = dataset.report or {}
    rows = report.get("valid_rows", dataset.rows)
    counts = (dataset.token_counts or {}).get(base_model) if dataset.token_counts_status == "ready" else None
    if counts is not None and not all(isinstance(counts.get(k), int) for k in COUNTED):
        counts = None  # without these a plan cannot go by the counts: the row count stands in
    cutoff_len, every_token = hp.get("cutoff_len"), bool(hp.get("train_on_inputs"))
    plan: dict[str, Any] = {"dataset_id": dataset.id, "rows": rows, "examples": rows, "exact": False, "over_cutoff": None, "dropped_at_cutoff": None}
    if counts and (counts["cutoff_len"] == cutoff_len or every_token):
        # With train_on_inputs every token of a row is trainable: no cut drops a row.
        dropped = 0 if every_token else counts["dropped_at_cutoff"]
        plan.update(rows=counts["valid_rows"], examples=counts["valid_rows"] - dropped, exact=True, dropped_at_cutoff=dropped)
        if counts["cutoff_len"] == cutoff_len:
            plan["over_cutoff"] = counts.get("over_cutoff")
        plan["basis"] = f"the upload's token counts with {base_model}'s tokenizer at cutoff_len={counts['cutoff_len']}"
    elif counts:
        plan["basis"] = f"its token counts are at cutoff_len={counts['cutoff_len']}, not {cutoff_len}"
    else:
        state = dataset.token_counts_status or "not recorded"
        plan["basis"] = f"its token counts for {base_model} are {'missing' if state == 'ready' else state}"
    return plan


def plan(session: Session, spec: dict[str, Any]) -> dict[str, Any]:
    """``{"data": {"train": split_plan, "validation": split_plan | None}, "schedule": {...},
    "warnings": [...]}`` for a job's ``spec`` (`service.jobs.build_spec`)."""
    hp = spec["hyperparameters"]
    data: dict[str, Any] = {"validation": None}
    empty_targets: dict[str, int] = {}
    for split, field in SPLITS:
        dataset = session.get(Dataset, spec[field]) if spec.get(field) else None
        if dataset is not None:
            data[split] = split_plan(dataset, spec["base_model"], hp)
            empty_targets[field] = (dataset.report or {}).get("empty_targets") or 0  # absent from older reports
    train = data["train"]
    examples, max_steps = train["examples"], hp.get("max_steps")
    total = schedule.total_steps(examples, hp["batch_size"], hp["epochs"], max_steps)
    per_epoch = schedule.steps_per_epoch(examples, hp["batch_size"]) if examples else None
    steps = {
        # With max_steps: the passes over the examples that many steps make.
        "epochs": round(max_steps / per_epoch, 3) if per_epoch and max_steps is not None else hp["epochs"],
        "steps_per_epoch": per_epoch,
        "total_steps": total if examples else None,
        "warmup_steps": schedule.warmup_steps(hp.get("warmup_steps"), schedule.DEFAULT_WARMUP_RATIO, total) if examples else None,
        "micro_batches_per_step": math.ceil(hp["batch_size"] / hp["micro_batch_size"]),
        # max_steps fixes the steps; with epochs they follow from the examples.
        "exact": max_steps is not None or train["exact"],
    }
    warnings = []
    for (_, field), split in zip(SPLITS, (train, data["validation"])):
        if split and split["over_cutoff"]:
            warnings.append(f"{field}: {split['over_cutoff']} of its {split['rows']} rows are longer than cutoff_len={hp['cutoff_len']} and will be cut")
        if split and not split["exact"]:
            warnings.append(
                f"{field}: the plan counts all {split['rows']} rows as examples ({split['basis']}); rows that the cut at "
                f"cutoff_len={hp['cutoff_len']} leaves without a trainable token are dropped when the run starts"
            )
    for field, count in empty_targets.items():
        if count:
            warnings.append(
                f"{field}: {count} of its rows have an empty completion (output, completion or final reply): "
                "they teach the model to end its answer at once"
            )
    return {"data": data, "schedule": steps, "warnings": warnings, "equal_size_lora": equal_size_lora(session, spec)}


def equal_size_lora(session: Session, spec: dict[str, Any]) -> dict[str, int] | None:
    """For a MoLA job: the plain LoRA on the same targets whose adapter is closest in size,
    ``{"rank", "adapter_parameters"}``, the baseline the paper's comparisons need (None for a
    LoRA job, or a model whose recorded shapes do not size these targets: synced before module
    shapes, or before module paths, when a dotted target was matched by its last part)."""
    model = session.get(BaseModelEntry, spec["base_model"])
    if spec["method"] != "mola" or not spec.get("adapter_parameters") or model is None or model.module_shapes is None:
        return None
    targets = spec["hyperparameters"]["target_modules"]
    try:
        rank = lora_rank_of_size(model.module_shapes, targets, spec["adapter_parameters"])
    except ValueError:
        return None
    return {"rank": rank, "adapter_parameters": adapter_parameter_count(model.module_shapes, targets, rank)}


def _refuse_unrenderable_rows(session: Session, field: str, counted: dict[str, Any] | None, base_model: str) -> None:
    """A 422 for a dataset with rows that this model's tokenizer cannot render (its chat template
    refuses a conversation, say): the upload's token counts for the model count fewer valid rows
    than its validation did, and the run would fail on the first of them."""
    dataset = session.get(Dataset, counted["dataset_id"]) if counted else None
    if dataset is None or dataset.token_counts_status != "ready":
        return
    counts = (dataset.token_counts or {}).get(base_model) or {}
    valid, rendered = (dataset.report or {}).get("valid_rows"), counts.get("valid_rows")
    if isinstance(valid, int) and isinstance(rendered, int) and rendered < valid:
        # Counts taken before they named the rows only say how many.
        named = [row for row in counts.get("unrenderable") or [] if isinstance(row, dict)][:3]
        which = "; ".join(f"line {row.get('line')}: {row.get('message')}" for row in named) or "its chat template refuses them, say"
        raise InvalidRequest(
            ("body", field),
            f"{dataset.id}: {valid - rendered} of its {valid} rows cannot be rendered with {base_model}'s tokenizer "
            f"({which}) and the run would fail on the first: upload the data without them, or train another base model",
        )


def refuse_doomed(session: Session, spec: dict[str, Any], planned: dict[str, Any] | None = None) -> None:
    """A 422 for a job that the plan shows would fail at its start, as the worker would find
    after tokenizing: a dataset with rows the model's tokenizer cannot render, a dataset of which
    no row keeps a trainable token within `cutoff_len`, or (with epochs) a `warmup_steps` longer
    than the run. Only what the plan knows exactly."""
    planned = planned or plan(session, spec)
    hp = spec["hyperparameters"]
    for split, field in SPLITS:
        counted = planned["data"].get(split)
        _refuse_unrenderable_rows(session, field, counted, spec["base_model"])
        if counted and counted["exact"] and counted["rows"] and counted["examples"] == 0:
            dataset = session.get(Dataset, counted["dataset_id"])
            counts = (dataset.token_counts or {}).get(spec["base_model"]) or {} if dataset is not None else {}
            entry = session.get(BaseModelEntry, spec["base_model"])
            limit = f" ({spec['base_model']} takes up to {entry.max_positions})" if entry is not None and entry.max_positions else ""
            mean, longest = counts.get("mean_tokens"), counts.get("max_tokens")
            sizes = f" (the rows have up to {longest} tokens, {mean:g} on average)" if isinstance(mean, (int, float)) and longest else ""
            raise InvalidRequest(
                ("body", "hyperparameters", "cutoff_len"),
                f"{field} {counted['dataset_id']}: none of its {counted['rows']} rows keeps a trainable token within cutoff_len={hp['cutoff_len']} "
                f"with {spec['base_model']}'s tokenizer{sizes}: raise cutoff_len{limit}, shorten the prompts, or set train_on_inputs",
            )
    steps = planned["schedule"]
    warmup = hp.get("warmup_steps")
    if steps["exact"] and warmup is not None and steps["total_steps"] is not None and warmup > steps["total_steps"]:
        raise InvalidRequest(
            ("body", "hyperparameters", "warmup_steps"),
            f"{warmup} is more than the run's {steps['total_steps']} steps ({planned['data']['train']['examples']} examples, "
            f"batch_size {hp['batch_size']}, {hp['epochs']:g} epochs): the warmup must fit in the run",
        )
