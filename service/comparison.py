"""Jobs side by side (GET /jobs/compare): what each trained, how far it got, its losses and
speed, which settings differ between them, and where their numbers do not measure the same
thing. The paper's question ("which allocation is better at this budget?") is a comparison of a
few jobs that differ in one setting; this answers it in one request."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service import jobs as job_service
from service.errors import InvalidRequest
from service.models import Job, JobMetric

MAX_COMPARED = 20
# Of a job's last training metrics: what a comparison shows. `lm_loss` is the one to compare
# across methods: a MoLA job's `loss` adds its weighted load-balancing loss, a LoRA job has none.
TRAIN_SHOWN = ("loss", "lm_loss", "aux_loss", "tokens_per_s", "peak_memory_mb")
EVAL_SHOWN = ("eval_loss", "eval_exact_match", "eval_answer_accuracy")
# The settings whose differences a comparison lists first (then every hyperparameter).
COMPARED_FIELDS = ("base_model", "method", "dataset_id", "validation_dataset_id", "allocation", "top_k")
# What the request may leave to the run (null): the values the run chose are in its result.
DECIDED_BY_THE_RUN = ("warmup_steps", "bf16")


def parse_ids(text: str) -> list[str]:
    """``job_a,job_b``: 2 to MAX_COMPARED distinct ids, in order; `InvalidRequest` on
    ``query.ids`` otherwise."""
    ids = [part.strip() for part in text.split(",")]
    if any(not part for part in ids):
        raise InvalidRequest(("query", "ids"), "an empty id: give job ids separated by commas (job_a,job_b)")
    if not 2 <= len(ids) <= MAX_COMPARED:
        raise InvalidRequest(("query", "ids"), f"give 2 to {MAX_COMPARED} job ids to compare, got {len(ids)}")
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise InvalidRequest(("query", "ids"), f"{', '.join(repeated)} given more than once")
    return ids


def compare_jobs(session: Session, tenant_id: str, job_ids: Sequence[str]) -> dict[str, Any]:
    """The tenant's jobs ``job_ids`` side by side, in that order (`NotFound` naming the first
    that is not one of theirs): ``{"jobs": [...], "differences": [{"field", "values"}],
    "best_eval_loss": job id or None, "warnings": [...]}``."""
    jobs = [job_service.get_job(session, tenant_id, job_id) for job_id in job_ids]
    evals = _eval_rows(session, job_ids)
    last_train = _last_train_rows(session, job_ids)
    compared = [_compared(job, last_train.get(job.id), evals.get(job.id, [])) for job in jobs]
    warnings = _incomparable(compared)
    return {
        "jobs": compared,
        "differences": _differences(compared),
        # Only where every eval_loss measures the same tokens: otherwise the lowest means nothing.
        "best_eval_loss": None if any(about_eval for about_eval, _ in warnings) else _lowest_eval_loss(compared),
        "warnings": [warning for _, warning in warnings],
    }


def _eval_rows(session: Session, job_ids: Sequence[str]) -> dict[str, list[JobMetric]]:
    rows: dict[str, list[JobMetric]] = {}
    query = select(JobMetric).where(JobMetric.job_id.in_(job_ids), JobMetric.kind == "eval").order_by(JobMetric.step)
    for row in session.scalars(query):
        rows.setdefault(row.job_id, []).append(row)
    return rows


def _last_train_rows(session: Session, job_ids: Sequence[str]) -> dict[str, JobMetric]:
    last = (
        select(JobMetric.job_id, func.max(JobMetric.step).label("step"))
        .where(JobMetric.job_id.in_(job_ids), JobMetric.kind == "train")
        .group_by(JobMetric.job_id)
        .subquery()
    )
    query = select(JobMetric).join(last, (JobMetric.job_id == last.c.job_id) & (JobMetric.step == last.c.step)).where(JobMetric.kind == "train")
    return {row.job_id: row for row in session.scalars(query)}


def _hyperparameters(job: Job) -> dict[str, Any]:
    """The job's hyperparameters, with the values its run chose where the request left them
    to the run."""
    hp = dict((job.spec or {}).get("hyperparameters") or {})
    result = job.result or {}
    for name in DECIDED_BY_THE_RUN:
        if hp.get(name) is None and result.get(name) is not None:
            hp[name] = result[name]
    return hp


def _picked(values: dict[str, Any] | None, names: Sequence[str]) -> dict[str, Any] | None:
    if values is None:
        return None
    return {name: values.get(name) for name in names}


def _compared(job: Job, last_train: JobMetric | None, evals: list[JobMetric]) -> dict[str, Any]:
    spec = job.spec or {}
    scored = [row for row in evals if isinstance(row.values.get("eval_loss"), (int, float))]
    best = min(scored, key=lambda row: (row.values["eval_loss"], row.step), default=None)
    seconds = (job.finished_at - job.started_at).total_seconds() if job.started_at and job.finished_at else None
    return {
        "id": job.id,
        "status": job.status,
        "suffix": spec.get("suffix"),
        "base_model": job.base_model,
        "method": job.method,
        "dataset_id": job.dataset_id,
        "validation_dataset_id": job.validation_dataset_id,
        "allocation_spec": spec.get("allocation_spec"),
        "allocation": spec.get("experts_per_layer"),
        "top_k": spec.get("top_k_per_layer"),
        "adapter_parameters": spec.get("adapter_parameters"),
        "hyperparameters": _hyperparameters(job),
        "step": job.step,
        "total_steps": job.total_steps,
        "seconds": seconds,
        "train": {"step": last_train.step, **_picked(last_train.values, TRAIN_SHOWN)} if last_train else None,
        "eval": {"step": evals[-1].step, **_picked(evals[-1].values, EVAL_SHOWN)} if evals else None,
        "best_eval": {"step": best.step, **_picked(best.values, EVAL_SHOWN)} if best else None,
    }


def _differences(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The settings that are not the same in every compared job, each with the jobs' values in
    order (null where a job has no such setting: a LoRA job's allocation)."""
    settings = [
        {**{name: row[name] for name in COMPARED_FIELDS}, **{f"hyperparameters.{name}": value for name, value in row["hyperparameters"].items()}}
        for row in rows
    ]
    names = list(COMPARED_FIELDS) + sorted({name for s in settings for name in s} - set(COMPARED_FIELDS))
    differences = []
    for name in names:
        values = [s.get(name) for s in settings]
        if any(value != values[0] for value in values[1:]):
            differences.append({"field": name, "values": values})
    return differences


def _by_value(rows: Sequence[dict[str, Any]], value_of: Any) -> str:
    """``job_a: X; job_b, job_c: Y``: the compared jobs grouped by a value, in their order."""
    groups: dict[str, list[str]] = {}
    for row in rows:
        groups.setdefault(str(value_of(row)), []).append(row["id"])
    return "; ".join(f"{', '.join(ids)}: {value}" for value, ids in groups.items())


def _incomparable(rows: Sequence[dict[str, Any]]) -> list[tuple[bool, str]]:
    """Where the compared jobs' numbers do not measure the same thing (losses over other
    tokens, exact matches over other rows): ``(whether it concerns eval_loss, the warning)``,
    each warning starting with the numbers it concerns."""
    warnings = []

    def differ(value_of: Any, among: Sequence[dict[str, Any]] = rows) -> bool:
        return len({str(value_of(row)) for row in among}) > 1

    def field(name: str) -> Any:
        return lambda row: row[name]

    def hp(name: str) -> Any:
        return lambda row: row["hyperparameters"].get(name)

    if differ(field("base_model")):
        warnings.append((True, (
            "eval_loss and train loss: the jobs train different base models, whose tokenizers cut text into "
            f"different tokens, so losses per token do not compare ({_by_value(rows, field('base_model'))})"
        )))
    # A job without a validation set has no eval_loss at all (null): only those with one can disagree.
    evaluated = [row for row in rows if row["validation_dataset_id"]]
    if differ(field("validation_dataset_id"), evaluated):
        warnings.append((True, f"eval_loss: the jobs evaluate on different validation sets ({_by_value(evaluated, field('validation_dataset_id'))})"))
    for name, what in (("cutoff_len", "cut their examples at different lengths"), ("train_on_inputs", "score different tokens (prompts learned or not)")):
        if differ(hp(name)):
            warnings.append((True, f"eval_loss and train loss: the jobs {what} ({name}: {_by_value(rows, hp(name))})"))
    # The exact match and answer accuracy are over the first eval_generate_rows validation rows.
    generating = [row for row in evaluated if row["hyperparameters"].get("eval_generate_rows")]
    if differ(hp("eval_generate_rows"), generating):
        warnings.append((False, (
            "eval_exact_match and eval_answer_accuracy: the jobs score different numbers of validation rows "
            f"(eval_generate_rows: {_by_value(generating, hp('eval_generate_rows'))})"
        )))
    if differ(field("dataset_id")):
        warnings.append((False, f"train loss: the jobs train on different datasets ({_by_value(rows, field('dataset_id'))})"))
    return warnings


def _lowest_eval_loss(compared: Sequence[dict[str, Any]]) -> str | None:
    scored = [(row["best_eval"]["eval_loss"], i) for i, row in enumerate(compared) if row["best_eval"]]
    return compared[min(scored)[1]]["id"] if scored else None
