"""The commands the containers run (docker-compose.yml), as processes on the real servers:
`mola migrate`, `mola models sync`, `python -m service.readiness` (the worker's health check)
and `mola serve --no-worker` in production mode on PostgreSQL, Redis and S3. The client then
trains through it (the worker's run in-process) and downloads the adapter through the presigned
redirect, its API key not following it to the store."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis

from mola.client import MolaClient
from service.settings import Settings
from tests.servers import pg_url, redis_url, s3_bucket, s3_server, unique_name  # noqa: F401 (fixtures)
from tests.service.conftest import jsonl

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
ROWS = [{"prompt": f"Say the number {i}: ", "completion": f"{i}, and {i + 1} after it."} for i in range(24)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def env(tmp_path, pg_url, redis_url, s3_server, s3_bucket) -> dict[str, str]:
    values = {
        "MOLA_MODE": "production",
        "MOLA_DATA_DIR": str(tmp_path / "data"),
        "MOLA_DATABASE_URL": pg_url,
        "MOLA_BROKER_URL": redis_url,
        "MOLA_QUEUE": unique_name("mola.train.test"),
        "MOLA_EMBEDDED_WORKER": "false",
        "MOLA_MODELS": "tiny-llama",
        "MOLA_HOST": "127.0.0.1",
        "MOLA_PORT": str(_free_port()),
        "MOLA_S3_PREFIX": unique_name("entry"),
        "MOLA_METRICS_FLUSH_SECONDS": "0.2",
        **s3_server.settings_env(s3_bucket),
    }
    yield values
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"*{values['MOLA_QUEUE']}*"):
        client.delete(key)
    client.close()


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MOLA_")} | env
    return subprocess.run([sys.executable, *args], cwd=env["MOLA_DATA_DIR"], env=full, capture_output=True, text=True, timeout=120)


def _settings(env: dict[str, str]) -> Settings:
    return Settings(_env_file=None, **{k.removeprefix("MOLA_").lower(): v for k, v in env.items()})


def test_container_commands_in_production_mode(env, tmp_path) -> None:
    Path(env["MOLA_DATA_DIR"]).mkdir(parents=True)
    migrate = _run(env, "-m", "service.cli", "migrate")
    assert migrate.returncode == 0, migrate.stderr
    sync = _run(env, "-m", "service.cli", "models", "sync")
    assert sync.returncode == 0 and "synced tiny-llama" in sync.stdout, sync.stderr
    health = _run(env, "-m", "service.readiness")
    assert health.returncode == 0 and json.loads(health.stdout) == {"database": "ok", "broker": "ok", "storage": "ok"}, health.stdout
    broken = _run({**env, "MOLA_BROKER_URL": "redis://127.0.0.1:1/0"}, "-m", "service.readiness")
    assert broken.returncode == 1 and json.loads(broken.stdout)["broker"] != "ok"

    full = {k: v for k, v in os.environ.items() if not k.startswith("MOLA_")} | env
    server = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--no-worker"],
        cwd=env["MOLA_DATA_DIR"], env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(server.stdout), daemon=True).start()
    url = f"http://127.0.0.1:{env['MOLA_PORT']}"
    try:
        key = None
        deadline = time.monotonic() + 90
        while key is None or not _answers(url):
            assert server.poll() is None and time.monotonic() < deadline, "".join(lines[-50:])
            key = key or next((m.group(0) for line in list(lines) if (m := re.search(r"mola_[0-9a-f]{12}_[A-Za-z0-9_-]+", line))), None)
            time.sleep(0.2)
        ready = httpx.get(f"{url}/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text

        with MolaClient(url, key) as client:
            (tmp_path / "numbers.jsonl").write_bytes(jsonl(ROWS))
            dataset = client.upload_dataset(tmp_path / "numbers.jsonl")
            hp = {"max_steps": 2, "batch_size": 2, "micro_batch_size": 2, "cutoff_len": 64}
            job = client.create_job("tiny-llama", dataset.id, allocation="2222", hyperparameters=hp)
            runner = pytest.importorskip("worker.runner")
            assert runner.run_job(job.id, _settings(env)) == "succeeded"
            redirect = httpx.get(f"{url}/jobs/{job.id}/adapter", headers={"Authorization": f"Bearer {key}"})
            assert redirect.status_code == 307 and redirect.headers["location"].startswith(env["MOLA_S3_ENDPOINT_URL"])
            folder = client.download_adapter(job.id, tmp_path / "adapter", extract=True)
            assert (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_config.json").is_file()
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
