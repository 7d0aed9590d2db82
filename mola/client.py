"""A small typed client for the mola fine-tuning service (httpx only: no torch, no server code).

    from mola.client import MolaClient

    with MolaClient("http://127.0.0.1:8000", api_key="mola_...") as client:
        dataset = client.upload_dataset("train.jsonl")
        job = client.create_job("tiny-llama", dataset.id, allocation="2468",
                                hyperparameters={"max_steps": 20})
        for event, data in client.events(job.id):
            ...
        client.download_adapter(job.id, "adapter/", extract=True)

`MOLA_URL` and `MOLA_API_KEY` are read when the arguments are left out.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import quote

import httpx

__all__ = [
    "MolaClient",
    "MolaAPIError",
    "BaseModelInfo",
    "Dataset",
    "Job",
    "JobProgress",
    "Metric",
    "Checkpoint",
    "JobAnalysis",
    "JobComparison",
    "WebhookDelivery",
    "Generation",
    "GenerationTimeout",
    "Page",
    "TERMINAL_STATUSES",
]

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})

# How `events` gets a dropped stream back: it reconnects (echoing the last event id) after a
# delay that doubles from the server's `retry:` (or FIRST_RETRY) up to MAX_RETRY, and gives up
# when the stream has made no progress for EVENTS_RECONNECT_SECONDS.
EVENTS_RECONNECT_SECONDS = 60.0
EVENTS_FIRST_RETRY_SECONDS = 0.5
EVENTS_MAX_RETRY_SECONDS = 10.0
# The server sends a keep-alive comment every 15 s on a quiet stream, so a minute of silence
# means a dead connection (a peer gone without closing it), not a quiet job.
EVENTS_READ_TIMEOUT_SECONDS = 60.0
# Answers a proxy or load balancer gives while the API restarts: worth reconnecting after.
TRANSIENT_STATUSES = frozenset({502, 503, 504})

T = TypeVar("T")


class MolaAPIError(Exception):
    """The server answered with an error: ``status_code`` and its ``detail``."""

    def __init__(self, status_code: int, detail: str, body: Any = None) -> None:
        super().__init__(f"{status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail
        self.body = body


def _with_scheme(url: str) -> str:
    """``host:port`` as ``http://host:port``: the form people type (and the README's default
    names), which httpx would take for a URL of the scheme ``host``."""
    return url if "://" in url else f"http://{url}"


def _segment(value: str) -> str:
    """An id (or a model name) as one segment of a path, escaped: a '/', '?', '#' or '..' in it
    cannot make a request reach another endpoint (`delete_job("job_1/../../datasets/ds_2")`
    sent DELETE /datasets/ds_2)."""
    text = str(value)
    if text in ("", ".", ".."):
        raise ValueError(f"not an id: {text!r}")
    return quote(text, safe="")


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def _build(cls: type[T], data: dict[str, Any]) -> T:
    """Dataclass from a JSON object, ignoring fields the server added later."""
    names = {f.name for f in fields(cls)} - {"raw"}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


def _from_json(cls: type[T], data: dict[str, Any], **parsed: Any) -> T:
    """A typed object of ``data`` (with ``parsed`` values in place of the JSON ones) that keeps
    ``data`` itself as ``raw``: the answer exactly as the server sent it."""
    obj = _build(cls, {**data, **parsed})
    obj.raw = data  # type: ignore[attr-defined]
    return obj


def _raw_field() -> Any:
    return field(default_factory=dict, repr=False, compare=False)


@dataclass
class BaseModelInfo:
    name: str
    model_type: str
    num_layers: int
    hidden_size: int
    target_modules: list[str]
    linear_modules: list[str]
    max_positions: int | None = None  # the limit of cutoff_len; None: unknown (or an older server)
    raw: dict[str, Any] = _raw_field()  # the JSON object as the server sent it

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "BaseModelInfo":
        return _from_json(cls, data)


@dataclass
class Dataset:
    id: str
    filename: str
    format: str | None
    rows: int
    size_bytes: int
    sha256: str
    created_at: datetime | None
    report: dict[str, Any] = field(default_factory=dict)
    token_stats: dict[str, Any] = field(default_factory=dict)
    # {status: pending|ready|failed, models: {name: {total_tokens, ...}}, error}: poll get_dataset
    token_counts: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = _raw_field()  # the JSON object as the server sent it

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Dataset":
        return _from_json(cls, data, created_at=_parse_time(data.get("created_at")))


@dataclass
class JobProgress:
    step: int
    total_steps: int | None
    epoch: float | None
    fraction: float | None
    eta_seconds: float | None


@dataclass
class QueuePlace:
    """Where a queued job or generation stands: its queue, the live ``workers`` consuming it
    (0: nothing runs it until one starts), the jobs and generations queued ``ahead`` of it (all
    tenants), and how many are ``running``."""

    name: str
    workers: int
    ahead: int
    running: int


@dataclass
class QueueState:
    """A queue of the service (GET /queues): what it ``carries`` ("jobs", "generations", "token
    counts"), its live ``workers``, what is ``waiting`` and ``running`` (None: not recorded)."""

    name: str
    carries: list[str]
    workers: int
    waiting: int
    running: int | None
    raw: dict[str, Any] = _raw_field()  # the JSON object as the server sent it

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "QueueState":
        return _from_json(cls, data)


def _place(data: dict[str, Any]) -> QueuePlace | None:
    return _build(QueuePlace, data["queue"]) if data.get("queue") else None


@dataclass
class Job:
    id: str
    status: str
    base_model: str
    method: str
    dataset_id: str
    validation_dataset_id: str | None
    allocation: list[int] | None
    top_k: list[int] | None
    allocation_spec: Any
    hyperparameters: dict[str, Any]
    suffix: str | None
    created_at: datetime | None
    updated_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    cancel_requested: bool
    progress: JobProgress
    error: str | None
    result: dict[str, Any] | None
    adapter_available: bool
    attempts: int = 0
    # What the run tokenized, once it has: {"train": {records, examples, over_cutoff,
    # dropped_at_cutoff, total_tokens, ...}, "validation": {...}}; None before (or an older server).
    data: dict[str, Any] | None = None
    # Trainable parameters of the adapter, counted when the job was created; None from an
    # older server or for a model the catalogue has no module shapes of.
    adapter_parameters: int | None = None
    # A failed job's cause, by what a resume can do about it ("out_of_memory", "data",
    # "hyperparameters", "evaluation", "diverged", "base_model", "server_limit", "abandoned", "internal");
    # None otherwise, or from an older server.
    error_kind: str | None = None
    # While queued, in the answers about this one job (get_job, create_job, resume_job): where
    # it stands. None otherwise, in lists, or from an older server.
    queue: QueuePlace | None = None
    webhook_url: str | None = None  # POSTed a signed event when the job ends
    raw: dict[str, Any] = _raw_field()  # the JSON object as the server sent it
    # `create_job` only: True when the server answered with the job an earlier request with the
    # same Idempotency-Key created (200, `Idempotent-Replayed: true`) instead of a new one.
    replayed: bool = field(default=False, compare=False)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Job":
        times = {k: _parse_time(data.get(k)) for k in ("created_at", "updated_at", "started_at", "finished_at")}
        return _from_json(cls, data, **times, progress=_build(JobProgress, data.get("progress") or {}), queue=_place(data))


@dataclass
class Metric:
    step: int
    kind: str
    created_at: datetime | None
    metrics: dict[str, Any]
    raw: dict[str, Any] = _raw_field()  # the JSON object as the server sent it

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Metric":
        return _from_json(cls, data, created_at=_parse_time(data.get("created_at")))


@dataclass
class Checkpoint:
    step: int
    created_at: datetime | None
    size_bytes: int
    metrics: dict[str, Any]
    best: bool = False  # the lowest eval_loss of the job's checkpoints
    raw: dict[str, Any] = _raw_field()  # the JSON object as the server sent it

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Checkpoint":
        return _from_json(cls, data, created_at=_parse_time(data.get("created_at")))


@dataclass
class WebhookDelivery:
    """One time a job ended, POSTed to its `webhook_url` (GET /jobs/{id}/webhooks). ``id`` is the
    `webhook-id` header, the same on every attempt; ``status``: pending, delivered or failed."""

    id: str
    event: str
    url: str
    status: str
    attempts: int
    next_attempt_at: datetime | None  # while pending
    response_status: int | None  # the receiver's answer to the last attempt
    last_error: str | None
    created_at: datetime | None
    delivered_at: datetime | None
    payload: dict[str, Any] = field(default_factory=dict)  # the event as it is sent
    raw: dict[str, Any] = _raw_field()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "WebhookDelivery":
        times = {name: _parse_time(data.get(name)) for name in ("next_attempt_at", "created_at", "delivered_at")}
        return _from_json(cls, data, **times)


@dataclass
class JobAnalysis:
    """How a finished MoLA job's adapter uses its experts (GET /jobs/{id}/analysis). ``layers``
    (one dict per decoder layer) and ``modules`` (by module path) hold ``num_experts``,
    ``top_k``, ``selection_share``, ``mean_weight``, ``mean_prob`` (lists over the experts),
    ``max_load``, ``min_load``, ``balance_loss`` and ``relative_distance``; ``status`` is
    ``failed`` (with ``error``) when the analysis could not be computed."""

    job_id: str
    status: str
    error: str | None = None
    split: str | None = None
    examples: int | None = None
    tokens: int | None = None
    layers: list[dict[str, Any]] = field(default_factory=list)
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    raw: dict[str, Any] = _raw_field()  # the JSON object as the server sent it

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "JobAnalysis":
        return _from_json(cls, data)


@dataclass
class JobComparison:
    """Jobs side by side (GET /jobs/compare). ``jobs`` (in the order asked) are dicts with
    ``id``, ``status``, ``method``, ``allocation``, ``top_k``, ``adapter_parameters``,
    ``hyperparameters`` (as the job ran), ``step``, ``total_steps``, ``seconds``, ``train`` (its
    last training metrics: ``lm_loss`` compares across methods), ``eval`` and ``best_eval``;
    ``differences`` the settings not the same in every job (``{"field", "values"}``);
    ``best_eval_loss`` the id of the job with the lowest ``eval_loss``, None where ``warnings``
    say their eval losses do not compare."""

    jobs: list[dict[str, Any]]
    differences: list[dict[str, Any]]
    best_eval_loss: str | None
    warnings: list[str]
    raw: dict[str, Any] = _raw_field()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "JobComparison":
        return _from_json(cls, data)


@dataclass
class Generation:
    """Completions of a finished job's adapter (POST /jobs/{id}/generations): ``status``
    queued, running, succeeded (``completions``: ``[{"prompt", "text", "row", "reference"}]``,
    one per prompt or dataset row, the prompt as the model saw it) or failed (``error``). A
    dataset's generation has ``scores``: ``{"n", "exact_match", "answers_expected",
    "answer_accuracy", "without_prompt", "loss", "loss_tokens"}`` (the loss as the job's
    evaluation measures it, comparable with its ``eval_loss``)."""

    id: str
    job_id: str
    status: str
    request: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    completions: list[dict[str, Any]] | None = None
    scores: dict[str, Any] | None = None
    progress: dict[str, int] | None = None  # {"done", "total"} prompts or rows, once running
    seconds: float | None = None
    error: str | None = None
    created_at: datetime | None = None
    queue: QueuePlace | None = None  # while queued (not in lists): where it stands
    raw: dict[str, Any] = _raw_field()  # the JSON object as the server sent it

    @property
    def done(self) -> bool:
        return self.status in ("succeeded", "failed")

    @property
    def texts(self) -> list[str]:
        """The generated texts, in the order of the prompts (empty until succeeded)."""
        return [c["text"] for c in self.completions or []]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Generation":
        return _from_json(cls, data, created_at=_parse_time(data.get("created_at")), queue=_place(data))


class GenerationTimeout(TimeoutError):
    """`MolaClient.generate` stopped waiting; ``generation`` is the last state it saw. The
    generation stays on the server: poll it, or delete it to cancel it."""

    def __init__(self, generation: Generation, timeout: float) -> None:
        super().__init__(f"generation {generation.id} is still {generation.status} after {timeout} s")
        self.generation = generation


class Page(list):  # type: ignore[type-arg]
    """A list of results plus where the next page starts (``cursor``: the last id or step) and
    ``raw``, the whole answer as the server sent it (``{"data": [...], "has_more": ..., ...}``)."""

    def __init__(self, items: list, has_more: bool = False, cursor: Any = None, raw: dict[str, Any] | None = None) -> None:
        super().__init__(items)
        self.has_more = has_more
        self.cursor = cursor
        self.raw = raw if raw is not None else {}

    @classmethod
    def of(cls, body: dict[str, Any], parse: Any, cursor_key: str | None = None) -> "Page":
        """The page of a list answer, each item of ``body["data"]`` made by ``parse``."""
        items = [parse(item) for item in body["data"]]
        return cls(items, body.get("has_more", False), body.get(cursor_key) if cursor_key else None, body)


class _EventStream:
    """What `MolaClient.events` remembers across connections: the last event id to resume after,
    the server's `retry:` delay, when the stream last made progress, and what it already yielded
    (a server that cannot resume exactly replays, and the replay is skipped)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.last_id: str | None = None  # opaque: echoed back in Last-Event-ID, never parsed
        self.retry_seconds: float | None = None
        self.progress_at = time.monotonic()
        self.connected = False  # once: later failures are drops to reconnect after
        self.failures = 0  # since the last progress
        self.job_state: tuple | None = None
        self.metric_step = -1
        self.metric_kinds: set[str] = set()

    def dispatch(self, lines: Iterable[str]) -> Iterator[tuple[str, str]]:
        """The (event, data) blocks of an SSE stream; records `id:` (when its event is complete),
        `retry:` and keep-alive comments as they come."""
        event, data, pending_id = "", [], self.last_id
        for line in lines:
            if not line:
                self.last_id = pending_id
                if data:
                    yield event or "message", "\n".join(data)
                event, data = "", []
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "":  # a comment: the server's keep-alive on a quiet stream
                self.made_progress()
            elif name == "event":
                event = value
            elif name == "data":
                data.append(value)
            elif name == "id" and "\0" not in value:
                pending_id = value
            elif name == "retry" and value.isascii() and value.isdigit():
                self.retry_seconds = int(value) / 1000

    def accept(self, event: str, data: str) -> tuple[str, Any] | None:
        """The typed event to yield, or None for one already yielded before a reconnection."""
        try:
            payload = json.loads(data)
        except json.JSONDecodeError:
            raise MolaAPIError(0, f"the event stream of job {self.job_id} sent a {event} event that is not JSON: {data[:200]!r}") from None
        if event == "job":
            job = Job.from_json(payload)
            state = (job.status, job.progress.step, job.cancel_requested, job.progress.total_steps)
            if state == self.job_state:  # the snapshot a reconnection starts with, unchanged
                return None
            self.job_state = state
            item: tuple[str, Any] = (event, job)
        elif event == "metric":
            metric = Metric.from_json(payload)
            if metric.step < self.metric_step or (metric.step == self.metric_step and metric.kind in self.metric_kinds):
                return None
            if metric.step > self.metric_step:
                self.metric_step, self.metric_kinds = metric.step, set()
            self.metric_kinds.add(metric.kind)
            item = (event, metric)
        else:
            item = (event, payload)
        self.made_progress()
        return item

    def made_progress(self) -> None:
        self.progress_at = time.monotonic()
        self.failures = 0

    def reconnect_delay(self, budget: float) -> float | None:
        """Seconds to wait before the next connection after a failure, or None to give up: the
        first failure after progress always gets another try."""
        self.failures += 1
        if budget <= 0:
            return None
        base = self.retry_seconds if self.retry_seconds is not None else EVENTS_FIRST_RETRY_SECONDS
        delay = min(base * 2 ** (self.failures - 1), max(base, EVENTS_MAX_RETRY_SECONDS))
        if self.failures == 1:
            return delay
        remaining = budget - (time.monotonic() - self.progress_at)
        return min(delay, remaining) if remaining > 0 else None


class MolaClient:
    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        http: httpx.Client | None = None,
    ) -> None:
        """``base_url`` (or `MOLA_URL`): ``http://host:port``; a bare ``host:port`` means http.
        ``http``: an `httpx.Client` to send requests with (a test client, a proxy set-up);
        its base URL is used and the API key header is added to it."""
        self.api_key = api_key or os.environ.get("MOLA_API_KEY")
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        if http is not None:
            http.headers.update(headers)
            self._http = http
            self.base_url = str(http.base_url).rstrip("/")
        else:
            self.base_url = _with_scheme((base_url or os.environ.get("MOLA_URL") or DEFAULT_URL).strip().rstrip("/"))
            self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "MolaClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- plumbing ------------------------------------------------------------------------
    def _unreachable(self, exc: Exception) -> MolaAPIError:
        return MolaAPIError(0, f"cannot reach {self.base_url}: {exc or type(exc).__name__}")

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except (httpx.TransportError, httpx.InvalidURL) as exc:
            raise self._unreachable(exc) from exc
        self._raise_for(response)
        return response

    @contextmanager
    def _stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """A streamed answer, past its status check; a connection lost while reading it is a
        `MolaAPIError` (0) too, one that says the answer broke off (the server was reached)."""
        answered = False
        try:
            with self._http.stream(method, path, **kwargs) as response:
                if not response.is_success:
                    response.read()
                    self._raise_for(response)
                answered = True
                yield response
        except (httpx.TransportError, httpx.InvalidURL) as exc:
            if answered:
                raise MolaAPIError(0, f"the answer of {self.base_url}{path} broke off: {exc or type(exc).__name__}") from exc
            raise self._unreachable(exc) from exc

    @staticmethod
    def _raise_for(response: httpx.Response) -> None:
        if response.is_success:
            return
        try:
            body = response.json()
            detail = body.get("detail", response.text) if isinstance(body, dict) else response.text
        except (ValueError, json.JSONDecodeError):
            body, detail = None, response.text or response.reason_phrase
        raise MolaAPIError(response.status_code, str(detail), body)

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    # ---- service -------------------------------------------------------------------------
    def health(self) -> bool:
        return self._json("GET", "/healthz").get("status") == "ok"

    def list_models(self) -> Page:
        return Page.of(self._json("GET", "/models"), BaseModelInfo.from_json)

    def get_model(self, name: str) -> BaseModelInfo:
        return BaseModelInfo.from_json(self._json("GET", f"/models/{_segment(name)}"))

    def queues(self) -> list[QueueState]:
        """The service's queues, their live workers and what waits and runs on them."""
        return [QueueState.from_json(q) for q in self._json("GET", "/queues")["data"]]

    # ---- datasets ------------------------------------------------------------------------
    def upload_dataset(self, path: str | os.PathLike) -> Dataset:
        """Upload a JSONL file. A file with errors raises `MolaAPIError` (422) whose ``body``
        holds the report with the first errors and their line numbers."""
        path = Path(path)
        with path.open("rb") as stream:
            data = self._json("POST", "/datasets", files={"file": (path.name, stream, "application/jsonl")})
        return Dataset.from_json(data)

    def list_datasets(self, limit: int = 20, after: str | None = None) -> Page:
        params = {"limit": limit, **({"after": after} if after else {})}
        return Page.of(self._json("GET", "/datasets", params=params), Dataset.from_json, "last_id")

    def get_dataset(self, dataset_id: str) -> Dataset:
        return Dataset.from_json(self._json("GET", f"/datasets/{_segment(dataset_id)}"))

    def delete_dataset(self, dataset_id: str) -> dict[str, Any]:
        """Delete a dataset; returns the server's answer (``{"id": ..., "deleted": true}``)."""
        return self._json("DELETE", f"/datasets/{_segment(dataset_id)}")

    # ---- jobs ----------------------------------------------------------------------------
    def create_job(
        self,
        base_model: str,
        dataset_id: str,
        method: str = "mola",
        allocation: Any = None,
        top_k: int | list[int] | None = None,
        hyperparameters: dict[str, Any] | None = None,
        validation_dataset_id: str | None = None,
        suffix: str | None = None,
        idempotency_key: str | None = None,
        webhook_url: str | None = None,
    ) -> Job:
        """Create a job (the API's 201). With ``idempotency_key``, a retry of the same request
        returns the job the first one created, with ``replayed`` True. ``webhook_url`` gets a
        signed POST when the job ends (`mola.webhooks.verify` checks it)."""
        body = _job_body(base_model, dataset_id, method, allocation, top_k, hyperparameters, validation_dataset_id, suffix, webhook_url)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        response = self._request("POST", "/jobs", json=body, headers=headers)
        job = Job.from_json(response.json())
        job.replayed = response.headers.get("Idempotent-Replayed") == "true"
        return job

    def plan_job(
        self,
        base_model: str,
        dataset_id: str,
        method: str = "mola",
        allocation: Any = None,
        top_k: int | list[int] | None = None,
        hyperparameters: dict[str, Any] | None = None,
        validation_dataset_id: str | None = None,
        suffix: str | None = None,
        webhook_url: str | None = None,
    ) -> dict[str, Any]:
        """What `create_job` with the same arguments would create and run, creating nothing
        (`POST /jobs/plan`): ``allocation``, ``top_k``, ``hyperparameters`` (defaults filled in),
        ``adapter_parameters``, ``data`` (per split: rows, examples, ``exact``), ``schedule``
        (``total_steps``, ``steps_per_epoch``, ``warmup_steps``, ...) and ``warnings``. A request
        the server would refuse raises `MolaAPIError` as `create_job` would."""
        body = _job_body(base_model, dataset_id, method, allocation, top_k, hyperparameters, validation_dataset_id, suffix, webhook_url)
        return self._json("POST", "/jobs/plan", json=body)

    def list_jobs(
        self,
        status: str | None = None,
        limit: int = 20,
        after: str | None = None,
        dataset_id: str | None = None,
        base_model: str | None = None,
        method: str | None = None,
    ) -> Page:
        """Your jobs, newest first, narrowed by the filters given (``dataset_id``: the jobs
        training on it)."""
        params: dict[str, Any] = {"limit": limit}
        filters = {"status": status, "after": after, "dataset_id": dataset_id, "base_model": base_model, "method": method}
        params.update({name: value for name, value in filters.items() if value})
        return Page.of(self._json("GET", "/jobs", params=params), Job.from_json, "last_id")

    def get_job(self, job_id: str) -> Job:
        return Job.from_json(self._json("GET", f"/jobs/{_segment(job_id)}"))

    def cancel_job(self, job_id: str) -> Job:
        return Job.from_json(self._json("POST", f"/jobs/{_segment(job_id)}/cancel"))

    def resume_job(self, job_id: str, hyperparameters: dict[str, Any] | None = None) -> Job:
        """Queue a failed or cancelled job again, to continue from its newest checkpoint.
        ``hyperparameters`` may change how the steps run, not what they train (the server names
        what it accepts): ``{"micro_batch_size": 1}`` after running out of memory, say."""
        body = {"hyperparameters": hyperparameters} if hyperparameters else None
        return Job.from_json(self._json("POST", f"/jobs/{_segment(job_id)}/resume", json=body))

    def delete_job(self, job_id: str) -> None:
        """Delete a finished job with its metrics, checkpoints and adapter (the server answers
        409 for a queued or running job: cancel it first)."""
        self._request("DELETE", f"/jobs/{_segment(job_id)}")

    def metrics(self, job_id: str, after_step: int = 0, limit: int = 100, kind: str | None = None) -> Page:
        params: dict[str, Any] = {"after_step": after_step, "limit": limit}
        if kind:
            params["kind"] = kind
        return Page.of(self._json("GET", f"/jobs/{_segment(job_id)}/metrics", params=params), Metric.from_json, "last_step")

    def all_metrics(self, job_id: str, kind: str | None = None, after_step: int = 0) -> list[Metric]:
        """Every metric of the job after ``after_step``, all pages."""
        out: list[Metric] = []
        after = after_step
        while True:
            page = self.metrics(job_id, after_step=after, limit=1000, kind=kind)
            out.extend(page)
            if not page.has_more or page.cursor is None:
                return out
            after = page.cursor

    def checkpoints(self, job_id: str) -> Page:
        return Page.of(self._json("GET", f"/jobs/{_segment(job_id)}/checkpoints"), Checkpoint.from_json)

    def webhook_secret(self, rotate: bool = False) -> str:
        """The secret that signs your webhooks (``rotate``: a new one, signing all from now on)."""
        if rotate:
            return self._json("POST", "/webhooks/secret/rotate")["secret"]
        return self._json("GET", "/webhooks/secret")["secret"]

    def test_webhook(self, url: str) -> dict[str, Any]:
        """POST a signed `ping` to ``url`` from the server now: ``{"id", "url", "delivered",
        "response_status", "error"}`` (a URL no job could use raises `MolaAPIError` 422)."""
        return self._json("POST", "/webhooks/test", json={"url": url})

    def webhook_deliveries(self, job_id: str) -> Page:
        """The job's webhook deliveries (`WebhookDelivery`), oldest first."""
        return Page.of(self._json("GET", f"/jobs/{_segment(job_id)}/webhooks"), WebhookDelivery.from_json)

    def analysis(self, job_id: str) -> JobAnalysis:
        """A finished MoLA job's expert analysis: `MolaAPIError` 409 while it runs, 404 (the
        detail says why) for a LoRA job or one without an adapter."""
        return JobAnalysis.from_json(self._json("GET", f"/jobs/{_segment(job_id)}/analysis"))

    def compare_jobs(self, job_ids: Sequence[str]) -> JobComparison:
        """2 to 20 of your jobs side by side: what each trained, its losses, speed and time, the
        settings that differ, and where their losses do not compare."""
        if isinstance(job_ids, str):  # joined letter by letter otherwise
            raise TypeError("compare_jobs takes a list of job ids, not one string")
        return JobComparison.from_json(self._json("GET", "/jobs/compare", params={"ids": ",".join(job_ids)}))

    def generate(
        self,
        job_id: str,
        prompts: list[str] | None = None,
        template: str | None = None,
        input: str | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        wait: bool = True,
        timeout: float | None = None,
        poll: float = 1.0,
        *,
        dataset_id: str | None = None,
        rows: int | None = None,
        step: int | None = None,
    ) -> Generation:
        """Have the job's adapter complete ``prompts`` on the server (each dressed as the
        training rows were, unless ``template``), or instead the first ``rows`` rows (default
        all, at most 1000) of the uploaded dataset ``dataset_id``, scored against their own
        completions (``Generation.scores``); ``step``: a checkpoint's adapter instead of the
        final one. With ``wait``, polls until it is done (or ``timeout`` seconds pass:
        `GenerationTimeout`, a `TimeoutError`). It runs on a training worker between jobs
        (unless the server gives generations workers of their own)."""
        body: dict[str, Any] = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
        if prompts is not None:
            body["prompts"] = list(prompts)
        optional = {"template": template, "input": input, "seed": seed, "dataset_id": dataset_id, "rows": rows, "step": step}
        body.update({k: v for k, v in optional.items() if v is not None})
        generation = Generation.from_json(self._json("POST", f"/jobs/{_segment(job_id)}/generations", json=body))
        return self.wait_for_generation(job_id, generation, timeout, poll) if wait else generation

    def wait_for_generation(
        self,
        job_id: str,
        generation: Generation,
        timeout: float | None = None,
        poll: float = 1.0,
        on_update: Callable[[Generation], None] | None = None,
    ) -> Generation:
        """Poll ``generation`` (one `generate` returned with ``wait=False``) until it is done, or
        raise `GenerationTimeout` once ``timeout`` seconds pass (it stays queued or running).
        ``on_update`` gets each state polled before the last (its ``status``, ``progress``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not generation.done:
            if deadline is not None and time.monotonic() > deadline:
                raise GenerationTimeout(generation, timeout)
            time.sleep(poll)
            generation = self.get_generation(job_id, generation.id)
            if on_update is not None and not generation.done:
                on_update(generation)
        return generation

    def get_generation(self, job_id: str, generation_id: str) -> Generation:
        return Generation.from_json(self._json("GET", f"/jobs/{_segment(job_id)}/generations/{_segment(generation_id)}"))

    def delete_generation(self, job_id: str, generation_id: str) -> None:
        """Delete a generation: a queued one is never run; a running one's completions are
        dropped when they come; a finished one's are gone."""
        self._request("DELETE", f"/jobs/{_segment(job_id)}/generations/{_segment(generation_id)}")

    def generations(self, job_id: str, limit: int = 20, after: str | None = None) -> Page:
        params = {"limit": limit, **({"after": after} if after else {})}
        return Page.of(self._json("GET", f"/jobs/{_segment(job_id)}/generations", params=params), Generation.from_json, "last_id")

    def events(
        self, job_id: str, after_step: int = 0, timeout: float | None = None, reconnect_seconds: float | None = None
    ) -> Iterator[tuple[str, Any]]:
        """Follow a job over Server-Sent Events: yields ``("job", Job)`` whenever its state
        changes, ``("metric", Metric)`` and finally ``("end", {"status", "error"})``.

        A stream that breaks off before its end (a restarting server, a dropped connection) is
        resumed: it reconnects with the last event id as ``Last-Event-ID``, waiting longer after
        each failure, and skips what a resumed stream repeats. After ``reconnect_seconds``
        (default `EVENTS_RECONNECT_SECONDS`) without progress it raises `MolaAPIError` (0). The
        first connection is not retried: an unreachable server or a 404 raise at once."""
        budget = EVENTS_RECONNECT_SECONDS if reconnect_seconds is None else reconnect_seconds
        stream = _EventStream(job_id)
        while True:
            try:
                with closing(self._event_connection(stream, after_step, timeout)) as blocks:
                    for event, data in blocks:
                        item = stream.accept(event, data)
                        if item is not None:
                            yield item
                        if event == "end":
                            return
                reason = "the server closed the stream before the job ended"
            except _Dropped as dropped:
                reason = str(dropped)
            delay = stream.reconnect_delay(budget)
            if delay is None:
                raise MolaAPIError(
                    0, f"lost the event stream of job {job_id} ({reason}); gave up reconnecting after {budget:g} s without progress"
                )
            time.sleep(delay)

    def _event_connection(self, stream: _EventStream, after_step: int, timeout: float | None) -> Iterator[tuple[str, str]]:
        """One connection's (event, data) blocks. Once a first connection has worked, losing one
        or a gateway's 502/503/504 raise `_Dropped` (to reconnect after); other errors raise
        `MolaAPIError`."""
        headers = {"Last-Event-ID": stream.last_id} if stream.last_id is not None else {}
        limits = httpx.Timeout(timeout or 60.0, read=EVENTS_READ_TIMEOUT_SECONDS)
        try:
            with self._http.stream(
                "GET", f"/jobs/{_segment(stream.job_id)}/events", params={"after_step": after_step}, headers=headers, timeout=limits
            ) as response:
                if not response.is_success:
                    response.read()
                    if stream.connected and response.status_code in TRANSIENT_STATUSES:
                        raise _Dropped(f"the server answered {response.status_code}")
                    self._raise_for(response)
                stream.connected = True
                yield from stream.dispatch(response.iter_lines())
        except (httpx.TransportError, httpx.InvalidURL) as exc:
            if not stream.connected:
                raise self._unreachable(exc) from exc
            raise _Dropped(str(exc) or type(exc).__name__) from exc

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 1.0) -> Job:
        """Poll until the job reaches a final status (or ``timeout`` seconds pass)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if job.done:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout} s")
            time.sleep(poll)

    @staticmethod
    def _adapter_path(job_id: str, step: int | None) -> str:
        """The final adapter, or with ``step`` the one saved with that checkpoint."""
        return f"/jobs/{_segment(job_id)}/adapter" if step is None else f"/jobs/{_segment(job_id)}/checkpoints/{int(step)}/adapter"

    def write_adapter(self, job_id: str, out: BinaryIO, step: int | None = None) -> int:
        """Write the adapter archive (.tar.gz) to the binary stream ``out``; returns its size.
        ``step``: the adapter of that checkpoint (`checkpoints`) instead of the final one."""
        size = 0
        with self._stream("GET", self._adapter_path(job_id, step), follow_redirects=True) as response:
            for chunk in response.iter_bytes():
                out.write(chunk)
                size += len(chunk)
        return size

    def download_adapter(self, job_id: str, dest: str | os.PathLike, extract: bool = False, step: int | None = None) -> Path:
        """Save the adapter archive to ``dest`` (a file, or a folder to put it in: one that
        exists, or a path ending in a slash); with ``extract``, unpack it into the folder
        ``dest`` instead and return that folder, ready for `mola.load_mola_model` (or
        `peft.PeftModel.from_pretrained` for a ``lora`` job). ``step``: the adapter saved with
        that checkpoint (see `checkpoints`: pick the step with the best ``eval_loss``) instead
        of the final one."""
        folder = str(dest).endswith(("/", os.sep))  # Path() drops the slash that says so
        dest = Path(dest)
        name = f"{job_id}-adapter.tar.gz" if step is None else f"{job_id}-step{int(step)}-adapter.tar.gz"
        archive = dest / name if extract or folder or dest.is_dir() else dest
        # The bytes go to a file of their own next to the archive, which takes its name only
        # once the whole answer has come: a download that breaks off leaves no half archive,
        # and an earlier archive at `dest` stays as it was.
        part = archive.with_name(f".{archive.name}.{secrets.token_hex(4)}.part")
        made: Path | None = None  # the outermost folder this download made, if any
        try:
            with self._stream("GET", self._adapter_path(job_id, step), follow_redirects=True) as response:
                made = _make_folder(archive.parent)
                with part.open("xb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
            if not extract:
                os.replace(part, archive)
                return archive
            try:
                _extract(part, dest)
            except tarfile.TarError as exc:
                raise MolaAPIError(0, f"the adapter archive of job {job_id} could not be unpacked: {exc}") from exc
            return dest
        except BaseException:
            if made is not None:  # a failed download leaves no folder behind that it made
                shutil.rmtree(made, ignore_errors=True)
            raise
        finally:
            part.unlink(missing_ok=True)


def _job_body(
    base_model: str,
    dataset_id: str,
    method: str,
    allocation: Any,
    top_k: Any,
    hyperparameters: dict[str, Any] | None,
    validation_dataset_id: str | None,
    suffix: str | None,
    webhook_url: str | None = None,
) -> dict[str, Any]:
    """The body of `POST /jobs` (and `/jobs/plan`): what was not given is left to the server."""
    body: dict[str, Any] = {"base_model": base_model, "dataset_id": dataset_id, "method": method}
    optional = {
        "allocation": allocation,
        "top_k": top_k,
        "hyperparameters": hyperparameters,
        "validation_dataset_id": validation_dataset_id,
        "suffix": suffix,
        "webhook_url": webhook_url,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    return body


def _make_folder(folder: Path) -> Path | None:
    """Make ``folder`` and its missing parents; returns the outermost folder made (None: it was
    there)."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing[-1] if missing else None


def _extract(archive: Path, dest: Path) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        try:
            tar.extractall(dest, filter="data")
        except TypeError:  # Python without extraction filters: check the names ourselves
            if any(m.name.startswith(("/", "..")) or ".." in Path(m.name).parts or not m.isfile() for m in tar.getmembers()):
                raise MolaAPIError(0, "the adapter archive holds unexpected paths") from None
            tar.extractall(dest)


class _Dropped(Exception):
    """An event stream broke off after it had worked: `MolaClient.events` reconnects."""
