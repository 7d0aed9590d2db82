"""Generations: a finished job's adapter completing a few prompts on the server
(POST /jobs/{id}/generations), so a user can try it without downloading it, or the rows of an
upload (a test set), scored against their own completions; a checkpoint's adapter on request.

The API stores the request and queues its id on the training queue: generating needs the
base model on a GPU, which the training worker has (`MOLA_GENERATION_QUEUE` names another
queue, for workers of their own, so generations never wait behind training). The worker claims the row (a conditional
UPDATE, so a duplicate message does nothing), generates with `mola.generate` and records the
completions or the error. The reconciler sends a queued generation again when its message
may be lost, and fails one whose worker stopped while it ran (`ABANDONED_AFTER_SECONDS`).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import delete as sql_delete
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service import jobs as job_service
from service.db import mark_each
from service.datasets import get_dataset
from service.errors import Conflict, InvalidRequest, NotFound, TooManyRequests
from service.models import ACTIVE_STATUSES, Generation, Job, utcnow

# Generations of one tenant queued or running at once: each takes the GPU between jobs, so a
# client looping on POST cannot hold the worker.
MAX_WAITING_PER_TENANT = 16
# The rows of a dataset one generation completes: a test set of this size takes minutes on a
# GPU, well inside ABANDONED_AFTER_SECONDS.
MAX_DATASET_ROWS = 1000
# A generation running this long lost its worker (a few prompts take seconds to minutes).
ABANDONED_AFTER_SECONDS = 3600.0


def create(session: Session, tenant_id: str, job_id: str, request: dict[str, Any]) -> Generation:
    """A queued generation of the tenant's job: of ``request["prompts"]``, or of the rows of
    ``request["dataset_id"]``, by its final adapter or (``step``) a checkpoint's. `Conflict`
    while the job has no adapter to try (not finished, or failed before saving one) or when the
    tenant has too many waiting; `InvalidRequest` for a request that does not fit."""
    job = job_service.get_job(session, tenant_id, job_id)
    _check_source(session, tenant_id, request)
    if request.get("step") is not None:
        try:
            job_service.get_checkpoint(session, job_id, request["step"])
        except NotFound as exc:
            raise InvalidRequest(("body", "step"), exc.detail) from None
    elif job.adapter_key is None:
        if job.status in ACTIVE_STATUSES:
            raise Conflict(f"job {job_id} is {job.status}: its adapter can be tried once it finishes")
        raise Conflict(f"job {job_id} {job.status} without an adapter: there is nothing to generate with")
    waiting = session.scalar(
        select(func.count())
        .select_from(Generation)
        .join(Job, Job.id == Generation.job_id)
        .where(Job.tenant_id == tenant_id, Generation.status.in_(ACTIVE_STATUSES))
    )
    if waiting >= MAX_WAITING_PER_TENANT:
        raise TooManyRequests(f"{waiting} generations are already waiting or running, the most a tenant may have; ask again once one has finished")
    generation = Generation(job_id=job_id, dataset_id=request.get("dataset_id"), request=request)
    session.add(generation)
    session.flush()
    return generation


def _check_source(session: Session, tenant_id: str, request: dict[str, Any]) -> None:
    """Prompts or a dataset's rows, one of the two, each with the settings that go with it."""
    if request.get("dataset_id") is None:
        if request.get("prompts") is None:
            raise InvalidRequest(("body", "prompts"), "give prompts, or a dataset_id whose rows to complete")
        if request.get("rows") is not None:
            raise InvalidRequest(("body", "rows"), "rows goes with a dataset_id (the first rows of it to complete)")
        return
    if request.get("prompts") is not None:
        raise InvalidRequest(("body", "dataset_id"), "give prompts or a dataset_id, not both")
    for field in ("template", "input"):
        if request.get(field) is not None:
            raise InvalidRequest(("body", field), f"{field} goes with prompts: a dataset's rows are dressed as training dressed them")
    try:
        # Locked as creating a job locks its dataset: a deletion either commits first (and this
        # finds the dataset gone) or waits, then sees the generation (`lock_dataset`).
        dataset = get_dataset(session, tenant_id, request["dataset_id"], lock="share")
    except NotFound as exc:
        raise InvalidRequest(("body", "dataset_id"), exc.detail) from None
    formats = (dataset.report or {}).get("formats") or {}
    if formats and not any(count for fmt, count in formats.items() if fmt != "text"):
        raise InvalidRequest(("body", "dataset_id"), f"dataset {dataset.id} has only text rows: none has a prompt to complete")
    if request.get("rows") is None and dataset.rows > MAX_DATASET_ROWS:
        raise InvalidRequest(
            ("body", "rows"), f"dataset {dataset.id} has {dataset.rows} rows, more than the {MAX_DATASET_ROWS} one generation completes: give rows (at most {MAX_DATASET_ROWS})"
        )


def get(session: Session, tenant_id: str, job_id: str, generation_id: str) -> Generation:
    job_service.get_job(session, tenant_id, job_id)
    generation = session.get(Generation, generation_id)
    if generation is None or generation.job_id != job_id:
        raise NotFound(f"generation {generation_id!r} of job {job_id} not found")
    return generation


def forget(session: Session, tenant_id: str, job_id: str, generation_id: str) -> None:
    """Delete a generation in any state. A queued one is never run (the worker's claim finds no
    row) and frees its place among the tenant's waiting ones; a running one finishes on the GPU,
    but its completions are dropped (the worker's `finish` finds no row). Flushes only."""
    generation = get(session, tenant_id, job_id, generation_id)
    session.execute(sql_delete(Generation).where(Generation.id == generation.id))


def list_for_job(session: Session, tenant_id: str, job_id: str, limit: int = 20, after: str | None = None) -> tuple[list[Generation], bool]:
    """Newest first; ``after`` is the last id of the previous page. Returns (rows, has_more)."""
    job_service.get_job(session, tenant_id, job_id)
    query = select(Generation).where(Generation.job_id == job_id)
    if after is not None:
        query = query.where(Generation.id < after)
    rows = list(session.scalars(query.order_by(Generation.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def claim(session: Session, generation_id: str) -> Generation | None:
    """Move a queued generation to running; None if it is not queued (taken, or finished)."""
    claimed = session.execute(
        update(Generation).where(Generation.id == generation_id, Generation.status == "queued").values(status="running", started_at=utcnow())
    ).rowcount
    if not claimed:
        return None
    generation = session.get(Generation, generation_id)
    session.refresh(generation)
    return generation


def finish(session: Session, generation_id: str, result: dict[str, Any] | None = None, error: str | None = None) -> bool:
    """Record a running generation's ``result`` or ``error``; False when it is no longer
    running (the reconciler gave it up)."""
    values: dict[str, Any] = {"status": "failed" if error is not None else "succeeded", "finished_at": utcnow()}
    if error is not None:
        values["error"] = error[:4000]
    else:
        values["result"] = result
    return bool(session.execute(update(Generation).where(Generation.id == generation_id, Generation.status == "running").values(**values)).rowcount)


def record_progress(session: Session, generation_id: str, done: int, total: int) -> None:
    """How many of its prompts (or rows) a running generation has completed."""
    progress = {"done": done, "total": total}
    session.execute(update(Generation).where(Generation.id == generation_id, Generation.status == "running").values(progress=progress))


def queued_count(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Generation).where(Generation.status == "queued"))


def touch_stale(session: Session, older_than_seconds: float, limit: int = 1000) -> list[str]:
    """Queued generations handed to the queue ``older_than_seconds`` ago or more (their message
    may be lost), marked as handed again now. Returns the ids this call marked."""
    now = utcnow()
    stale = (Generation.status == "queued", Generation.requested_at < now - timedelta(seconds=older_than_seconds))
    return mark_each(session, Generation, stale, {"requested_at": now}, limit)


def fail_abandoned(session: Session, older_than_seconds: float = ABANDONED_AFTER_SECONDS, limit: int = 1000) -> list[str]:
    """Running generations started ``older_than_seconds`` ago: their worker stopped. Failed,
    saying so (the user asks again; a generation holds no state worth resuming)."""
    now = utcnow()
    abandoned = (Generation.status == "running", Generation.started_at < now - timedelta(seconds=older_than_seconds))
    values = {"status": "failed", "finished_at": now, "error": "the worker stopped while generating; ask again"}
    return mark_each(session, Generation, abandoned, values, limit)
