"""Database tables (SQLAlchemy 2 typed models). Alembic migrations in `migrations/` create them;
nothing here calls `create_all`.

Public ids are short prefixed strings that sort by creation time (`job_0191c3...`), so listing
newest-first and paginating with `after=<id>` need no extra column.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

TOKEN_COUNT_STATUSES = ("pending", "ready", "failed")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
# Of jobs and of generations: what waits for a worker or runs on one.
ACTIVE_STATUSES = ("queued", "running")
GENERATION_STATUSES = ("queued", "running", "succeeded", "failed")
# Why a failed job failed (jobs.error_kind), told apart by what a resume can do about it.
FAILURE_KINDS = {
    "out_of_memory": "the device ran out of memory: resume with a smaller micro_batch_size or gradient_checkpointing",
    "data": "its data cannot train under its cutoff_len or base model's chat template: a resume would fail alike",
    "hyperparameters": "a hyperparameter that a resume cannot change makes the run impossible: a resume would fail alike",
    "evaluation": "eval_generate_rows finds no validation row to generate: resume with eval_generate_rows changed",
    "diverged": "the loss or gradient norm became NaN or infinite: resume with bf16 off (it may diverge again), or a new job with a lower learning_rate",
    "base_model": "the worker could not load the base model: resume once the server has it",
    "server_limit": "the adapter is over the server's MOLA_MAX_ADAPTER_PARAMS: resume if the operator raises it",
    "abandoned": "its worker stopped without finishing it on every attempt (killed, crashed): resume after checking the worker logs",
    "internal": "anything else (a bug, a device error): resumable",
}
# Failures a resume would meet again, whatever it changes (an `evaluation` one needs the change).
RECURRING_FAILURES = frozenset({"data", "hyperparameters"})


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id(prefix: str) -> str:
    """``prefix_`` + 12 hex digits of milliseconds + 12 random hex digits: unique, time-ordered."""
    return f"{prefix}_{int(time.time() * 1000):012x}{os.urandom(6).hex()}"


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


# JSONB on PostgreSQL, JSON text elsewhere.
JSONType = JSON().with_variant(JSONB(), "postgresql")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ten"))
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Signs the tenant's webhooks (`whsec_...`, service.webhooks): made when first needed. Kept
    # as it is, not hashed: the server needs it to sign.
    webhook_secret: Mapped[str | None] = mapped_column(String(100))

    api_keys: Mapped[list["ApiKey"]] = relationship(back_populates="tenant")


class ApiKey(Base):
    """An API key, stored as the SHA-256 of the token; `prefix` (the token's public part) finds
    the row without scanning."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    tenant: Mapped[Tenant] = relationship(back_populates="api_keys")


class BaseModelEntry(Base):
    """A base model this server can train, described by `mola models sync` (the API cannot load
    models, so it reads their shape here)."""

    __tablename__ = "base_models"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    model_type: Mapped[str] = mapped_column(String(64))
    num_layers: Mapped[int] = mapped_column(Integer)
    hidden_size: Mapped[int] = mapped_column(Integer)
    target_modules: Mapped[list[str]] = mapped_column(JSONType)
    linear_modules: Mapped[list[str]] = mapped_column(JSONType)
    # Paths inside a decoder layer ("self_attn.q_proj"), to check dotted target names exactly;
    # null for rows synced before they were recorded (then only the last part is checked).
    module_paths: Mapped[list[str] | None] = mapped_column(JSONType, nullable=True)
    max_positions: Mapped[int | None] = mapped_column(Integer, nullable=True)  # cutoff_len's limit
    # Per decoder layer, {path: [in_features, out_features]}: what a job's adapter size is
    # counted from at POST /jobs (`mola.sizing`); null for rows synced before they were recorded.
    module_shapes: Mapped[list[dict[str, list[int]]] | None] = mapped_column(JSONType, nullable=True)
    synced_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ds"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(String(255))
    format: Mapped[str | None] = mapped_column(String(64))
    rows: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(500))
    report: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    # Token statistics per base model, filled in by the worker the first time it tokenizes the
    # dataset for that model: {model_name: {...}}.
    token_stats: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    # Token counts per catalogue model at the default cutoff, computed by the quick task
    # `mola.count_tokens` after the upload: {model_name: {total_tokens, ...} | {error}}, with
    # their status (pending, ready, failed; None for rows uploaded before the task existed).
    token_counts: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    token_counts_status: Mapped[str | None] = mapped_column(String(16))
    token_counts_error: Mapped[str | None] = mapped_column(Text)
    # When the count was last asked of the quick queue; the reconciler asks again when a pending
    # count has waited too long (its message may be lost).
    token_counts_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index(None, "tenant_id", "id"),)


class Job(Base):
    """A fine-tuning job. The database, not the broker, is the source of truth for its state.

    The lease columns let exactly one worker own a running job: it claims the row with a
    conditional UPDATE and renews `lease_expires_at` with each heartbeat.
    """

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    base_model: Mapped[str] = mapped_column(String(200))
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"))
    validation_dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"))
    method: Mapped[str] = mapped_column(String(16))
    # The request as validated, with the allocation and top-k expanded per layer.
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))

    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    epoch: Mapped[float | None]
    error: Mapped[str | None] = mapped_column(Text)
    # One of FAILURE_KINDS with the error of a failed job (NULL: failed before they were recorded).
    error_kind: Mapped[str | None] = mapped_column(String(32))
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # {"train": mola.data.TrainingDataStats as a dict, "validation": ... or absent}, written
    # once the run has tokenized its data.
    data_stats: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # How a finished MoLA job's adapter uses its experts ({"status": "ready", "split", "examples",
    # and mola.analysis.expert_report's "tokens", "layers", "modules"}, or {"status": "failed",
    # "error"}). Tens of kilobytes for a large model: deferred, so listing jobs never loads it.
    analysis: Mapped[dict[str, Any] | None] = mapped_column(JSONType, deferred=True)
    adapter_key: Mapped[str | None] = mapped_column(String(500))

    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    # When it last went (back) to its queue: created, resumed, given back by a stopping worker,
    # queued again after its lease ran out. A queued job's place counts what went there before.
    queued_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Set while the job is being deleted (service.jobs.start_deletion): hidden from the API,
    # its stored files not all gone yet. The row itself goes last.
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The first progress the current run recorded (a claim resets them): the ETA's rate is
    # measured from here, so neither the time a job was down before a resume nor the loading
    # of its model counts as time per step.
    run_first_step: Mapped[int | None] = mapped_column(Integer)
    run_first_step_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        Index(None, "tenant_id", "status", "id"),
        Index(None, "status", "lease_expires_at"),
    )


class JobMetric(Base):
    """One training or evaluation record of a job at a step; `values` holds the numbers."""

    __tablename__ = "job_metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    values: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (UniqueConstraint("job_id", "kind", "step"), Index(None, "job_id", "step"))


class Checkpoint(Base):
    __tablename__ = "checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    storage_prefix: Mapped[str] = mapped_column(String(500))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (UniqueConstraint("job_id", "step"),)


class Generation(Base):
    """Completions of a finished job's adapter (or a checkpoint's) for a few prompts or a
    dataset's rows (POST /jobs/{id}/generations), made by a training worker between jobs. Goes
    with its job (cascade)."""

    __tablename__ = "generations"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("gen"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    # The upload whose rows it completes (also in the request): a column, so deleting the
    # dataset can be refused while a generation waits for it or runs on it.
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"))
    # The request as validated: prompts, template (None: the adapter's), sampling settings.
    request: Mapped[dict[str, Any]] = mapped_column(JSONType)
    # {"template", "completions": [{"prompt" (as rendered), "text", "row"?, "reference"?}],
    # "scores"? (a dataset's rows), "seconds"}, once done.
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # {"done", "total"}: the prompts (or dataset rows) completed so far, while it runs and after.
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # When it was last handed to the queue; the reconciler sends a queued one again when its
    # message may be lost (see service.generations.touch_stale).
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index(None, "job_id", "id"), Index(None, "status", "requested_at"), Index(None, "dataset_id", "status"))


WEBHOOK_STATUSES = ("pending", "delivered", "failed")


class WebhookDelivery(Base):
    """One event of a job (it ended) to POST to the job's `webhook_url`: written in the
    transaction that ends the job (an outbox: no end is committed without its event, and no
    event without its end), then sent, and retried, by the quick workers (service.webhooks).
    Goes with its job."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("whd"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(Text)
    event: Mapped[str] = mapped_column(String(32))  # job.succeeded, job.failed, job.cancelled
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When a sender may next take it: the next retry, or, while one is sending it, the end of
    # that sender's claim (so a sender that died leaves it to another).
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    response_status: Mapped[int | None] = mapped_column(Integer)  # of the last attempt
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index(None, "status", "next_attempt_at"), Index(None, "job_id", "id"))


class Worker(Base):
    """A worker process that is (or was lately) consuming queues. Each worker writes its row at
    every reconciler pass and deletes it when it stops; a row not seen for a while is a worker
    that died (see service.workers)."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)  # "host:pid"
    queues: Mapped[list[str]] = mapped_column(JSONType)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (Index(None, "seen_at"),)
