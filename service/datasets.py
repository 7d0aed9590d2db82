"""Datasets: validate an uploaded JSONL file with `mola.data.inspect_dataset`, store it, list and
delete. Nothing is stored for a file that does not validate."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Literal

from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db import mark_each
from service.errors import Conflict, InvalidRequest, NotFound
from service.models import ACTIVE_STATUSES, Dataset, Generation, Job, new_id, utcnow
from service.storage import Storage

logger = logging.getLogger(__name__)

MAX_REPORTED_ERRORS = 20

# Fields of the library's report that an upload's validation never fills in: the token
# statistics need a tokenizer (the API has none; per model they are the dataset's
# `token_counts`), and `truncated` needs a `max_bytes` (an upload is read whole). They would
# only ever be null and false beside the real counts, so the report leaves them out.
NOT_REPORTED = ("total_tokens", "mean_tokens", "max_tokens", "cutoff_len", "over_cutoff", "dropped_at_cutoff", "unrenderable", "truncated")


def inspect_file(path: Path, max_row_bytes: int | None = None, max_errors: int = MAX_REPORTED_ERRORS) -> dict[str, Any]:
    """The library's report on a dataset file as a JSON-able dict (rows, valid rows, format,
    formats, errors with line numbers, error count, ok). Imported here so that importing the
    API does not import `mola.data`. Rows longer than ``max_row_bytes`` are errors: a worker
    tokenizes whole rows."""
    from mola.data import inspect_dataset

    return upload_report(_as_dict(inspect_dataset(path, tokenizer=None, max_errors=max_errors, max_row_bytes=max_row_bytes)))


def upload_report(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` without the fields validation leaves empty (`NOT_REPORTED`); also what the API
    shows of a report stored before they were left out."""
    return {k: v for k, v in report.items() if k not in NOT_REPORTED}


def _as_dict(report: Any) -> dict[str, Any]:
    if hasattr(report, "to_dict"):
        data = report.to_dict()
    elif dataclasses.is_dataclass(report):
        data = dataclasses.asdict(report)
    elif isinstance(report, dict):
        data = dict(report)
    else:
        data = dict(vars(report))
    return _jsonable(data)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def is_valid(report: dict[str, Any]) -> bool:
    if "ok" in report:
        return bool(report["ok"])
    return not report.get("errors") and (report.get("rows") or 0) > 0


def create_dataset(
    session: Session,
    storage: Storage,
    tenant_id: str,
    filename: str,
    path: Path,
    size_bytes: int,
    sha256: str,
    max_row_bytes: int | None = None,
) -> Dataset:
    """Validate the file at ``path`` and store it; raises `InvalidRequest` (with the report) when
    it has errors. Flushes; the caller commits."""
    report = inspect_file(path, max_row_bytes)
    if not is_valid(report):
        # error_count: the report lists only the first errors
        count = report.get("error_count") or len(report.get("errors") or [])
        message = (
            f"{filename}: {count} error(s) in the dataset; the first: {_first_error(report)}"
            if count
            else f"{filename}: no training rows found"
        )
        raise InvalidRequest(("body", "file"), message, extra={"report": report})
    dataset_id = new_id("ds")
    key = f"datasets/{tenant_id}/{dataset_id}.jsonl"
    storage.put_file(key, path)
    dataset = Dataset(
        id=dataset_id,
        tenant_id=tenant_id,
        filename=filename,
        format=report.get("format"),
        rows=int(report.get("rows") or 0),
        size_bytes=size_bytes,
        sha256=sha256,
        storage_key=key,
        report=report,
        token_stats={},
        token_counts={},
        token_counts_status="pending",
        token_counts_requested_at=utcnow(),
    )
    session.add(dataset)
    try:
        session.flush()
    except Exception:
        storage.delete(key)
        raise
    return dataset


def _first_error(report: dict[str, Any]) -> str:
    first = (report.get("errors") or [None])[0]
    if isinstance(first, dict):
        line = first.get("line")
        message = first.get("message") or first.get("error") or first
        return f"line {line}: {message}" if line is not None else str(message)
    return str(first)


def get_dataset(session: Session, tenant_id: str, dataset_id: str, lock: Literal["share", "update"] | None = None) -> Dataset:
    """The tenant's dataset; another tenant's or a deleted one is not found. ``lock`` reads its
    row anew and locks it until the transaction ends (see `lock_dataset`)."""
    dataset = lock_dataset(session, dataset_id, lock) if lock else session.get(Dataset, dataset_id)
    if dataset is None or dataset.tenant_id != tenant_id or dataset.deleted_at is not None:
        raise NotFound(f"dataset {dataset_id!r} not found")
    return dataset


def lock_dataset(session: Session, dataset_id: str, mode: Literal["share", "update"]) -> Dataset | None:
    """The dataset's row as committed now, locked until the transaction ends: "update" by its
    deletion, "share" by what starts a job on it (creating or resuming one) or asks a
    generation of its rows. So a deletion and a job (or generation) on the dataset take turns:
    whichever comes second sees the other's commit (the job, or `deleted_at`) instead of both
    passing their checks. Shared locks do not wait for each other, so jobs naming the same
    datasets in any order never deadlock. (SQLite has no row locks; it runs one writer at a
    time.)"""
    query = select(Dataset).where(Dataset.id == dataset_id).with_for_update(read=mode == "share")
    return session.scalars(query.execution_options(populate_existing=True)).first()


@dataclasses.dataclass
class DatasetUsers:
    """What needs a dataset now (`active_users`): the first ids of the queued or running jobs
    that train or evaluate on it and of the queued or running generations completing its
    rows, oldest first, and how many there are in all."""

    jobs: list[str]
    generations: list[str]
    count: int

    def refusal(self, dataset_id: str) -> str:
        """The 409 detail for deleting the dataset."""
        named = [f"{kind}(s) {', '.join(ids)}" for kind, ids in (("job", self.jobs), ("generation", self.generations)) if ids]
        shown = len(self.jobs) + len(self.generations)
        more = f" and {self.count - shown} more" if self.count > shown else ""
        # A generation cannot be cancelled, only deleted (DELETE /jobs/{id}/generations/{id}).
        stop = "cancel" if self.jobs else "delete"
        return f"dataset {dataset_id} is used by queued or running {' and '.join(named)}{more}: {stop} them or wait for them to finish, then delete it"


def active_users(session: Session, dataset_id: str, limit: int = 5) -> DatasetUsers:
    """Up to ``limit`` ids in all (jobs first) of what needs the dataset now."""
    using = {
        Job: ((Job.dataset_id == dataset_id) | (Job.validation_dataset_id == dataset_id), Job.status.in_(ACTIVE_STATUSES)),
        Generation: (Generation.dataset_id == dataset_id, Generation.status.in_(ACTIVE_STATUSES)),
    }
    found: dict[type, list[str]] = {}
    count = 0
    for model, where in using.items():
        ids = list(session.scalars(select(model.id).where(*where).order_by(model.id).limit(limit)))
        found[model] = ids[: limit - sum(map(len, found.values()))]
        count += len(ids) if len(ids) < limit else session.scalar(select(func.count()).select_from(model).where(*where))
    return DatasetUsers(found[Job], found[Generation], count)


def list_datasets(session: Session, tenant_id: str, limit: int = 20, after: str | None = None) -> tuple[list[Dataset], bool]:
    query = select(Dataset).where(Dataset.tenant_id == tenant_id, Dataset.deleted_at.is_(None))
    if after:
        query = query.where(Dataset.id < after)
    rows = list(session.scalars(query.order_by(Dataset.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def delete_dataset(session: Session, dataset: Dataset) -> str:
    """Hide the row (jobs keep referring to it) and return the storage key that the caller
    removes once this is committed. Refused while a queued or running job or generation uses
    the dataset."""
    users = active_users(session, dataset.id)
    if users.count:
        raise Conflict(users.refusal(dataset.id))
    dataset.deleted_at = utcnow()
    session.flush()
    return dataset.storage_key


# ---- token counts (the quick task `mola.count_tokens`, see worker/token_counts.py) ----------
TOKEN_COUNT_FIELDS = (
    "total_tokens", "mean_tokens", "max_tokens", "cutoff_len", "over_cutoff", "dropped_at_cutoff", "valid_rows", "unrenderable",
)  # fmt: skip


def record_token_counts(
    session: Session, dataset_id: str, counts: dict[str, Any], status: str, error: str | None = None
) -> bool:
    """Store the token counts of a dataset and their status; False when the row is gone.
    Flushes; the caller commits."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        return False
    dataset.token_counts = _jsonable(counts)
    dataset.token_counts_status = status
    dataset.token_counts_error = error
    session.flush()
    return True


def touch_stale_token_counts(session: Session, older_than_seconds: float, limit: int = 1000) -> list[str]:
    """Datasets whose token count has been pending for ``older_than_seconds`` (the quick task's
    message may be lost), marked as asked again now so that the next look waits as long again.
    Returns the ids this call marked. Counting is idempotent, so a late duplicate is harmless."""
    now = utcnow()
    stale = (
        Dataset.token_counts_status == "pending",
        Dataset.deleted_at.is_(None),
        (Dataset.token_counts_requested_at.is_(None)) | (Dataset.token_counts_requested_at < now - timedelta(seconds=older_than_seconds)),
    )
    return mark_each(session, Dataset, stale, {"token_counts_requested_at": now}, limit)
