"""Running one job: claim it, load the base model and the data, build the adapter, call
`mola.train.train`, and record what happens.

- Metrics are buffered and written in batches (whole steps at a time, every
  `metrics_flush_seconds`), so training never waits on the database for each step.
- Cancellation is a cheap read of one column, at most every `cancel_poll_seconds`; the callback
  then returns True and the trainer stops after the step (writing a checkpoint first).
- A heartbeat thread renews the job's lease every quarter of `lease_seconds`; if the lease is
  lost (the job was recovered from this worker and maybe taken by another) the run stops at its
  next step, and every write it makes (metrics, checkpoint rows, the final state) is made in
  one transaction with a lease check, so it writes nothing more.
- Checkpoints are uploaded to storage as they are written; a job that is claimed again (after a
  warm shutdown, or after its worker died and its lease expired) resumes from its latest one,
  and the metrics the lost run wrote after that step are deleted first: the new run writes
  them again, so every step has exactly one row, from the run the adapter continues.
- Stored files are fenced like rows: each run writes under names of its own
  (`jobs/<job>/checkpoints/<run>/checkpoint-<step>/`, `jobs/<job>/adapter-<run>.tar.gz`), and
  a row names them only if the lease still held when it was written. A worker that stalled
  and lost the job (say, paused for longer than its lease) can therefore never overwrite the
  files of the run that took over, and deletes what it uploaded once it learns it lost the
  job; files that nothing names (an upload whose row could not be written) are deleted by the
  run's next checkpoint and at its end.
- A database that drops its connection or restarts mid-run costs no progress: a metrics write
  that fails keeps its rows for the next flush, a failed cancellation read counts as "not
  cancelled", a checkpoint whose row cannot be written is simply not offered for resuming, and
  the final state is written with retries (for up to half a lease, when a recovery could take
  the job anyway).
- Warm shutdown (SIGTERM): the run stops after its current step, checkpoints, gives the job
  back (`queued`) and enqueues it again, for this or another worker to resume.
- The final adapter is uploaded as a `.tar.gz` with `adapter_config.json`,
  `adapter_model.safetensors` and a `README.md` model card.

No transaction is held across training: every write is a short session of its own.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import shutil
import socket
import tarfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service import jobs as job_service
from service.db import make_engine, make_sessionmaker, session_scope
from service.models import TERMINAL_STATUSES, Checkpoint, Dataset, Job
from service.queue import CeleryQueue
from service.settings import Settings
from service.storage import Storage, make_storage
from worker.base_models import BASE_MODELS
from worker.expert_analysis import analyse_experts, card_section
from worker.failures import RunFailure, describe_error, failing_as, failure_kind

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Set by the worker's warm-shutdown signal: the running job checkpoints and goes back to the queue.
SHUTDOWN = threading.Event()

# Request hyperparameters that `mola.train.TrainConfig` takes as they are.
TRAIN_FIELDS = (
    "epochs",
    "max_steps",
    "learning_rate",
    "batch_size",
    "micro_batch_size",
    "cutoff_len",
    "train_on_inputs",
    "warmup_steps",
    "lr_schedule",
    "weight_decay",
    "max_grad_norm",
    "seed",
    "bf16",
    "gradient_checkpointing",
    "torch_compile",
    "eval_every",
    "checkpoint_every",
)
# Evaluation metrics checkpoints and model cards carry (with the training loss).
EVAL_NOTED = ("eval_loss", "eval_exact_match", "eval_answer_accuracy")
# What a database that is restarting, failing over or unreachable raises: worth retrying later.
# (Constraint violations and programming errors are not: they would fail again.)
TRANSIENT_DB_ERRORS = (OperationalError, InterfaceError, DisconnectionError)


class Resources:
    """Per-process database and storage handles, built once per settings."""

    _cache: dict[int, "Resources"] = {}

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sessions: sessionmaker[Session] = make_sessionmaker(make_engine(settings))
        self.storage: Storage = make_storage(settings)
        self.queue = CeleryQueue(settings)  # connects when first used

    @classmethod
    def of(cls, settings: Settings) -> "Resources":
        key = id(settings)  # the cached value holds `settings`, so its id is never reused
        if key not in cls._cache:
            cls._cache[key] = cls(settings)
        return cls._cache[key]


def worker_prefix(pid: int | None = None) -> str:
    """The start of the lease owner of every job run by the process ``pid`` on this host."""
    return f"{socket.gethostname()}:{pid or os.getpid()}:"


def worker_identity() -> str:
    return f"{worker_prefix()}{uuid.uuid4().hex[:8]}"


def run_token(owner: str) -> str:
    """The random part of a run's lease owner: it names the files the run stores."""
    return owner.rsplit(":", 1)[-1]


def checkpoints_root(job_id: str) -> str:
    return f"jobs/{job_id}/checkpoints"


def checkpoint_prefix(job_id: str, run: str, step: int) -> str:
    return f"{checkpoints_root(job_id)}/{run}/checkpoint-{step}"


def adapter_key(job_id: str, run: str) -> str:
    return f"jobs/{job_id}/adapter-{run}.tar.gz"


def stored_checkpoint_folders(keys: list[str], root: str) -> dict[str, int]:
    """{folder: step} of the checkpoint folders that hold ``keys`` (listed under ``root``):
    ``root/<run>/checkpoint-<step>``, or ``root/checkpoint-<step>`` as stored before runs
    had folders of their own."""
    folders: dict[str, int] = {}
    for key in keys:
        parts = key[len(root) + 1 :].split("/")
        depth = 1 if parts[0].startswith("checkpoint-") else 2
        if len(parts) <= depth:
            continue  # a file beside the folders: not a checkpoint
        name = parts[depth - 1].removeprefix("checkpoint-")
        if name.isdigit():
            folders["/".join([root, *parts[:depth]])] = int(name)
    return folders


class Stop(Exception):
    """The run ended early for ``reason`` ("cancel", "shutdown" or "lease_lost")."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---- the callback ----------------------------------------------------------------------------
def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return str(value)


class Reporter:
    """The trainer's callback: buffers metrics, uploads checkpoints, decides when to stop."""

    def __init__(self, job_id: str, owner: str, res: Resources, heartbeat: "Heartbeat", spec: dict[str, Any] | None = None) -> None:
        self.job_id = job_id
        self.owner = owner
        self.run = run_token(owner)
        self.res = res
        self.heartbeat = heartbeat
        self.settings = res.settings
        self.buffer: list[dict[str, Any]] = []
        self.last_flush = time.monotonic()
        self.last_cancel_check = 0.0
        self.stop_reason: str | None = None
        self.progress: dict[str, Any] = {}
        self.data_stats: dict[str, Any] = {}
        self.spec = spec or {}  # the job's: the checkpoints' model cards describe it
        self.latest: dict[str, tuple[int, float]] = {}  # "loss", EVAL_NOTED: (step, value)

    def __call__(self, event: dict[str, Any]) -> bool:
        kind = event.get("kind")
        if kind == "train":
            # Flush before adding step N: the buffer then holds whole steps (step N-1's train
            # and eval rows together), so a reader paging by step never misses a row.
            if time.monotonic() - self.last_flush >= self.settings.metrics_flush_seconds:
                self.flush()
            self.progress = {"step": event["step"], "total_steps": event.get("total_steps"), "epoch": event.get("epoch")}
            self.buffer.append(self._row(event))
            self._note("loss", event)
        elif kind == "eval":
            self.buffer.append(self._row(event))
            for name in EVAL_NOTED:
                self._note(name, event)
        elif kind == "checkpoint":
            # The flush renews the lease: a worker that stalled for longer than its lease learns
            # here that the job is gone, before it spends an upload on it.
            self.flush()
            self.upload_checkpoint(event)
        return self.should_stop()

    def _note(self, name: str, event: dict[str, Any]) -> None:
        if isinstance(event.get(name), (int, float)):
            self.latest[name] = (int(event["step"]), float(event[name]))

    def _loss_at(self, name: str, step: int) -> float | None:
        noted = self.latest.get(name)
        return noted[1] if noted and noted[0] == step else None

    @staticmethod
    def _row(event: dict[str, Any]) -> dict[str, Any]:
        values = {k: v for k, v in event.items() if k not in ("kind", "step", "total_steps")}
        values["time"] = time.time()  # when the step ended (unix seconds; rows are written later)
        return {"step": int(event["step"]), "kind": event["kind"], "values": _clean(values)}

    def should_stop(self) -> bool:
        if self.stop_reason is None and self.heartbeat.lost:
            self.stop_reason = "lease_lost"
        if self.stop_reason is None and SHUTDOWN.is_set():
            self.stop_reason = "shutdown"
        now = time.monotonic()
        if self.stop_reason is None and now - self.last_cancel_check >= self.settings.cancel_poll_seconds:
            self.last_cancel_check = now
            try:
                with self.res.sessions() as session:
                    if job_service.cancel_requested(session, self.job_id):
                        self.stop_reason = "cancel"
            except TRANSIENT_DB_ERRORS as exc:  # asked again at the next poll
                logger.warning("job %s: cancellation check failed (%s); training on", self.job_id, _first_line(exc))
        return self.stop_reason is not None

    def flush(self) -> bool:
        """Write the buffered rows; False (rows kept for the next flush) if the database failed."""
        try:
            self._write_buffer()
        except TRANSIENT_DB_ERRORS as exc:
            logger.warning("job %s: writing %d metric rows failed (%s); retrying at the next flush", self.job_id, len(self.buffer), _first_line(exc))
            return False
        return True

    def flush_all(self) -> None:
        """The run's last flush: retried while the database is away, for up to half a lease."""
        _retrying(self.settings, self.job_id, "writing the last metrics", self._write_buffer)

    def _write_buffer(self) -> None:
        rows, self.buffer = self.buffer, []
        self.last_flush = time.monotonic()
        if self.heartbeat.lost:
            return
        try:
            with session_scope(self.res.sessions) as session:
                # The lease first: its UPDATE locks the job's row, so a recovery cannot slip in
                # between, and a worker that lost the job writes no metrics over the new run's.
                held = job_service.heartbeat(session, self.job_id, self.owner, self.settings.lease_seconds, **self.progress)
                if held:
                    job_service.record_metrics(session, self.job_id, rows)
        except TRANSIENT_DB_ERRORS:
            # Rolled back as a whole: the rows go back in front of any newer ones, in step order.
            self.buffer = rows + self.buffer
            raise
        if not held:
            self.heartbeat.lost = True

    def upload_checkpoint(self, event: dict[str, Any]) -> None:
        if self.heartbeat.lost:  # the job is someone else's now: its checkpoints are theirs
            return
        step = int(event["step"])
        prefix = checkpoint_prefix(self.job_id, self.run, step)
        path = Path(event["path"])
        size = self.res.storage.put_dir(prefix, path)
        # The checkpoint's adapter as a download of its own (GET .../checkpoints/<step>/adapter),
        # uploaded before the row: a row means the archive is there.
        archive = self._checkpoint_archive(path, step, event.get("total_steps"))
        try:
            size += self.res.storage.put_file(job_service.checkpoint_adapter_key(prefix), archive)
        finally:
            archive.unlink(missing_ok=True)
        try:
            with session_scope(self.res.sessions) as session:
                held = job_service.heartbeat(session, self.job_id, self.owner, self.settings.lease_seconds)
                if held:
                    job_service.record_checkpoint(session, self.job_id, step, prefix, size, self._checkpoint_metrics(event))
                    job_service.prune_checkpoints(session, self.job_id, self.settings.keep_checkpoints)
                    named = set(job_service.checkpoint_prefixes(session, self.job_id))
        except TRANSIENT_DB_ERRORS as exc:
            # Without its row the checkpoint is never resumed from; the next one will be (and
            # its clean-up deletes these files).
            logger.warning("job %s: recording the checkpoint at step %d failed (%s)", self.job_id, step, _first_line(exc))
            return
        if not held:
            # Lost during the upload: these files are this run's own, and nothing names them.
            self.heartbeat.lost = True
            _delete_quietly(self.job_id, prefix, self.res.storage.delete_prefix)
            return
        logger.info("job %s: checkpoint at step %d uploaded (%d bytes)", self.job_id, step, size)
        self._delete_unnamed_checkpoints(named, up_to_step=step)

    def _checkpoint_metrics(self, event: dict[str, Any]) -> dict[str, Any]:
        """The epoch, and the losses (and generated-answer scores) of the checkpoint's step, to
        pick one by validation loss or accuracy."""
        return _clean({k: v for k, v in self._scores_at(int(event["step"]), epoch=event.get("epoch")).items() if v is not None})

    def _scores_at(self, step: int, **more: Any) -> dict[str, Any]:
        return {**more, "loss": self._loss_at("loss", step), **{name: self._loss_at(name, step) for name in EVAL_NOTED}}

    def _checkpoint_archive(self, path: Path, step: int, total_steps: int | None) -> Path:
        card = model_card(
            self.job_id, self.spec, f"checkpoint at step {step} of {total_steps}", self._scores_at(step), data_stats=self.data_stats
        )
        return pack_adapter(path.parent / f".{path.name}-adapter.tar.gz", path, card)

    def record_data_stats(self, stats: dict[str, Any]) -> None:
        """What the run tokenized (`TrainingDataStats` per split), for the job's `data`."""
        self.data_stats = stats
        try:
            with session_scope(self.res.sessions) as session:
                held = job_service.record_data_stats(session, self.job_id, self.owner, _clean(stats))
        except TRANSIENT_DB_ERRORS as exc:  # a description of the data: not worth stopping a run
            logger.warning("job %s: recording the data statistics failed (%s)", self.job_id, _first_line(exc))
            return
        if not held:
            self.heartbeat.lost = True

    def _delete_unnamed_checkpoints(self, named: set[str], up_to_step: int) -> None:
        """Delete the stored checkpoint folders no row names, up to ``up_to_step``: those whose
        rows were just pruned, uploads whose row could not be written, and what runs that lost
        the job left. Not later steps: if this run lost the job just now, the run that takes
        over resumes from ``up_to_step`` and may be uploading a later step right now."""
        root = checkpoints_root(self.job_id)
        try:
            folders = stored_checkpoint_folders(self.res.storage.list(root), root)
            for folder, step in sorted(folders.items()):
                if folder not in named and step <= up_to_step:
                    self.res.storage.delete_prefix(folder)
        except Exception as exc:  # an orphan costs space, not correctness
            logger.warning("job %s: could not delete old checkpoints (%s)", self.job_id, exc)


def _delete_quietly(job_id: str, name: str, delete: Callable[[str], None]) -> None:
    """``delete(name)`` (a storage's `delete` or `delete_prefix`), logging a failure."""
    try:
        delete(name)
    except Exception as exc:  # an orphan costs space, not correctness
        logger.warning("job %s: could not delete %s (%s)", job_id, name, exc)


def _delete_other_adapters(storage: Storage, job_id: str, kept: str) -> None:
    """Delete the adapter archives of the job's earlier runs that lost it mid-upload."""
    prefix = f"jobs/{job_id}"
    try:
        for key in storage.list(prefix):
            name = key[len(prefix) + 1 :]
            if key != kept and "/" not in name and name.startswith("adapter") and name.endswith(".tar.gz"):
                storage.delete(key)
    except Exception as exc:
        logger.warning("job %s: could not delete stale adapter files (%s)", job_id, exc)


class Heartbeat(threading.Thread):
    """Renews the job's lease every quarter of its length until stopped; sets `lost` when the
    job is no longer this worker's."""

    def __init__(self, job_id: str, owner: str, res: Resources) -> None:
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.job_id, self.owner, self.res = job_id, owner, res
        self.done = threading.Event()
        self.lost = False

    def run(self) -> None:
        interval = max(0.2, self.res.settings.lease_seconds / 4)
        while not self.done.wait(interval):
            try:
                with session_scope(self.res.sessions) as session:
                    if not job_service.heartbeat(session, self.job_id, self.owner, self.res.settings.lease_seconds):
                        self.lost = True
                        return
            except Exception:  # a busy database must not kill the run; the next beat retries
                logger.warning("job %s: heartbeat failed", self.job_id, exc_info=True)

    def stop(self) -> None:
        self.done.set()


# ---- the run ---------------------------------------------------------------------------------
def run_job(job_id: str, settings: Settings) -> str:
    """Run the job if it is queued; returns the status it ends in (or "skipped")."""
    res = Resources.of(settings)
    owner = worker_identity()
    if SHUTDOWN.is_set():
        logger.info("job %s: worker shutting down, not starting it", job_id)
        return "skipped"
    with session_scope(res.sessions) as session:
        # A stale lease (its worker is gone) is taken over here rather than at the next
        # reconciliation; a live one makes this delivery a no-op.
        job_service.recover_expired_leases(session, settings.max_attempts, job_id)
        job = job_service.claim_job(session, job_id, owner, settings.lease_seconds)
        if job is None:
            current = session.get(Job, job_id)
            logger.info("job %s is %s, not queued: nothing to do", job_id, current.status if current else "missing")
            return "skipped"
        spec = dict(job.spec)
        datasets = {d.id: d.storage_key for d in session.scalars(select(Dataset).where(Dataset.id.in_([job.dataset_id, job.validation_dataset_id or ""])))}
        checkpoint = session.scalar(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step.desc()).limit(1))
        resume_prefix = checkpoint.storage_prefix if checkpoint else None
        replaced = job_service.prepare_resume(session, job_id, checkpoint.step if checkpoint else 0)
        attempt = job.attempts
    logger.info("job %s: running as %s, attempt %d (%s on %s)", job_id, owner, attempt, spec["method"], spec["base_model"])
    BASE_MODELS.release()  # a base model kept from a generation must not hold memory the run needs
    if resume_prefix or replaced:
        logger.info("job %s: resuming from %s; %d metric rows of later steps replaced", job_id, resume_prefix or "the start", replaced)

    work = settings.scratch_dir / job_id
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    heartbeat = Heartbeat(job_id, owner, res)
    heartbeat.start()
    reporter = Reporter(job_id, owner, res, heartbeat, spec)
    try:
        status = _run(job_id, owner, spec, datasets, resume_prefix, work, res, reporter)
    except TRANSIENT_DB_ERRORS as exc:
        # The database failed, not the job, and stayed away through the retries (while
        # training, or while recording how the run ended): nothing more is written, and the job
        # stays `running` until its lease expires; the reconciler then queues it again, to
        # resume from its latest recorded checkpoint, counting this run as one attempt.
        logger.error("job %s: the database stayed unavailable (%s); the job resumes after its lease expires", job_id, _first_line(exc))
        return "interrupted"
    finally:
        heartbeat.stop()
        shutil.rmtree(work, ignore_errors=True)
    if status in TERMINAL_STATUSES and spec.get("webhook_url"):
        _ask_for_webhooks(res, job_id)
    return status


def _ask_for_webhooks(res: Resources, job_id: str) -> None:
    """The job's end is committed with its webhook's event: a quick worker sends it now."""
    try:
        res.queue.enqueue_webhooks()
    except Exception as exc:  # the event waits in the outbox: the next reconciler pass asks again
        logger.warning("job %s: could not ask for its webhook to be sent (%s); the reconciler will", job_id, _first_line(exc))


def _run(job_id: str, owner: str, spec: dict, datasets: dict[str, str], resume_prefix: str | None, work: Path, res: Resources, reporter: Reporter) -> str:
    """Train, then record how the run ended: succeeded, stopped early or failed."""
    try:
        trained = _train(job_id, spec, datasets, resume_prefix, work, res, reporter)
        return _finish(job_id, owner, spec, trained, work, res, reporter)
    except Stop as stop:
        return _stopped_early(job_id, owner, stop.reason, res, reporter)
    except TRANSIENT_DB_ERRORS:
        raise  # not the job's fault: see run_job
    except Exception as exc:
        logger.exception("job %s failed", job_id)
        return _fail(job_id, owner, exc, res, reporter)


def _train(job_id: str, spec: dict, datasets: dict[str, str], resume_prefix: str | None, work: Path, res: Resources, reporter: Reporter) -> "Trained":
    import torch

    from mola.data import load_training_data, prompt_template_for
    from mola.models import load_base_model
    from mola.train import TrainConfig, TrainingDiverged, check_schedule, train

    hp = spec["hyperparameters"]
    if reporter.should_stop():
        raise Stop(reporter.stop_reason or "cancel")
    device = res.settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with failing_as("base_model"):
        model, tokenizer = load_base_model(spec["base_model"], device=device)
    # The adapter's initial weights come from the job's seed, as in `mola train`: the same
    # request gives the same adapter on any worker (a resumed run loads them from its checkpoint).
    torch.manual_seed(hp.get("seed", 42))
    _check_adapter_size(model, spec, res.settings.max_adapter_params)
    model = _adapter(model, spec)

    train_path = res.storage.get_file(datasets[spec["dataset_id"]], work / "train.jsonl")
    with failing_as("data"):  # a row the base model's chat template refuses, say
        train_data = load_training_data(train_path, tokenizer, cutoff_len=hp["cutoff_len"], train_on_inputs=hp["train_on_inputs"])
    data_stats = {"train": train_data.stats.to_dict()}
    if train_data:
        _record_token_stats(spec["dataset_id"], spec["base_model"], train_data.stats, res)
    eval_data = None
    if spec.get("validation_dataset_id") and train_data:
        eval_path = res.storage.get_file(datasets[spec["validation_dataset_id"]], work / "validation.jsonl")
        with failing_as("data"):
            eval_data = load_training_data(eval_path, tokenizer, cutoff_len=hp["cutoff_len"], train_on_inputs=hp["train_on_inputs"])
        data_stats["validation"] = eval_data.stats.to_dict()
    # Recorded before a refusal too, so a failed job shows what was dropped.
    reporter.record_data_stats(data_stats)
    if not train_data:
        raise RunFailure("data", f"no training example keeps a trainable token within cutoff_len={hp['cutoff_len']} ({_dropped(train_data.stats)})")
    if eval_data is not None and not eval_data:  # asked for, so not silently skipped: the losses would never come
        raise RunFailure("data", f"no validation example keeps a trainable token within cutoff_len={hp['cutoff_len']} ({_dropped(eval_data.stats)})")

    generated = _generation_eval(eval_path, tokenizer, hp) if eval_data is not None and hp.get("eval_generate_rows") else None

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    options = {k: hp[k] for k in TRAIN_FIELDS if k in hp and k in known}
    if "log_every" in known:
        options["log_every"] = 1  # metrics for every step
    # Recorded with the adapter and its checkpoints: `mola generate` dresses prompts alike.
    options["prompt_template"] = prompt_template_for(train_data.formats)
    config = TrainConfig(**options)
    with failing_as("hyperparameters"):  # before the steps: `train` would refuse it only after loading a checkpoint
        check_schedule(config, len(train_data))
    resume_from = None
    if resume_prefix:
        resume_from = res.storage.get_dir(resume_prefix, work / "resume" / Path(resume_prefix).name)
        logger.info("job %s: resuming from %s", job_id, resume_prefix)
    try:
        result = train(
            model,
            tokenizer,
            train_data,
            eval_data,
            config=config,
            callback=reporter,
            checkpoint_dir=work / "checkpoints",
            resume_from=resume_from,
            extra_eval=generated,
        )
    except TrainingDiverged as exc:
        raise RunFailure("diverged", str(exc)) from exc
    reporter.flush_all()
    if result.stopped and reporter.stop_reason in ("shutdown", "lease_lost"):
        raise Stop(reporter.stop_reason)
    routed = ("validation", eval_data) if eval_data else ("train", train_data)
    return Trained(model, tokenizer, result, generated.samples if generated else None, *routed, config.prompt_template)


@dataclasses.dataclass
class Trained:
    """What a finished run leaves for `_finish`: the adapted model and the run's result, the
    generated samples (with eval_generate_rows), the examples the expert analysis routes and
    the prompt template recorded with the adapter."""

    model: Any
    tokenizer: Any
    result: Any
    samples: list[dict[str, str]] | None
    routed_split: str
    routed_examples: list[dict]
    prompt_template: str | None


def _generation_eval(eval_path: Path, tokenizer: Any, hp: dict) -> Any:
    """``eval_generate_rows``: the scorer of the first N validation rows that fit in cutoff_len."""
    from mola.data import generation_rows
    from mola.evaluate import CompletionScorer

    rows = generation_rows(eval_path, tokenizer, hp["cutoff_len"], limit=hp["eval_generate_rows"])
    if not rows:
        raise RunFailure(
            "evaluation",
            f"eval_generate_rows: none of the first {hp['eval_generate_rows']} validation rows has a prompt whose "
            f"prompt and completion fit in cutoff_len={hp['cutoff_len']}"
        )
    return CompletionScorer(rows, tokenizer, batch_size=hp["micro_batch_size"])


def _mola_config(spec: dict) -> Any:
    from mola import MolaConfig

    hp = spec["hyperparameters"]
    return MolaConfig(
        experts=spec["experts_per_layer"],
        top_k=spec["top_k_per_layer"],
        rank=hp["rank"],
        alpha=hp["alpha"],
        dropout=hp["dropout"],
        target_modules=hp["target_modules"],
        aux_loss_coef=hp["aux_loss_coef"],
        base_model_name_or_path=spec["base_model"],
    )


def _check_adapter_size(model: Any, spec: dict, limit: int) -> None:
    """Refuse, before allocating anything, an adapter over ``MOLA_MAX_ADAPTER_PARAMS``: a
    request for thousands of experts of a high rank would take the worker's memory (and, run
    again after each crash, the worker) rather than fail."""
    if not limit:
        return
    from mola.lora import lora_parameter_count, mola_parameter_count

    hp = spec["hyperparameters"]
    if spec["method"] == "mola":
        count = mola_parameter_count(model, _mola_config(spec))
    else:
        count = lora_parameter_count(model, hp["rank"], hp["target_modules"])
    if count > limit:
        raise RunFailure(
            "server_limit",
            f"the adapter would have {count:,} trainable parameters, more than this server allows "
            f"(MOLA_MAX_ADAPTER_PARAMS={limit:,}): lower rank or the experts per layer, or adapt fewer target_modules"
        )


def _adapter(model: Any, spec: dict) -> Any:
    hp = spec["hyperparameters"]
    if spec["method"] == "mola":
        from mola import get_mola_model

        return get_mola_model(model, _mola_config(spec))
    from mola.lora import get_lora_model

    return get_lora_model(model, rank=hp["rank"], alpha=hp["alpha"], dropout=hp["dropout"], target_modules=hp["target_modules"])


def _dropped(stats: Any) -> str:
    return f"all {stats.records} records dropped: their prompts fill the cutoff, leaving no completion token"


def _record_token_stats(dataset_id: str, model_name: str, stats: Any, res: Resources) -> None:
    """The dataset's token statistics for this base model (shown with the dataset)."""
    summary = {k: getattr(stats, k) for k in ("examples", "total_tokens", "trainable_tokens", "mean_tokens", "max_tokens", "cutoff_len", "over_cutoff", "dropped_at_cutoff")}
    try:
        with session_scope(res.sessions) as session:
            job_service.record_token_stats(session, dataset_id, model_name, summary)
    except TRANSIENT_DB_ERRORS as exc:  # statistics for the dataset page: not worth stopping a run
        logger.warning("dataset %s: recording token statistics failed (%s)", dataset_id, _first_line(exc))


def _summary(result: Any, samples: list[dict[str, str]] | None = None) -> dict[str, Any]:
    return _clean(
        {
            # With eval_generate_rows: the last evaluation's first generations beside their references.
            **({"samples": samples} if samples else {}),
            "steps": result.steps,
            "total_steps": result.total_steps,
            "stopped_early": result.stopped,
            # What the request left to the run (null there): the values it chose.
            "warmup_steps": result.warmup_steps,
            "bf16": result.bf16,
            "train": {k: v for k, v in (result.metrics or {}).items() if k not in ("kind",)},
            "eval": {k: v for k, v in (result.eval_metrics or {}).items() if k not in ("kind",)},
        }
    )


def _finish(job_id: str, owner: str, spec: dict, trained: Trained, work: Path, res: Resources, reporter: Reporter) -> str:
    from mola.train import save_adapter

    model, result = trained.model, trained.result
    status = "cancelled" if result.stopped else "succeeded"
    adapter_dir = work / "adapter"
    analysis = None
    if spec["method"] == "mola":
        save_adapter(model, adapter_dir, trained.prompt_template, metadata={"job_id": job_id, "dataset_id": spec["dataset_id"], "steps": result.steps})
        hp = spec["hyperparameters"]
        analysis = analyse_experts(model, trained.tokenizer, trained.routed_split, trained.routed_examples, hp["micro_batch_size"], result.bf16)
    else:
        save_adapter(model, adapter_dir, trained.prompt_template)
    scores = {"loss": (result.metrics or {}).get("loss"), **{name: (result.eval_metrics or {}).get(name) for name in EVAL_NOTED}}
    card = model_card(job_id, spec, f"{status} after {result.steps} of {result.total_steps} steps", scores, data_stats=reporter.data_stats, analysis=analysis)
    archive = pack_adapter(work / "adapter.tar.gz", adapter_dir, card)
    if reporter.heartbeat.lost:
        logger.warning("job %s: lease lost before finishing; another worker owns it", job_id)
        return "lost"
    key = adapter_key(job_id, reporter.run)
    res.storage.put_file(key, archive)

    def finish(session: Session) -> bool:
        return job_service.finish_job(
            session, job_id, owner, status, result=_summary(result, trained.samples), adapter_key=key, analysis=_clean(analysis)
        )

    if not _retrying_write(res, job_id, "recording the result", finish) and not _committed_anyway(res, job_id, status, owner):
        logger.warning("job %s: lease lost before finishing; another worker owns it", job_id)
        _delete_quietly(job_id, key, res.storage.delete)  # this run's own name: nothing names it
        return "lost"
    _delete_other_adapters(res.storage, job_id, kept=key)
    logger.info("job %s %s after %d/%d steps", job_id, status, result.steps, result.total_steps)
    return status


def _stopped_early(job_id: str, owner: str, reason: str, res: Resources, reporter: Reporter) -> str:
    if reason == "lease_lost":
        logger.warning("job %s: lease lost; stopping without writing", job_id)
        return "lost"
    if reason == "cancel":
        _retrying_write(res, job_id, "recording the cancellation", lambda session: job_service.finish_job(session, job_id, owner, "cancelled"))
        return "cancelled"
    # Warm shutdown: back to queued, and a new message for the next worker, which resumes
    # from the checkpoint just written. (This worker takes no more messages; if the broker
    # hands it this one anyway, it goes back at the shutdown. If the send fails, the
    # reconciler enqueues the job later.)
    released = _retrying_write(res, job_id, "giving the job back", lambda session: job_service.release_job(session, job_id, owner))
    if not released and not _committed_anyway(res, job_id, "queued", None):
        logger.warning("job %s: lease lost while shutting down", job_id)
        return "lost"
    try:
        CeleryQueue(res.settings).enqueue_training(job_id)
    except Exception:
        logger.warning("job %s: could not enqueue it again; the reconciler will", job_id, exc_info=True)
    logger.info("job %s: worker shutting down; job returned to the queue", job_id)
    return "requeued"


def _fail(job_id: str, owner: str, exc: BaseException, res: Resources, reporter: Reporter) -> str:
    try:
        reporter.flush()
    except Exception:
        logger.warning("job %s: could not write the last metrics", job_id, exc_info=True)
    error, kind = describe_error(exc), failure_kind(exc)
    _retrying_write(
        res, job_id, "recording the failure", lambda session: job_service.finish_job(session, job_id, owner, "failed", error=error, error_kind=kind)
    )
    return "failed"


def _retrying(settings: Settings, job_id: str, what: str, write: Callable[[], T]) -> T:
    """``write()``, retried with backoff while the database is unavailable, for up to half a
    lease: longer, and a recovery may hand the job to another worker anyway."""
    deadline = time.monotonic() + settings.lease_seconds / 2
    delay = 0.5
    while True:
        try:
            return write()
        except TRANSIENT_DB_ERRORS as exc:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning("job %s: %s failed (%s); retrying in %.1f s", job_id, what, _first_line(exc), delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def _retrying_write(res: Resources, job_id: str, what: str, write: Callable[[Session], T]) -> T:
    """``write(session)`` in a transaction of its own, retried as `_retrying` does."""

    def attempt() -> T:
        with session_scope(res.sessions) as session:
            return write(session)

    return _retrying(res.settings, job_id, what, attempt)


def _committed_anyway(res: Resources, job_id: str, status: str, owner: str | None) -> bool:
    """After a retried write that matched no row: whether the job already is in ``status``
    under ``owner``, as when an earlier try committed and only its reply was lost with the
    connection (then the write did happen, and the lease was not lost)."""
    with res.sessions() as session:
        job = session.get(Job, job_id)
        return job is not None and job.status == status and job.lease_owner == owner


def _first_line(exc: BaseException) -> str:
    """A database error's first line: the rest is the statement and its parameters."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def pack_adapter(archive: Path, adapter_dir: Path, card: str) -> Path:
    """A `.tar.gz` of the adapter's own files in ``adapter_dir`` (``adapter_*``: its config and
    weights, not a checkpoint's optimizer state) and ``card`` as its README.md."""
    files = sorted(p for p in adapter_dir.iterdir() if p.is_file() and p.name.startswith("adapter_"))
    readme = card.encode()

    def readable(member: tarfile.TarInfo) -> tarfile.TarInfo:
        # Whoever unpacks it may read it (safetensors writes weights owner-only), and the
        # worker's user and group mean nothing on the user's machine.
        member.mode, member.uid, member.gid, member.uname, member.gname = 0o644, 0, 0, "", ""
        return member

    with tarfile.open(archive, "w:gz") as tar:
        for path in files:
            tar.add(path, arcname=path.name, filter=readable)
        info = tarfile.TarInfo("README.md")
        info.size, info.mtime, info.mode = len(readme), int(time.time()), 0o644
        tar.addfile(info, io.BytesIO(readme))
    return archive


METHOD_TITLES = {"mola": "MoLA", "lora": "LoRA"}


def model_card(
    job_id: str,
    spec: dict,
    state: str,
    scores: dict[str, Any] | None = None,
    data_stats: dict[str, Any] | None = None,
    analysis: dict[str, Any] | None = None,
) -> str:
    """The adapter's README.md; ``state`` says where the run was ("succeeded after 8 of 8
    steps", "checkpoint at step 4 of 8"); ``scores`` ("loss", EVAL_NOTED) are the latest at
    that point; ``analysis`` (a finished MoLA job's) adds the per-layer expert table."""
    hp = spec["hyperparameters"]
    lines = [
        f"# {METHOD_TITLES[spec['method']]} adapter for {spec['base_model']}",
        "",
        f"Trained by the mola fine-tuning service, job `{job_id}` ({state}).",
        "",
        *([f"- label: {spec['suffix']}"] if spec.get("suffix") else []),
        f"- base model: `{spec['base_model']}` ({spec['num_layers']} layers)",
        f"- method: {spec['method']}",
    ]
    if spec["method"] == "mola":
        from mola.allocation import describe_allocation

        lines += [
            f"- experts per layer: {spec['experts_per_layer']} ({describe_allocation(spec['experts_per_layer'])})",
            f"- top-k per layer: {spec['top_k_per_layer']}",
        ]
    lines += [
        f"- rank {hp['rank']}, alpha {hp['alpha']}, dropout {hp['dropout']}, targets {', '.join(hp['target_modules'])}",
        f"- dataset `{spec['dataset_id']}`, learning rate {hp['learning_rate']}, batch size {hp['batch_size']}, cutoff {hp['cutoff_len']}",
    ]
    train = (data_stats or {}).get("train")
    if train:
        lines.append(
            f"- trained on {train['examples']} of {train['records']} records ({train['trainable_tokens']} trainable tokens): "
            f"{train['over_cutoff']} cut at {train['cutoff_len']} tokens, {train['dropped_at_cutoff']} of them dropped (no completion token left)"
        )
    scores = scores or {}
    if scores.get("loss") is not None:
        lines.append(f"- training loss: {scores['loss']:.4f}")
    if scores.get("eval_loss") is not None:
        lines.append(f"- validation loss: {scores['eval_loss']:.4f}")
    if scores.get("eval_exact_match") is not None:
        answers = scores.get("eval_answer_accuracy")
        lines.append(
            f"- generated completions of validation rows: {scores['eval_exact_match']:.1%} exact"
            + (f", {answers:.1%} of the answers right (\"the answer is X\")" if answers is not None else "")
        )
    load = (
        ["from mola import load_mola_model", "", f'base, tokenizer = load_base_model("{spec["base_model"]}")', 'model = load_mola_model(base, "path/to/this/folder")']
        if spec["method"] == "mola"
        # A plain peft LoRA adapter: peft loads it (mola's loader reads MoLA adapters only).
        else ["from peft import PeftModel", "", f'base, tokenizer = load_base_model("{spec["base_model"]}")', 'model = PeftModel.from_pretrained(base, "path/to/this/folder")']
    )
    lines += card_section(analysis)
    lines += ["", "## Use", "", "```python", "from mola.models import load_base_model", *load, "```"]
    lines += [
        "",
        "Or try it from a shell (the downloaded .tar.gz works as well). A prompt is formatted as the training rows were "
        "(the adapter records how, in `adapter_prompt.json`; `--template alpaca|chat|raw` overrides it); "
        "`--data test.jsonl` generates for a file's rows and scores them against their references.",
        "",
        "```bash",
        'mola generate path/to/this/folder --prompt "your instruction"',
        "```",
    ]
    return "\n".join(lines) + "\n"
