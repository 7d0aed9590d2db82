"""The production backends together, in-process: the API on PostgreSQL with Redis as the broker
and SeaweedFS as the S3 store; the worker's real run of a job on the tiny LLaMA uploads its
checkpoints and adapter to the bucket, and the adapter download redirects to a presigned URL
that really serves the archive. `GET /readyz` against the real servers and wrong URLs."""

from __future__ import annotations

import io
import json
import tarfile
import time

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from api.main import create_app
from service import catalogue, security
from service.db import migrate, session_scope
from service.models import Job
from service.settings import Settings
from tests.servers import pg_url, redis_url, s3_bucket, s3_server, unique_name  # noqa: F401 (fixtures)
from tests.service.conftest import TINY_LLAMA, auth, jsonl

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(tmp_path, pg_url, redis_url, s3_server, s3_bucket) -> Settings:
    env = s3_server.settings_env(s3_bucket)
    return Settings(
        mode="production",
        data_dir=tmp_path / "data",
        database_url=pg_url,
        broker_url=redis_url,
        queue=unique_name("mola.train.test"),
        embedded_worker=False,
        s3_prefix=unique_name("stack"),
        models=["tiny-llama"],
        metrics_flush_seconds=0.2,
        cancel_poll_seconds=0.0,
        **{k.removeprefix("MOLA_").lower(): v for k, v in env.items()},
    )


@pytest.fixture
def broker(settings: Settings):
    """The Redis connection; the test's queue and its kombu bookkeeping keys removed after."""
    client = redis.Redis.from_url(settings.broker_url)
    yield client
    for key in client.scan_iter(f"*{settings.queue}*"):
        client.delete(key)
    client.close()


@pytest.fixture
def api(settings: Settings):
    migrate(settings)
    app = create_app(settings)
    with session_scope(app.state.sessionmaker) as session:
        catalogue.upsert(session, "tiny-llama", TINY_LLAMA)
        _, token = security.create_api_key(session, "acme")
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, token
    app.state.engine.dispose()


def test_a_job_on_postgres_redis_and_s3(api, settings: Settings, broker, tmp_path) -> None:
    runner = pytest.importorskip("worker.runner")
    client, token = api
    rows = [{"prompt": f"Say the number {i}: ", "completion": f"{i}, and {i + 1} after it."} for i in range(24)]
    response = client.post("/datasets", headers=auth(token), files={"file": ("train.jsonl", jsonl(rows), "application/jsonl")})
    assert response.status_code == 201, response.text
    dataset_id = response.json()["id"]
    storage = client.app.state.storage
    assert storage.list("datasets") and storage.exists(storage.list("datasets")[0])

    body = {
        "base_model": "tiny-llama",
        "dataset_id": dataset_id,
        "allocation": "2222",
        "hyperparameters": {"max_steps": 4, "checkpoint_every": 2, "batch_size": 2, "micro_batch_size": 2, "cutoff_len": 64},
    }
    response = client.post("/jobs", headers={**auth(token), "Idempotency-Key": "k1"}, json=body)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]

    # The message waits on the named queue in Redis: the task's name and the job id, nothing else.
    assert broker.llen(settings.queue) == 1
    message = json.loads(broker.lindex(settings.queue, 0))
    assert message["headers"]["task"] == "mola.train_job" and message["headers"]["argsrepr"] == repr([job_id])

    # The worker's run, in-process: dataset from S3, checkpoints and adapter to S3.
    assert runner.run_job(job_id, settings) == "succeeded"
    job = client.get(f"/jobs/{job_id}", headers=auth(token)).json()
    assert job["status"] == "succeeded" and job["progress"]["step"] == 4
    stored = storage.list(f"jobs/{job_id}")
    assert any(k.startswith(f"jobs/{job_id}/checkpoints/") and "/checkpoint-4/" in k for k in stored), stored
    # The expert analysis, through PostgreSQL's JSONB.
    analysis = client.get(f"/jobs/{job_id}/analysis", headers=auth(token)).json()
    assert (analysis["status"], analysis["split"], analysis["examples"]) == ("ready", "train", 24)
    assert [row["num_experts"] for row in analysis["layers"]] == [2, 2, 2, 2] and len(analysis["modules"]) == 28

    response = client.get(f"/jobs/{job_id}/adapter", headers=auth(token), follow_redirects=False)
    assert response.status_code == 307
    url = response.headers["location"]
    assert url.startswith(f"{settings.s3_endpoint_url}/{settings.s3_bucket}/{storage.prefix}jobs/{job_id}/") and "X-Amz-Signature=" in url
    download = httpx.get(url)  # no API key: the signature is the permission
    assert download.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(download.content)) as tar:
        assert sorted(tar.getnames()) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "adapter_prompt.json"]

    # The same download streamed through the API.
    streaming = create_app(settings.model_copy(update={"download_mode": "stream"}))
    try:
        with TestClient(streaming) as other:
            response = other.get(f"/jobs/{job_id}/adapter", headers=auth(token), follow_redirects=False)
            assert response.status_code == 200 and response.content == download.content
            assert f'filename="{job_id}-adapter.tar.gz"' in response.headers["content-disposition"]
    finally:
        streaming.state.engine.dispose()

    # An object gone from the bucket is the API's 404, not a redirect to the store's error.
    with client.app.state.sessionmaker() as session:
        storage.delete(session.get(Job, job_id).adapter_key)
    response = client.get(f"/jobs/{job_id}/adapter", headers=auth(token), follow_redirects=False)
    assert response.status_code == 404 and "missing from storage" in response.json()["detail"]


def test_readyz_against_the_real_servers(api) -> None:
    client, _ = api
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok", "storage": "ok"}, "failed": []}


WRONG = {
    "database": {"database_url": "postgresql+psycopg://postgres@127.0.0.1:1/nope"},
    "broker": {"broker_url": "redis://127.0.0.1:1/0"},
    "storage": {"s3_endpoint_url": "http://127.0.0.1:1"},
    "bucket": {"s3_bucket": "mola-no-such-bucket"},
}


@pytest.mark.parametrize("wrong", WRONG, ids=str)
def test_readyz_names_the_backend_that_fails(settings: Settings, wrong: str) -> None:
    migrate(settings)
    app = create_app(settings.model_copy(update={**WRONG[wrong], "ready_timeout_seconds": 1.0}))
    try:
        with TestClient(app) as client:
            started = time.monotonic()
            response = client.get("/readyz")
            elapsed = time.monotonic() - started
    finally:
        app.state.engine.dispose()
    failed = "storage" if wrong == "bucket" else wrong
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable" and body["failed"] == [failed], body
    assert all(v == "ok" for k, v in body["checks"].items() if k != failed)
    assert elapsed < 3.0


def test_readyz_times_out_on_a_server_that_never_answers(settings: Settings) -> None:
    """A port that accepts connections and says nothing (a hung backend) costs the timeout."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        migrate(settings)
        app = create_app(settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{port}/0", "ready_timeout_seconds": 0.5}))
        try:
            with TestClient(app) as client:
                started = time.monotonic()
                response = client.get("/readyz")
                elapsed = time.monotonic() - started
        finally:
            app.state.engine.dispose()
    assert response.status_code == 503 and response.json()["failed"] == ["broker"]
    assert elapsed < 2.0
