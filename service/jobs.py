"""Jobs: validating a request against the chosen model, creating it (idempotently), listing,
cancelling, and the state changes a worker makes while it runs one.

Helpers flush; the caller (a route, a task, the CLI) commits. A worker owns a running job
through its lease: every write it makes is conditional on `lease_owner`, so a worker that lost
its claim cannot overwrite the state another one is writing.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from mola.allocation import expand_allocation, expand_top_k
from mola.config import MolaConfig
from mola.sizing import adapter_parameter_count, matches_target
from service import webhooks
from service.datasets import get_dataset, lock_dataset
from service.db import mark_each
from service.errors import Conflict, InvalidRequest, NotFound, TooManyRequests
from service.models import (
    ACTIVE_STATUSES,
    FAILURE_KINDS,
    JOB_STATUSES,
    RECURRING_FAILURES,
    TERMINAL_STATUSES,
    BaseModelEntry,
    Checkpoint,
    Dataset,
    Generation,
    Job,
    JobMetric,
    Tenant,
    WebhookDelivery,
    utcnow,
)
from service.storage import Storage, StorageError

DEFAULT_ALLOCATION = "2468"
DEFAULT_TOP_K = 2
# Hyperparameters that shape the adapter rather than the optimisation.
ADAPTER_FIELDS = ("rank", "alpha", "dropout", "target_modules", "aux_loss_coef")


# ---- validation ----------------------------------------------------------------------------
# Body fields added after jobs were first stored with their request's hash: left out of the hash
# while unset, so a request that does not use them hashes as it did before they existed (an
# Idempotency-Key retried across an upgrade still finds its job).
FIELDS_ADDED_LATER = ("webhook_url",)


def request_hash(request: dict[str, Any]) -> str:
    request = {name: value for name, value in request.items() if not (name in FIELDS_ADDED_LATER and value is None)}
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def get_base_model(session: Session, name: str) -> BaseModelEntry:
    entry = session.get(BaseModelEntry, name)
    if entry is None:
        names = session.scalars(select(BaseModelEntry.name).order_by(BaseModelEntry.name)).all()
        hint = f"; available: {', '.join(names)}" if names else "; none synced yet (run `mola models sync`)"
        raise InvalidRequest(("body", "base_model"), f"unknown base model {name!r}{hint}")
    return entry


def _dataset_field(session: Session, tenant_id: str, dataset_id: str, field: str) -> Dataset:
    try:
        # Locked (shared) until the job is committed: a deletion of the dataset waits for it,
        # then finds the job and refuses; one that came first is seen here as not found.
        return get_dataset(session, tenant_id, dataset_id, lock="share")
    except NotFound as exc:
        raise InvalidRequest(("body", field), exc.detail) from None


def _match_module(name: str, model: BaseModelEntry) -> bool:
    """`name` matches as mola matches targets: equal to, or a dotted suffix of, a module path
    inside a decoder layer (`q_proj` and `self_attn.q_proj` match `self_attn.q_proj`)."""
    if model.module_paths is not None:
        return any(matches_target(path, name) for path in model.module_paths)
    # A row synced before paths were recorded knows only the last part of each path.
    return name.rsplit(".", 1)[-1] in model.linear_modules


def _adapter_parameters(model: BaseModelEntry, hp: dict[str, Any], experts: list[int] | None) -> int | None:
    """The adapter's trainable parameters, counted from the catalogue's module shapes (None
    for a model synced before they were recorded)."""
    if model.module_shapes is None or hp.get("rank") is None:
        return None
    return adapter_parameter_count(model.module_shapes, hp["target_modules"], hp["rank"], experts)


def build_spec(
    session: Session, tenant_id: str, request: dict[str, Any], max_adapter_params: int = 0, webhooks_reach_private: bool = True
) -> dict[str, Any]:
    """Check a job request against the server's models and the tenant's datasets, and return the
    spec the worker runs: allocation and top-k expanded per layer, defaults filled in, and the
    adapter's size (refused over ``max_adapter_params``; 0: no limit). A `webhook_url` must be
    one the server sends to (`service.webhooks.check_url`).

    Raises `InvalidRequest` with the field path of the first problem.
    """
    model = get_base_model(session, request["base_model"])
    _dataset_field(session, tenant_id, request["dataset_id"], "dataset_id")
    if request.get("validation_dataset_id"):
        _dataset_field(session, tenant_id, request["validation_dataset_id"], "validation_dataset_id")

    method = request.get("method", "mola")
    hp = dict(request.get("hyperparameters") or {})

    def about_model(exc: ValueError) -> str:
        message = str(exc).replace("the model has", f"{model.name} has")
        return message if f"{model.name} has" in message else f"{message} ({model.name} has {model.num_layers} layers)"

    targets = hp.get("target_modules")
    if targets:
        unknown = [t for t in targets if not _match_module(t, model)]
        if unknown:
            raise InvalidRequest(
                ("body", "hyperparameters", "target_modules"),
                f"{', '.join(map(repr, unknown))} not among {model.name}'s linear modules "
                f"({', '.join(model.module_paths or model.linear_modules)})",
            )
    else:
        targets = list(model.target_modules)
    hp["target_modules"] = targets

    cutoff_len = hp.get("cutoff_len")
    if cutoff_len is not None and model.max_positions is not None and cutoff_len > model.max_positions:
        raise InvalidRequest(
            ("body", "hyperparameters", "cutoff_len"),
            f"{cutoff_len} is more than the {model.max_positions} positions {model.name} takes",
        )
    for field in ("eval_every", "eval_generate_rows"):
        if hp.get(field) is not None and not request.get("validation_dataset_id"):
            raise InvalidRequest(("body", "hyperparameters", field), "needs a validation_dataset_id to evaluate on")

    warmup_steps, max_steps = hp.get("warmup_steps"), hp.get("max_steps")
    if warmup_steps is not None and max_steps is not None and warmup_steps > max_steps:
        # (With epochs, the run's steps depend on what tokenizing keeps: known only when it starts.)
        raise InvalidRequest(
            ("body", "hyperparameters", "warmup_steps"),
            f"{warmup_steps} is more than max_steps ({max_steps}): the warmup must fit in the run",
        )

    if hp.get("micro_batch_size") and hp.get("batch_size"):
        hp["micro_batch_size"] = min(hp["micro_batch_size"], hp["batch_size"])

    experts: list[int] | None = None
    top_k: list[int] | None = None
    if method == "mola":
        allocation = request.get("allocation")
        if allocation is None:
            allocation = DEFAULT_ALLOCATION
        try:
            experts = expand_allocation(allocation, model.num_layers)
        except ValueError as exc:
            raise InvalidRequest(("body", "allocation"), about_model(exc)) from None
        try:
            requested_top_k = request.get("top_k")
            top_k = expand_top_k(DEFAULT_TOP_K if requested_top_k is None else requested_top_k, experts)
        except ValueError as exc:
            raise InvalidRequest(("body", "top_k"), about_model(exc)) from None
        try:
            MolaConfig(experts=experts, top_k=top_k, **{k: hp[k] for k in ADAPTER_FIELDS if hp.get(k) is not None})
        except (TypeError, ValueError) as exc:
            message = str(exc)
            field = next((f for f in ADAPTER_FIELDS if message.startswith(f)), None)
            loc = ("body", "hyperparameters", field) if field else ("body", "hyperparameters")
            raise InvalidRequest(loc, message) from None
    elif request.get("allocation") is not None or request.get("top_k") is not None:
        field = "allocation" if request.get("allocation") is not None else "top_k"
        raise InvalidRequest(("body", field), f"{field} applies to method 'mola', not {method!r}")

    adapter_parameters = _adapter_parameters(model, hp, experts)
    if max_adapter_params and adapter_parameters is not None and adapter_parameters > max_adapter_params:
        raise InvalidRequest(
            ("body", "allocation") if method == "mola" else ("body", "hyperparameters", "rank"),
            f"the adapter would have {adapter_parameters:,} trainable parameters on {model.name}, more than "
            f"this server allows ({max_adapter_params:,}): lower rank or the experts per layer, or adapt fewer target_modules",
        )

    webhook_url = request.get("webhook_url")
    if webhook_url is not None:
        try:
            webhooks.check_url(webhook_url, webhooks_reach_private)
        except webhooks.WebhookRefused as exc:
            raise InvalidRequest(("body", "webhook_url"), str(exc)) from None

    return {
        "base_model": model.name,
        "model_type": model.model_type,
        "num_layers": model.num_layers,
        "method": method,
        "adapter_parameters": adapter_parameters,
        "dataset_id": request["dataset_id"],
        "validation_dataset_id": request.get("validation_dataset_id"),
        "allocation_spec": request.get("allocation"),
        "experts_per_layer": experts,
        "top_k_per_layer": top_k,
        "hyperparameters": hp,
        "suffix": request.get("suffix"),
        "webhook_url": webhook_url,
    }


# ---- the API's side ------------------------------------------------------------------------
def create_job(
    session: Session,
    tenant_id: str,
    request: dict[str, Any],
    idempotency_key: str | None = None,
    max_adapter_params: int = 0,
    max_active_jobs: int = 0,
    webhooks_reach_private: bool = True,
) -> tuple[Job, bool]:
    """Validate and insert a queued job; returns (job, created). With an idempotency key that
    was used before, returns the earlier job (created=False) if the request is the same (at the
    tenant's limit of active jobs too: a retry is no new job), and raises `Conflict` if it
    differs. Flushes; the caller commits, then enqueues."""
    digest = request_hash(request)
    if idempotency_key:
        existing = find_by_idempotency_key(session, tenant_id, idempotency_key)
        if existing is not None:
            if existing.deleted_at is not None:  # its row, and so the key, is gone once deleted
                raise Conflict(f"Idempotency-Key was used for job {existing.id}, which is being deleted: retry in a moment")
            if existing.request_hash != digest:
                raise Conflict("Idempotency-Key was already used with a different request")
            return existing, False
    spec = build_spec(session, tenant_id, request, max_adapter_params, webhooks_reach_private)
    check_active_jobs(session, tenant_id, max_active_jobs)
    now = utcnow()
    job = Job(
        created_at=now,
        queued_at=now,
        tenant_id=tenant_id,
        base_model=spec["base_model"],
        dataset_id=spec["dataset_id"],
        validation_dataset_id=spec["validation_dataset_id"],
        method=spec["method"],
        spec=spec,
        status="queued",
        idempotency_key=idempotency_key,
        request_hash=digest,
        step=0,
        attempts=0,
    )
    session.add(job)
    session.flush()
    return job, True


def check_active_jobs(session: Session, tenant_id: str, limit: int) -> None:
    """`TooManyRequests` when the tenant already has ``limit`` queued or running jobs (0: no
    limit). Called once the request is known to be good (a bad one hears what is wrong with it,
    not to wait). Locks the tenant's row until the transaction ends, so two requests of one
    tenant count in turn and cannot both take the last place (PostgreSQL; SQLite runs one
    writer at a time); always after the dataset rows' locks, as every path takes them, so no
    two requests wait for each other."""
    if not limit:
        return
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())
    active = session.scalar(
        select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id, Job.status.in_(ACTIVE_STATUSES), Job.deleted_at.is_(None))
    )
    if active >= limit:
        raise TooManyRequests(
            f"you have {active} queued or running jobs, the most the server allows at once (MOLA_MAX_ACTIVE_JOBS={limit}): "
            "send this again once one has finished, or cancel one"
        )


def find_by_idempotency_key(session: Session, tenant_id: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))


def get_job(session: Session, tenant_id: str, job_id: str) -> Job:
    """The tenant's job; another tenant's, or one being deleted, is not found."""
    job = get_job_even_if_being_deleted(session, tenant_id, job_id)
    if job.deleted_at is not None:
        raise NotFound(f"job {job_id!r} not found")
    return job


def get_job_even_if_being_deleted(session: Session, tenant_id: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(f"job {job_id!r} not found")
    return job


def list_jobs(
    session: Session,
    tenant_id: str,
    status: str | None = None,
    limit: int = 20,
    after: str | None = None,
    dataset_id: str | None = None,
    base_model: str | None = None,
    method: str | None = None,
) -> tuple[list[Job], bool]:
    """Newest first; ``after`` is the last id of the previous page; the filters narrow the
    list (``dataset_id``: the jobs training on it). Returns (jobs, has_more)."""
    query = select(Job).where(Job.tenant_id == tenant_id, Job.deleted_at.is_(None))
    if status is not None:
        if status not in JOB_STATUSES:
            raise InvalidRequest(("query", "status"), f"status must be one of {', '.join(JOB_STATUSES)}")
        query = query.where(Job.status == status)
    if dataset_id is not None:
        # A deleted dataset still has its jobs; an id that was never the tenant's is a typo,
        # which an empty list would hide.
        dataset = session.get(Dataset, dataset_id)
        if dataset is None or dataset.tenant_id != tenant_id:
            raise InvalidRequest(("query", "dataset_id"), f"no dataset {dataset_id!r}: pass one of your dataset ids (`GET /datasets`)")
        query = query.where(Job.dataset_id == dataset_id)
    if base_model is not None:
        query = query.where(Job.base_model == base_model)
    if method is not None:
        query = query.where(Job.method == method)
    if after:  # empty: the first page (a script's `after=$LAST` before it has one)
        check_job_cursor(session, tenant_id, after)
        query = query.where(Job.id < after)
    jobs = list(session.scalars(query.order_by(Job.id.desc()).limit(limit + 1)))
    return jobs[:limit], len(jobs) > limit


JOB_ID = re.compile(r"job_[0-9a-f]{24}")


def check_job_cursor(session: Session, tenant_id: str, after: str) -> None:
    """``after`` must be a job id of the tenant's, or of a job deleted since (a client paging
    through its jobs while deleting some, whose rows are gone): any other string still sorts
    somewhere among the ids, so a typo or a dataset id would quietly give a wrong page (the
    first, or none) instead of an error. Another tenant's id is refused."""
    if not JOB_ID.fullmatch(after):
        raise InvalidRequest(("query", "after"), f"{after!r} is not a job id: pass the last_id of the previous page of jobs")
    owner = session.scalar(select(Job.tenant_id).where(Job.id == after))
    if owner is not None and owner != tenant_id:
        raise InvalidRequest(("query", "after"), f"no job {after!r} to continue after: pass the last_id of the previous page of jobs")


def cancel_job(session: Session, job: Job) -> Job:
    """Cancel a queued job at once; ask a running one to stop at its next step."""
    now = utcnow()
    if job.status in TERMINAL_STATUSES:
        raise Conflict(f"job {job.id} has already {job.status}" if job.status != "cancelled" else f"job {job.id} is already cancelled")
    done = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == "queued")
        .values(status="cancelled", cancel_requested_at=now, finished_at=now, updated_at=now)
    ).rowcount
    if done:
        _record_end(session, job.id)
    else:
        # It started (or finished) in the meantime: the worker sees the request at its next step.
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == "running", Job.cancel_requested_at.is_(None))
            .values(cancel_requested_at=now, updated_at=now)
        )
    session.refresh(job)
    return job


# What a resumed job may change: how its steps are computed, and what it evaluates and keeps;
# never what it trains (the rest shapes the schedule, the data or the adapter, and the library
# refuses to resume a checkpoint under other values: mola.train.RESUME_MUST_MATCH).
# micro_batch_size is the one an out-of-memory failure needs.
RESUMABLE_HYPERPARAMETERS = (
    "micro_batch_size", "gradient_checkpointing", "torch_compile", "bf16",
    "checkpoint_every", "eval_every", "eval_generate_rows",
)


def _check_the_failure_can_pass(job: Job, changes: dict[str, Any]) -> None:
    """Refuse to queue a run that would fail as the last one did: its data or a setting no
    resume can change caused it (recorded as the job's error_kind)."""
    if job.error_kind in RECURRING_FAILURES:
        what = "its data" if job.error_kind == "data" else "a hyperparameter a resume cannot change"
        raise Conflict(
            f"job {job.id} failed on {what} ({job.error}): a resume would fail the same way; "
            "create a new job with the cause changed"
        )
    if job.error_kind == "evaluation" and "eval_generate_rows" not in changes:
        raise Conflict(
            f"job {job.id} failed on eval_generate_rows ({job.error}): resume with hyperparameters.eval_generate_rows "
            "changed (null turns the generated evaluation off)"
        )


def resume_job(session: Session, job: Job, changes: dict[str, Any], max_active_jobs: int = 0) -> tuple[Job, str | None]:
    """Queue a failed or cancelled job again, to continue from its newest checkpoint (from the
    start without one) with ``changes`` (names of RESUMABLE_HYPERPARAMETERS) applied. Returns
    the job and the storage key of the stopped run's adapter for the caller to delete once this
    commits (None: nothing to delete). Flushes."""
    if job.status not in ("failed", "cancelled"):
        if job.status == "succeeded":
            raise Conflict(f"job {job.id} has succeeded: it has nothing left to train (create a new job to train more)")
        stopping = " and stopping" if job.cancel_requested_at is not None else ""
        raise Conflict(f"job {job.id} is {job.status}{stopping}: only a failed or cancelled job can be resumed")
    for name in changes:
        if name not in RESUMABLE_HYPERPARAMETERS:
            raise InvalidRequest(
                ("body", "hyperparameters", name),
                f"cannot change on resume: it changes what the job trains (resuming may change "
                f"{', '.join(RESUMABLE_HYPERPARAMETERS)}); create a new job instead",
            )
    if job.status == "failed":
        _check_the_failure_can_pass(job, changes)
    for field, dataset_id in (("dataset_id", job.dataset_id), ("validation_dataset_id", job.validation_dataset_id)):
        dataset = lock_dataset(session, dataset_id, "share") if dataset_id else None  # as creating a job does
        if dataset is not None and dataset.deleted_at is not None:
            raise Conflict(f"job {job.id} cannot be resumed: its {field} {dataset_id} has been deleted")
    if session.get(BaseModelEntry, job.base_model) is None:
        raise Conflict(f"job {job.id} cannot be resumed: its base model {job.base_model!r} is no longer served")
    check_active_jobs(session, job.tenant_id, max_active_jobs)

    spec = dict(job.spec)
    hp = {**spec.get("hyperparameters", {}), **changes}
    for field in ("eval_every", "eval_generate_rows"):
        if changes.get(field) is not None and not job.validation_dataset_id:
            raise InvalidRequest(("body", "hyperparameters", field), "needs a validation set, and this job has none")
    if hp.get("micro_batch_size") and hp.get("batch_size"):
        hp["micro_batch_size"] = min(hp["micro_batch_size"], hp["batch_size"])
    spec["hyperparameters"] = hp

    stopped_adapter, stopped_at = job.adapter_key, job.step
    now = utcnow()
    resumed = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status.in_(("failed", "cancelled")), Job.deleted_at.is_(None))
        .values(
            status="queued", spec=spec, error=None, error_kind=None, result=None, analysis=None, adapter_key=None,
            finished_at=None, cancel_requested_at=None, lease_owner=None, lease_expires_at=None,
            # A fresh budget of attempts: a job failed for running out of them is the case for resuming.
            attempts=0, updated_at=now, queued_at=now,
        )
    ).rowcount
    if not resumed:  # resumed, or deleted, by a concurrent request
        session.refresh(job)
        if job.deleted_at is not None:
            raise NotFound(f"job {job.id!r} not found")
        raise Conflict(f"job {job.id} is {job.status}: only a failed or cancelled job can be resumed")
    newest = session.scalar(select(func.max(Checkpoint.step)).where(Checkpoint.job_id == job.id))
    # Progress and metrics go back to the resume point now, as the worker's claim would.
    prepare_resume(session, job.id, newest or 0)
    session.refresh(job)
    # The stopped run's adapter is the newest checkpoint's weights when that checkpoint is where
    # it stopped (a cancelled run checkpoints as it stops); otherwise it stays in storage, unnamed,
    # until the job is deleted, rather than lose the only copy of its last steps.
    return job, stopped_adapter if newest == stopped_at else None


# ---- deleting a job ----------------------------------------------------------------------
# In three steps, so that nothing is left orphaned and nothing is seen half deleted:
# 1. `start_deletion`, one transaction: the job is marked (`deleted_at`, from then on it answers
#    404 everywhere) and its metric, checkpoint and generation rows are deleted (rows before
#    files, as when checkpoints are pruned: a row never names a file that is gone);
# 2. the caller deletes the stored files under `job_storage_prefix` (checkpoints, adapter);
# 3. `finish_deletion` deletes the row.
# Interrupted after 1, the marked row still names the files: a repeated DELETE or the next
# `mola serve` (`jobs_being_deleted`) does 2 and 3 again. Files first instead would show a job
# whose adapter and checkpoints are gone; the row first would leave files nothing names.
def job_storage_prefix(job_id: str) -> str:
    return f"jobs/{job_id}"


def start_deletion(session: Session, job: Job) -> None:
    """Step 1 (above) for a finished job; `Conflict` for a queued or running one, whose worker
    may still write its files. A job already being deleted stays so. Flushes only."""
    if job.deleted_at is not None:
        return
    marked = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status.in_(TERMINAL_STATUSES), Job.deleted_at.is_(None))
        .values(deleted_at=utcnow())
    ).rowcount
    if not marked:
        session.refresh(job)
        raise Conflict(
            f"job {job.id} is {job.status}: cancel it first (POST /jobs/{job.id}/cancel), "
            "and delete it once it has stopped"
        )
    session.execute(delete(JobMetric).where(JobMetric.job_id == job.id))
    session.execute(delete(Checkpoint).where(Checkpoint.job_id == job.id))
    # Its queued generations are never run and stop counting among the tenant's waiting ones.
    session.execute(delete(Generation).where(Generation.job_id == job.id))
    # Its webhook events not sent yet would announce a job that answers 404.
    session.execute(delete(WebhookDelivery).where(WebhookDelivery.job_id == job.id))
    session.refresh(job)


def delete_job_files(storage: Storage, job_id: str) -> None:
    """Step 2 (above); `StorageError` when files are left (neither the local folder's removal
    nor S3's batch delete raises for a file it could not delete)."""
    prefix = job_storage_prefix(job_id)
    storage.delete_prefix(prefix)
    left = storage.list(prefix)
    if left:
        raise StorageError(f"{len(left)} file(s) under {prefix}/ could not be deleted, e.g. {left[0]}")


def finish_deletion(session: Session, job_id: str) -> None:
    """Step 3 (above): the row of a job whose files are deleted. Flushes only."""
    session.execute(delete(Job).where(Job.id == job_id, Job.deleted_at.is_not(None)))


def jobs_being_deleted(session: Session) -> list[str]:
    """Jobs whose deletion was interrupted before its last step."""
    return list(session.scalars(select(Job.id).where(Job.deleted_at.is_not(None)).order_by(Job.id)))


def eta_seconds(job: Job, now: datetime | None = None) -> float | None:
    """Time left at the rate of the current run's own steps: those done since the first
    progress it recorded, over the time since. Not from `started_at`: after a resume that
    would count the time the job was down (and a run's loading) as time per step. None until
    the run has recorded progress twice."""
    if job.status != "running" or not job.total_steps or job.run_first_step_at is None or job.run_first_step is None:
        return None
    steps_done = job.step - job.run_first_step
    if steps_done <= 0:
        return None
    elapsed = ((now or utcnow()) - job.run_first_step_at).total_seconds()
    return max(0.0, elapsed / steps_done * (job.total_steps - job.step))


def get_metrics(
    session: Session,
    job_id: str,
    after_step: int = -1,
    limit: int = 100,
    kind: str | None = None,
    after_kind: str | None = None,
) -> tuple[list[JobMetric], bool]:
    """Metrics of up to ``limit`` steps after ``after_step``, all kinds of a step together (a
    page never splits a step, so ``after_step=<last step seen>`` continues without a gap), in
    (step, kind) order. With ``after_kind``, the rows of ``after_step`` whose kind sorts after
    it come first (the event stream resuming in the middle of a step)."""
    after = JobMetric.step > after_step
    if after_kind is not None:
        after = or_(after, and_(JobMetric.step == after_step, JobMetric.kind > after_kind))
    base = select(JobMetric).where(JobMetric.job_id == job_id, after)
    if kind is not None:
        base = base.where(JobMetric.kind == kind)
    steps = list(
        session.scalars(
            select(JobMetric.step).where(base.whereclause).distinct().order_by(JobMetric.step).limit(limit + 1)
        )
    )
    if not steps:
        return [], False
    last = steps[min(limit, len(steps)) - 1]
    rows = session.scalars(base.where(JobMetric.step <= last).order_by(JobMetric.step, JobMetric.kind))
    return list(rows), len(steps) > limit


def list_checkpoints(session: Session, job_id: str) -> list[Checkpoint]:
    return list(session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)))


def get_checkpoint(session: Session, job_id: str, step: int) -> Checkpoint:
    """The job's checkpoint at ``step``; `NotFound` naming the steps it has."""
    found = list_checkpoints(session, job_id)
    for checkpoint in found:
        if checkpoint.step == step:
            return checkpoint
    have = ", ".join(str(c.step) for c in found) or "none yet"
    raise NotFound(f"job {job_id} has no checkpoint at step {step} (checkpoints: {have})")


def get_analysis(session: Session, tenant_id: str, job_id: str) -> dict[str, Any]:
    """The stored expert analysis of a finished MoLA job. `Conflict` while the job has not
    finished (it is written with the final state); `NotFound`, saying why, for a job that has
    none: a LoRA job (no experts), a failed one (no adapter), one finished before analyses
    were recorded."""
    job = get_job(session, tenant_id, job_id)
    if job.method != "mola":
        raise NotFound(f"job {job_id} trained a plain LoRA adapter: only MoLA adapters have experts to analyse")
    if job.status not in TERMINAL_STATUSES:
        raise Conflict(f"job {job_id} is {job.status}: its expert analysis is computed when it finishes")
    if job.analysis is None:
        if job.status == "failed" or job.adapter_key is None:
            raise NotFound(f"job {job_id} is {job.status} without an adapter: there are no trained experts to analyse")
        raise NotFound(
            f"job {job_id} finished before expert analyses were recorded: download its adapter and run "
            "`mola analyze ADAPTER --data FILE`"
        )
    return job.analysis


# A checkpoint's adapter (config, weights, model card), stored in its folder for downloading.
CHECKPOINT_ADAPTER = "adapter.tar.gz"


def checkpoint_adapter_key(storage_prefix: str) -> str:
    """Where the checkpoint stored under ``storage_prefix`` keeps its adapter archive."""
    return f"{storage_prefix}/{CHECKPOINT_ADAPTER}"


# ---- the worker's side ---------------------------------------------------------------------
def claim_job(session: Session, job_id: str, owner: str, lease_seconds: float) -> Job | None:
    """Move a queued job to running under ``owner``'s lease; None if it is not queued (already
    taken, finished or cancelled: a duplicate delivery is then a no-op)."""
    now = utcnow()
    claimed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(
            status="running",
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            heartbeat_at=now,
            started_at=func.coalesce(Job.started_at, now),
            attempts=Job.attempts + 1,
            run_first_step=None,
            run_first_step_at=None,
            updated_at=now,
        )
    ).rowcount
    if not claimed:
        return None
    job = session.get(Job, job_id)
    session.refresh(job)
    return job


def heartbeat(
    session: Session,
    job_id: str,
    owner: str,
    lease_seconds: float,
    step: int | None = None,
    total_steps: int | None = None,
    epoch: float | None = None,
) -> bool:
    """Renew the lease and record progress; False if ``owner`` no longer holds the job."""
    now = utcnow()
    values: dict[str, Any] = {"heartbeat_at": now, "lease_expires_at": now + timedelta(seconds=lease_seconds), "updated_at": now}
    if step is not None:
        values["step"] = step
        # The run's first progress stays as it was: the origin of its ETA (see eta_seconds).
        values["run_first_step"] = func.coalesce(Job.run_first_step, step)
        values["run_first_step_at"] = func.coalesce(Job.run_first_step_at, now)
    if total_steps is not None:
        values["total_steps"] = total_steps
    if epoch is not None:
        values["epoch"] = epoch
    return bool(
        session.execute(
            update(Job).where(Job.id == job_id, Job.lease_owner == owner, Job.status == "running").values(**values)
        ).rowcount
    )


def release_job(session: Session, job_id: str, owner: str) -> bool:
    """Give a running job back to the queue (its worker is shutting down, after a checkpoint).
    The run does not count against `max_attempts`: nothing was lost."""
    now = utcnow()
    return bool(
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.lease_owner == owner, Job.status == "running")
            .values(
                status="queued",
                lease_owner=None,
                lease_expires_at=None,
                attempts=Job.attempts - 1,  # a running job was claimed, so this stays >= 0
                updated_at=now,
                queued_at=now,
            )
        ).rowcount
    )


def prepare_resume(session: Session, job_id: str, from_step: int) -> int:
    """A new run of the job starts at ``from_step`` (its latest checkpoint, 0 without one):
    metrics of later steps came from a run whose work is lost, and the new run writes them
    again, so they are deleted; progress goes back to ``from_step``. Returns the rows deleted."""
    deleted = session.execute(delete(JobMetric).where(JobMetric.job_id == job_id, JobMetric.step > from_step)).rowcount
    session.execute(update(Job).where(Job.id == job_id).values(step=from_step))
    return deleted

def cancel_requested(session: Session, job_id: str) -> bool:
    return session.scalar(select(Job.cancel_requested_at).where(Job.id == job_id)) is not None


def finish_job(
    session: Session,
    job_id: str,
    owner: str,
    status: str,
    error: str | None = None,
    error_kind: str | None = None,
    result: dict[str, Any] | None = None,
    adapter_key: str | None = None,
    analysis: dict[str, Any] | None = None,
) -> bool:
    """Record the end of a run; False if ``owner`` no longer holds the job. A failure's
    ``error_kind`` is one of FAILURE_KINDS ("internal" when not given)."""
    if status not in TERMINAL_STATUSES:
        raise ValueError(f"not a final status: {status!r}")
    if status == "failed":
        error_kind = error_kind or "internal"
        if error_kind not in FAILURE_KINDS:
            raise ValueError(f"not a failure kind: {error_kind!r}")
    elif error_kind is not None:
        raise ValueError(f"error_kind is for failed jobs, not {status!r} ones")
    now = utcnow()
    values: dict[str, Any] = {
        "status": status,
        "finished_at": now,
        "updated_at": now,
        "lease_expires_at": None,
        "error": error,
        "error_kind": error_kind,
    }
    if result is not None:
        values["result"] = result
    if adapter_key is not None:
        values["adapter_key"] = adapter_key
    if analysis is not None:
        values["analysis"] = analysis
    if not session.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner, Job.status == "running").values(**values)).rowcount:
        return False
    _record_end(session, job_id)
    return True


def _record_end(session: Session, job_id: str) -> None:
    """In the transaction that ended the job: its webhook's event, when it has a webhook_url."""
    webhooks.record_job_end(session, session.get(Job, job_id, populate_existing=True))


def record_data_stats(session: Session, job_id: str, owner: str, stats: dict[str, Any]) -> bool:
    """Record what the run's tokenization kept and cut; False if ``owner`` no longer holds the job."""
    return bool(
        session.execute(
            update(Job).where(Job.id == job_id, Job.lease_owner == owner, Job.status == "running").values(data_stats=stats)
        ).rowcount
    )


def record_metrics(session: Session, job_id: str, rows: list[dict[str, Any]]) -> None:
    """Insert metric rows ({step, kind, values}); a (job, kind, step) already stored is kept, so a
    resumed run that replays steps adds no duplicates."""
    if not rows:
        return
    now = utcnow()
    payload = [{"job_id": job_id, "step": r["step"], "kind": r["kind"], "values": r["values"], "created_at": now} for r in rows]
    session.execute(_insert_ignore(session, JobMetric, ("job_id", "kind", "step")), payload)


def record_checkpoint(
    session: Session, job_id: str, step: int, storage_prefix: str, size_bytes: int, metrics: dict[str, Any] | None = None
) -> None:
    row = {
        "job_id": job_id,
        "step": step,
        "storage_prefix": storage_prefix,
        "size_bytes": size_bytes,
        "metrics": metrics or {},
        "created_at": utcnow(),
    }
    session.execute(_insert_ignore(session, Checkpoint, ("job_id", "step")), [row])


def best_checkpoint_step(checkpoints: list[tuple[int, dict[str, Any] | None]]) -> int | None:
    """Of ``(step, metrics)`` pairs, the step with the lowest ``eval_loss`` (the earliest of
    equals); None when no checkpoint was written at an evaluation."""
    scored = [
        (metrics["eval_loss"], step)
        for step, metrics in checkpoints
        if isinstance((metrics or {}).get("eval_loss"), (int, float)) and math.isfinite(metrics["eval_loss"])
    ]
    return min(scored)[1] if scored else None


def prune_checkpoints(session: Session, job_id: str, keep: int) -> list[int]:
    """Delete the rows of the job's checkpoints but its ``keep`` newest (0 keeps all) and the
    one with the lowest ``eval_loss``, the one a user would download; return the steps
    deleted. The caller deletes the stored checkpoints no row names (`checkpoint_prefixes`)
    after the commit, so a row never names files that are gone. Only the newest is ever
    resumed from; the others are its fallbacks."""
    if keep <= 0:
        return []
    query = select(Checkpoint.step, Checkpoint.metrics).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step.desc())
    rows = [(step, metrics) for step, metrics in session.execute(query)]
    kept = {step for step, _ in rows[:keep]} | {best_checkpoint_step(rows)}
    doomed = [step for step, _ in rows if step not in kept]
    if doomed:
        session.execute(delete(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step.in_(doomed)))
    return doomed


def checkpoint_prefixes(session: Session, job_id: str) -> list[str]:
    """The storage prefixes the job's checkpoint rows name."""
    return list(session.scalars(select(Checkpoint.storage_prefix).where(Checkpoint.job_id == job_id)))


def record_token_stats(session: Session, dataset_id: str, model_name: str, stats: dict[str, Any]) -> None:
    dataset = session.get(Dataset, dataset_id)
    if dataset is not None:
        dataset.token_stats = {**(dataset.token_stats or {}), model_name: stats}


# ---- recovery (see service/reconcile.py) ----------------------------------------------------
def abandoned_error(attempts: int, max_attempts: int) -> str:
    return (
        f"the job's worker stopped without finishing it {attempts} time(s) (MOLA_MAX_ATTEMPTS={max_attempts}); "
        "not retrying. A job that kills its worker (out of host memory, a crash in a native library) "
        "does so again: check the worker logs before resuming it"
    )


def recover_expired_leases(session: Session, max_attempts: int, job_id: str | None = None) -> tuple[list[str], list[str]]:
    """Running jobs whose lease expired (their worker died or hung): back to `queued`, to resume
    from their last checkpoint, or `failed` once they have used ``max_attempts`` runs
    (`cancelled` if a cancellation was pending). Limited
    to ``job_id`` when given. Returns (requeued ids, failed ids); the caller enqueues the first.

    Each change is a conditional UPDATE on the expired lease, so reconcilers running at once
    (one per worker) and a worker renewing its lease at that moment cannot both win."""
    now = utcnow()
    expired = (Job.status == "running", Job.lease_expires_at < now)
    if job_id is not None:
        expired += (Job.id == job_id,)
    rows = session.execute(select(Job.id, Job.attempts, Job.cancel_requested_at).where(*expired).order_by(Job.id)).all()
    requeued, failed = [], []
    for id_, attempts, cancel_requested_at in rows:
        still_expired = (Job.id == id_, *expired)
        end = dict(finished_at=now, lease_expires_at=None, updated_at=now)
        if cancel_requested_at is not None:  # nobody is left to stop it: it stops here
            if session.execute(update(Job).where(*still_expired).values(status="cancelled", **end)).rowcount:
                _record_end(session, id_)
        elif attempts >= max_attempts:
            if session.execute(update(Job).where(*still_expired).values(status="failed", error=abandoned_error(attempts, max_attempts), error_kind="abandoned", **end)).rowcount:
                _record_end(session, id_)
                failed.append(id_)
        elif session.execute(
            update(Job).where(*still_expired).values(status="queued", lease_owner=None, lease_expires_at=None, updated_at=now, queued_at=now)
        ).rowcount:
            requeued.append(id_)
    return requeued, failed


def expire_leases_of_worker(session: Session, owner_prefix: str) -> list[str]:
    """End now the leases of a worker known to be dead (its lease owner starts with
    ``owner_prefix``, e.g. ``host:pid:``), so the next reconciliation recovers its job without
    waiting for the lease to run out."""
    now = utcnow()
    held = (Job.status == "running", Job.lease_owner.startswith(owner_prefix, autoescape=True))
    ids = list(session.scalars(select(Job.id).where(*held)))
    if ids:
        session.execute(update(Job).where(Job.id.in_(ids), *held).values(lease_expires_at=now - timedelta(seconds=1)))
    return ids


def touch_stale_queued(session: Session, older_than_seconds: float, limit: int = 1000) -> list[str]:
    """Queued jobs that nobody claimed for ``older_than_seconds`` (their message may be lost),
    marked as just handled (``updated_at``) so that the next look, by this reconciler or
    another, waits as long again. Returns the ids this call marked, oldest first."""
    now = utcnow()
    stale = (Job.status == "queued", Job.updated_at < now - timedelta(seconds=older_than_seconds))
    return mark_each(session, Job, stale, {"updated_at": now}, limit)


def _insert_ignore(session: Session, table: type, conflict_columns: tuple[str, ...]):
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - the service supports SQLite and PostgreSQL
        raise NotImplementedError(f"no insert-or-ignore for {dialect}")
    return insert(table).on_conflict_do_nothing(index_elements=list(conflict_columns))
