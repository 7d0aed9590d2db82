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
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

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
    "Page",
    "TERMINAL_STATUSES",
]

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})

T = TypeVar("T")


class MolaAPIError(Exception):
    """The server answered with an error: ``status_code`` and its ``detail``."""

    def __init__(self, status_code: int, detail: str, body: Any = None) -> None:
        super().__init__(f"{status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail
        self.body = body


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def _build(cls: type[T], data: dict[str, Any]) -> T:
    """Dataclass from a JSON object, ignoring fields the server added later."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class BaseModelInfo:
    name: str
    model_type: str
    num_layers: int
    hidden_size: int
    target_modules: list[str]
    linear_modules: list[str]
    max_positions: int | None = None  # the limit of cutoff_len; None: unknown (or an older server)


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

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Dataset":
        return _build(cls, {**data, "created_at": _parse_time(data.get("created_at"))})


@dataclass
class JobProgress:
    step: int
    total_steps: int | None
    epoch: float | None
    fraction: float | None
    eta_seconds: float | None


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

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Job":
        times = {k: _parse_time(data.get(k)) for k in ("created_at", "updated_at", "started_at", "finished_at")}
        return _build(cls, {**data, **times, "progress": _build(JobProgress, data.get("progress") or {})})


@dataclass
class Metric:
    step: int
    kind: str
    created_at: datetime | None
    metrics: dict[str, Any]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Metric":
        return _build(cls, {**data, "created_at": _parse_time(data.get("created_at"))})


@dataclass
class Checkpoint:
    step: int
    created_at: datetime | None
    size_bytes: int
    metrics: dict[str, Any]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Checkpoint":
        return _build(cls, {**data, "created_at": _parse_time(data.get("created_at"))})


class Page(list):  # type: ignore[type-arg]
    """A list of results plus where the next page starts (``cursor``: the last id or step)."""

    def __init__(self, items: list, has_more: bool = False, cursor: Any = None) -> None:
        super().__init__(items)
        self.has_more = has_more
        self.cursor = cursor


class MolaClient:
    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        http: httpx.Client | None = None,
    ) -> None:
        """``http``: an `httpx.Client` to send requests with (a test client, a proxy set-up);
        its base URL is used and the API key header is added to it."""
        self.api_key = api_key or os.environ.get("MOLA_API_KEY")
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        if http is not None:
            http.headers.update(headers)
            self._http = http
            self.base_url = str(http.base_url).rstrip("/")
        else:
            self.base_url = (base_url or os.environ.get("MOLA_URL") or DEFAULT_URL).rstrip("/")
            self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "MolaClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- plumbing ------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise MolaAPIError(0, f"cannot reach {self.base_url}: {exc}") from exc
        self._raise_for(response)
        return response

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

    def list_models(self) -> list[BaseModelInfo]:
        return [_build(BaseModelInfo, m) for m in self._json("GET", "/models")["data"]]

    def get_model(self, name: str) -> BaseModelInfo:
        return _build(BaseModelInfo, self._json("GET", f"/models/{name}"))

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
        data = self._json("GET", "/datasets", params=params)
        return Page([Dataset.from_json(d) for d in data["data"]], data["has_more"], data.get("last_id"))

    def get_dataset(self, dataset_id: str) -> Dataset:
        return Dataset.from_json(self._json("GET", f"/datasets/{dataset_id}"))

    def delete_dataset(self, dataset_id: str) -> None:
        self._request("DELETE", f"/datasets/{dataset_id}")

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
    ) -> Job:
        body: dict[str, Any] = {"base_model": base_model, "dataset_id": dataset_id, "method": method}
        optional = {
            "allocation": allocation,
            "top_k": top_k,
            "hyperparameters": hyperparameters,
            "validation_dataset_id": validation_dataset_id,
            "suffix": suffix,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return Job.from_json(self._json("POST", "/jobs", json=body, headers=headers))

    def list_jobs(self, status: str | None = None, limit: int = 20, after: str | None = None) -> Page:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if after:
            params["after"] = after
        data = self._json("GET", "/jobs", params=params)
        return Page([Job.from_json(j) for j in data["data"]], data["has_more"], data.get("last_id"))

    def get_job(self, job_id: str) -> Job:
        return Job.from_json(self._json("GET", f"/jobs/{job_id}"))

    def cancel_job(self, job_id: str) -> Job:
        return Job.from_json(self._json("POST", f"/jobs/{job_id}/cancel"))

    def metrics(self, job_id: str, after_step: int = 0, limit: int = 100, kind: str | None = None) -> Page:
        params: dict[str, Any] = {"after_step": after_step, "limit": limit}
        if kind:
            params["kind"] = kind
        data = self._json("GET", f"/jobs/{job_id}/metrics", params=params)
        return Page([Metric.from_json(m) for m in data["data"]], data["has_more"], data.get("last_step"))

    def all_metrics(self, job_id: str, kind: str | None = None) -> list[Metric]:
        out: list[Metric] = []
        after = 0
        while True:
            page = self.metrics(job_id, after_step=after, limit=1000, kind=kind)
            out.extend(page)
            if not page.has_more or page.cursor is None:
                return out
            after = page.cursor

    def checkpoints(self, job_id: str) -> list[Checkpoint]:
        return [Checkpoint.from_json(c) for c in self._json("GET", f"/jobs/{job_id}/checkpoints")["data"]]

    def events(self, job_id: str, after_step: int = 0, timeout: float | None = None) -> Iterator[tuple[str, Any]]:
        """Follow a job over Server-Sent Events: yields ``("job", Job)``, ``("metric", Metric)``
        and finally ``("end", {"status", "error"})``."""
        with self._http.stream(
            "GET", f"/jobs/{job_id}/events", params={"after_step": after_step}, timeout=httpx.Timeout(timeout or 60.0, read=None)
        ) as response:
            if not response.is_success:
                response.read()
                self._raise_for(response)
            event, data = "message", []
            for line in response.iter_lines():
                if not line:
                    if data:
                        payload = json.loads("\n".join(data))
                        if event == "job":
                            yield event, Job.from_json(payload)
                        elif event == "metric":
                            yield event, Metric.from_json(payload)
                        else:
                            yield event, payload
                        if event == "end":
                            return
                    event, data = "message", []
                elif line.startswith(":"):
                    continue
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip())

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

    def download_adapter(self, job_id: str, dest: str | os.PathLike, extract: bool = False) -> Path:
        """Save the adapter archive to ``dest`` (a file, or a folder to put it in); with
        ``extract``, unpack it into the folder ``dest`` instead and return that folder, ready for
        `mola.load_mola_model`."""
        dest = Path(dest)
        with self._http.stream("GET", f"/jobs/{job_id}/adapter", follow_redirects=True) as response:
            if not response.is_success:
                response.read()
                self._raise_for(response)
            if extract or dest.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                archive = dest / f"{job_id}-adapter.tar.gz"
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                archive = dest
            with archive.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
        if not extract:
            return archive
        with tarfile.open(archive, "r:gz") as tar:
            try:
                tar.extractall(dest, filter="data")
            except TypeError:  # Python without extraction filters: check the names ourselves
                if any(m.name.startswith(("/", "..")) or ".." in Path(m.name).parts or not m.isfile() for m in tar.getmembers()):
                    raise MolaAPIError(0, "the adapter archive holds unexpected paths") from None
                tar.extractall(dest)
        archive.unlink()
        return dest
