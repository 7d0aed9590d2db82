"""Settings of the service: one pydantic-settings class, read once from `MOLA_*` variables.

The defaults are the embedded set-up (SQLite and artifacts under the data folder, a broker that
is a folder of files); `mode=production` refuses them, so a deployment states its backends.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODELS = ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "smollm2-135m-instruct"]


class Settings(BaseSettings):
    """Every setting, with its `MOLA_`-prefixed environment variable (`MOLA_DATA_DIR`, ...)."""

    model_config = SettingsConfigDict(env_prefix="MOLA_", env_file=".env", extra="ignore")

    mode: Literal["local", "production"] = Field(
        "local", description="local: embedded defaults allowed; production: backends must be set"
    )
    data_dir: Path = Field(Path("mola-data"), description="folder for the embedded database, broker, artifacts and scratch files")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///DATA_DIR/mola.db")
    broker_url: str | None = Field(None, description="Celery broker URL; default a folder broker under DATA_DIR/broker")
    queue: str = Field("mola.train", description="Celery queue the training jobs go to")
    broker_timeout_seconds: float = Field(
        5.0, gt=0, description="how long a broker that does not answer may hold a send (POST /jobs, the reconciler) before it fails"
    )
    quick_queue: str = Field("mola.quick", description="Celery queue of quick tasks (token counts of an upload, webhooks), so they never wait behind training")
    generation_queue: str | None = Field(
        None,
        description=(
            "Celery queue of generations (POST /jobs/{id}/generations); default MOLA_QUEUE, where a training worker runs them "
            "between jobs. Another name gives them workers of their own (`mola worker --queues NAME`), so trying an "
            "adapter never waits behind a training run"
        ),
    )
    storage: Literal["local", "s3"] = Field("local", description="artifact storage backend: a local folder or an S3-compatible object store")
    storage_dir: Path | None = Field(None, description="folder of the local storage; default DATA_DIR/artifacts")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, SeaweedFS, ...); unset for AWS S3")
    s3_public_endpoint_url: str | None = Field(None, description="endpoint clients reach for presigned downloads; default S3_ENDPOINT_URL")
    s3_region: str = Field("us-east-1", description="S3 region")
    s3_bucket: str = Field("mola", description="bucket holding every artifact")
    s3_access_key_id: str | None = Field(None, description="S3 access key; unset: boto3's own chain (env, profile, instance role)")
    s3_secret_access_key: str | None = Field(None, description="S3 secret key")
    s3_prefix: str = Field("", description="key prefix inside the bucket (e.g. mola/), to share a bucket")
    s3_create_bucket: bool = Field(False, description="create the bucket at start-up when it is missing")
    s3_multipart_threshold_mb: float = Field(64.0, gt=0, description="files larger than this upload in parts")
    download_mode: Literal["redirect", "stream"] = Field(
        "redirect", description="adapter downloads from object storage: a 307 to a presigned URL, or streamed through the API (local storage always streams)"
    )
    presign_seconds: int = Field(300, ge=1, le=7 * 24 * 3600, description="lifetime of a presigned download URL")
    ready_timeout_seconds: float = Field(2.0, gt=0, description="per-backend timeout of GET /readyz")
    max_upload_mb: float = Field(100.0, gt=0, description="largest dataset upload, in MiB")
    max_row_kb: int = Field(
        1024, gt=0, description="longest row of an upload, in KiB: workers tokenize whole rows, at about 100 bytes of memory per token"
    )
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_MODELS),
        description="base models offered (comma-separated); `mola models sync` describes them",
    )
    host: str = Field("127.0.0.1", description="address `mola serve` listens on")
    port: int = Field(8000, ge=1, le=65535, description="port `mola serve` listens on")
    embedded_worker: bool = Field(True, description="`mola serve` also starts a worker process")
    device: str | None = Field(None, description="torch device for training (default: cuda if available, else cpu)")
    metrics_flush_seconds: float = Field(2.0, gt=0, description="how often the worker writes buffered metrics")
    cancel_poll_seconds: float = Field(0.5, ge=0, description="least time between two cancellation checks in a run")
    lease_seconds: float = Field(300.0, gt=0, description="how long a worker's claim on a running job lasts without a heartbeat")
    max_adapter_params: int = Field(
        1_000_000_000,
        ge=0,
        description="most trainable parameters a job's adapter may have (about 16 bytes each while training: weights, gradients, AdamW); 0: no limit",
    )
    max_active_jobs: int = Field(
        50,
        ge=0,
        description=(
            "queued and running jobs one tenant may have at once, so that one tenant's hundred jobs do not queue "
            "every other tenant's behind them; creating or resuming one more is a 429 (0: no limit)"
        ),
    )
    webhook_timeout_seconds: float = Field(10.0, gt=0, description="how long a webhook's receiver may take to answer before the attempt counts as failed")
    webhook_max_attempts: int = Field(
        8, ge=1, description="attempts at a webhook (the first, then retries after 30 s, 1, 2, 4 ... minutes, at most an hour apart) before it is failed"
    )
    webhook_private_addresses: bool | None = Field(
        None,
        description=(
            "whether webhooks may go to loopback and private-network addresses (a receiver inside your network); "
            "default: yes in local mode, no in production, where a tenant's URL must not reach the service's own "
            "network. Link-local addresses (cloud metadata) are refused either way"
        ),
    )
    keep_checkpoints: int = Field(
        2, ge=0, description="checkpoints kept in storage per job, the newest (0 keeps all), and the one with the lowest eval_loss; the others are deleted as new ones arrive"
    )
    generation_keep_base_seconds: float = Field(
        300.0,
        ge=0,
        description=(
            "how long a worker keeps the base model of its last generation loaded, idle, so the next generation on that "
            "model starts at once; a training run in the same worker lets it go first; 0: load it for every generation"
        ),
    )
    max_attempts: int = Field(3, ge=1, description="runs of a job whose worker stopped without finishing it (lease expired) before the job fails")
    reconcile_seconds: float = Field(30.0, gt=0, description="how often each worker re-queues jobs with expired leases and re-enqueues queued jobs the broker lost")
    requeue_after_seconds: float = Field(120.0, ge=0, description="a queued job unclaimed this long is enqueued again when the broker holds fewer messages than queued jobs")
    log_level: str = Field("INFO", description="logging level of the service processes")

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @model_validator(mode="after")
    def _check_mode(self) -> "Settings":
        if not self.models:
            raise ValueError("MOLA_MODELS must name at least one base model")
        if self.mode == "production":
            problems = []
            if not self.database_url or self.database_url.startswith("sqlite"):
                problems.append("MOLA_DATABASE_URL must name a database server (SQLite is for local mode)")
            if not self.broker_url or self.broker_url.split(":", 1)[0] in ("filesystem", "memory"):
                problems.append("MOLA_BROKER_URL must name a broker server (the folder broker is for local mode)")
            if self.embedded_worker:
                problems.append("MOLA_EMBEDDED_WORKER must be false: run workers with `mola worker`")
            if problems:
                raise ValueError("production mode refuses local defaults: " + "; ".join(problems))
        if self.storage == "s3" and not self.s3_bucket:
            raise ValueError("MOLA_S3_BUCKET must name a bucket when MOLA_STORAGE=s3")
        return self

    # ---- derived values --------------------------------------------------------------------
    @property
    def generations_queue(self) -> str:
        """Where generations go: MOLA_GENERATION_QUEUE, else (unset or empty) the training queue."""
        return self.generation_queue or self.queue

    @property
    def webhooks_reach_private(self) -> bool:
        return self.mode == "local" if self.webhook_private_addresses is None else self.webhook_private_addresses

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'mola.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://localhost//"

    @property
    def broker_folder(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @property
    def resolved_storage_dir(self) -> Path:
        return (self.storage_dir or self.data_dir / "artifacts").resolve()

    @property
    def scratch_dir(self) -> Path:
        """Local working files of a worker (downloaded datasets, checkpoints being written)."""
        return (self.data_dir / "work").resolve()

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def is_sqlite(self) -> bool:
        return self.resolved_database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings()
