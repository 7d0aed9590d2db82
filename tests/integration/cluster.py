"""A deployment of the service made of real processes, for the failure tests: a PostgreSQL
database of its own (created, migrated with Alembic, dropped at the end), a Redis server of its
own (started here without persistence, so that a restart forgets every message), a storage
folder, the API (`mola serve --no-worker`) and any number of `mola worker` processes, each in
its own process group with its own scratch folder, as on separate machines.

`Cluster.close` kills every process it started and drops the database, whatever state a test
left them in. Settings are short (leases of a few seconds, a reconciler every second) so that
failures are recovered within seconds; see `Cluster.env`.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = os.environ.get("MOLA_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
LEASE_SECONDS = 4.0
START_SECONDS = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout: float, what: str, log: Callable[[], str] = lambda: "", poll: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something true; fail with ``what`` and ``log()``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{log()}")
        time.sleep(poll)


class Process:
    """A child process in its own process group, its output in a log file."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid

    def log(self, tail: int = 6000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"---- {self.name} (pid {self.pid}) ----\n{text[-tail:]}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL to the whole group (Celery or uvicorn children included)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


class RedisServer:
    """`redis-server` on a free port, without persistence: a restart forgets every message."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_dir = log_dir
        self.process: Process | None = None
        self.restarts = 0
        self.start()

    def start(self) -> None:
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = Process(f"redis-{self.restarts}", cmd, dict(os.environ), self.log_dir)
        wait_for(self._ping, 20, "redis-server", self.process.log)

    def restart(self) -> None:
        self.process.kill()
        self.restarts += 1
        self.start()

    def client(self):
        import redis

        return redis.Redis(port=self.port, socket_connect_timeout=2)

    def _ping(self) -> bool:
        import redis

        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def job_ids_waiting(self, queue: str) -> list[str]:
        """The job ids of the messages waiting in ``queue`` (kombu's Redis layout: a list per
        queue, JSON envelopes with a base64 body ``[args, kwargs, embed]``)."""
        ids = []
        for raw in self.client().lrange(queue, 0, -1):
            envelope = json.loads(raw)
            args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
            ids.append(args[0])
        return ids

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()


class PostgresDatabase:
    """A database of this run on the local server, migrated to head; dropped by `close`."""

    def __init__(self) -> None:
        import psycopg

        self.name = f"mola_failures_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'CREATE DATABASE "{self.name}"')
        self.url = PG_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://", 1).rsplit("/", 1)[0] + f"/{self.name}"

    def close(self) -> None:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


class Cluster:
    def __init__(self, root: Path) -> None:
        from service import catalogue, security
        from service.db import make_engine, make_sessionmaker, migrate, session_scope
        from service.settings import Settings
        from tests.service.conftest import TINY_LLAMA

        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True)
        self.processes: list[Process] = []
        self.workers: list[Process] = []
        self.api: Process | None = None
        self.db: PostgresDatabase | None = None
        self.redis: RedisServer | None = None
        self.engine = None
        try:
            self.db = PostgresDatabase()
            self.redis = RedisServer(self.logs)
            self.queue = f"mola.failures.{uuid.uuid4().hex[:8]}"
            self.storage_dir = root / "artifacts"
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self.settings = Settings(**{k.removeprefix("MOLA_").lower(): v for k, v in self.env(root / "test").items() if k.startswith("MOLA_")})
            migrate(self.settings)
            self.engine = make_engine(self.settings)
            self.sessions = make_sessionmaker(self.engine)
            with session_scope(self.sessions) as session:
                catalogue.upsert(session, "tiny-llama", TINY_LLAMA)
                _, self.key = security.create_api_key(session, "failures")
        except BaseException:
            self.close()
            raise

    def env(self, data_dir: Path, **overrides: str) -> dict[str, str]:
        """The environment of every process: production mode on the servers of this run."""
        return {
            **os.environ,
            "MOLA_MODE": "production",
            "MOLA_EMBEDDED_WORKER": "false",
            "MOLA_DATA_DIR": str(data_dir),
            "MOLA_DATABASE_URL": self.db.url,
            "MOLA_BROKER_URL": self.redis.url,
            "MOLA_QUEUE": self.queue,
            "MOLA_STORAGE": "local",
            "MOLA_STORAGE_DIR": str(self.storage_dir),
            "MOLA_MODELS": "tiny-llama",
            "MOLA_HOST": "127.0.0.1",
            "MOLA_PORT": str(self.port),
            "MOLA_DEVICE": "cpu",
            "MOLA_LEASE_SECONDS": str(LEASE_SECONDS),
            "MOLA_RECONCILE_SECONDS": "1",
            "MOLA_REQUEUE_AFTER_SECONDS": "3",
            "MOLA_MAX_ATTEMPTS": "3",
            "MOLA_METRICS_FLUSH_SECONDS": "0.2",
            "MOLA_CANCEL_POLL_SECONDS": "0",
            "MOLA_LOG_LEVEL": "INFO",
            "OMP_NUM_THREADS": "1",  # two trainers and the API share two cores
            "PYTHONUNBUFFERED": "1",
            **overrides,
        }

    # ---- processes ---------------------------------------------------------------------------
    def start_api(self) -> Process:
        name = f"api-{sum(p.name.startswith('api') for p in self.processes)}"
        cmd = [sys.executable, "-m", "service.cli", "serve", "--no-worker"]
        self.api = self._start(name, cmd, self.env(self.root / name))
        wait_for(self._api_ready, START_SECONDS, "the API", self.api.log)
        return self.api

    def _api_ready(self) -> bool:
        assert self.api.alive(), self.api.log()
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def start_worker(self, wait: bool = True) -> Process:
        name = f"worker-{len(self.workers)}"
        worker = self._start(name, [sys.executable, "-m", "service.cli", "worker"], self.env(self.root / name))
        self.workers.append(worker)
        if wait:
            self.wait_worker_ready(worker)
        return worker

    def wait_worker_ready(self, worker: Process) -> None:
        def ready() -> bool:
            assert worker.alive(), worker.log()
            return "reconciler started" in worker.log_path.read_text(errors="replace")

        wait_for(ready, START_SECONDS, f"{worker.name} to be ready", worker.log)

    def _start(self, name: str, cmd: list[str], env: dict[str, str]) -> Process:
        process = Process(name, cmd, env, self.logs)
        self.processes.append(process)
        return process

    def worker_of(self, owner: str | None) -> Process | None:
        """The worker process that holds a lease (`host:pid:token`)."""
        pid = int(owner.split(":")[1]) if owner else None
        return next((w for w in self.workers if w.pid == pid), None)

    def logs_text(self) -> str:
        return "\n".join(p.log() for p in self.processes)

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.kill()
        self.workers = []

    def reset(self) -> None:
        """Between tests: no worker, no message, no job left to run."""
        from service.models import Job

        self.stop_workers()
        with self.sessions() as session:
            session.execute(update(Job).where(Job.status.in_(("queued", "running"))).values(status="cancelled", lease_expires_at=None))
            session.commit()
        self.redis.client().flushdb()

    def close(self) -> None:
        for process in self.processes:
            process.kill()
        if self.engine is not None:
            self.engine.dispose()
        if self.redis is not None:
            self.redis.close()
        if self.db is not None:
            self.db.close()

    # ---- the API and the database ------------------------------------------------------------
    def http(self, timeout: float = 10) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=timeout)

    def session(self) -> Session:
        return self.sessions()

    def job(self, job_id: str):
        from service.models import Job

        with self.sessions() as session:
            return session.get(Job, job_id)

    def metrics(self, job_id: str, kind: str = "train") -> list:
        from service.models import JobMetric

        with self.sessions() as session:
            return list(session.scalars(select(JobMetric).where(JobMetric.job_id == job_id, JobMetric.kind == kind).order_by(JobMetric.step, JobMetric.id)))

    def checkpoints(self, job_id: str) -> list:
        from service.models import Checkpoint

        with self.sessions() as session:
            return list(session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)))

    def wait_job(self, job_id: str, condition: Callable[[Any], bool], what: str, timeout: float = 120) -> Any:
        def check():
            job = self.job(job_id)
            return job if condition(job) else None

        return wait_for(check, timeout, f"job {job_id}: {what}", self.logs_text)

    def wait_final(self, job_id: str, timeout: float = 180) -> Any:
        return self.wait_job(job_id, lambda j: j.status in ("succeeded", "failed", "cancelled"), "a final status", timeout)
