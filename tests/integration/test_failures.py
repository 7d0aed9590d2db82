"""Jobs survive failures: real PostgreSQL, a Redis server of this run, the API and `mola worker`
processes (tests/integration/cluster.py), driven over HTTP and checked in the database, the
stored artifacts and the metrics. Every scenario trains tiny-llama for a few dozen steps.

Timing: leases last 4 s (a heartbeat every second), each worker reconciles every second, and a
queued job unclaimed for 3 s counts as lost when the broker holds fewer messages than queued
jobs. Waits poll the database; no sleep stands in for a synchronisation.
"""

from __future__ import annotations

import signal
import tarfile
import threading
import time
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import select, update

from service.models import Dataset, Job, utcnow
from service.queue import CeleryQueue
from tests.integration.cluster import LEASE_SECONDS, Cluster, wait_for
from tests.service.conftest import jsonl

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

ROWS = [{"prompt": f"Say the number {i}: ", "completion": f"{i}, and {i + 1} after it."} for i in range(24)]
# Steps of ~50-100 ms on one CPU thread: long enough to interrupt at a chosen point.
HP = {"batch_size": 8, "micro_batch_size": 8, "cutoff_len": 64}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Cluster:
    cluster = Cluster(tmp_path_factory.mktemp("failures"))
    try:
        cluster.start_api()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(autouse=True)
def _clean(cluster):
    yield
    cluster.reset()


@pytest.fixture(scope="module")
def dataset_id(cluster) -> str:
    with cluster.http() as http:
        response = http.post("/datasets", files={"file": ("numbers.jsonl", jsonl(ROWS), "application/jsonl")})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def create_job(cluster: Cluster, dataset_id: str, max_steps: int, checkpoint_every: int | None = None, key: str | None = None) -> str:
    hp = {**HP, "max_steps": max_steps}
    if checkpoint_every:
        hp["checkpoint_every"] = checkpoint_every
    headers = {"Idempotency-Key": key} if key else {}
    with cluster.http() as http:
        response = http.post("/jobs", json={"base_model": "tiny-llama", "dataset_id": dataset_id, "allocation": "2468", "hyperparameters": hp}, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def train_steps(cluster: Cluster, job_id: str) -> list[int]:
    return [m.step for m in cluster.metrics(job_id)]


def assert_artifacts(cluster: Cluster, job_id: str) -> None:
    """Every checkpoint row points at a stored checkpoint; the adapter archive is complete."""
    for checkpoint in cluster.checkpoints(job_id):
        folder = cluster.storage_dir / checkpoint.storage_prefix
        assert folder.is_dir() and any(folder.iterdir()), checkpoint.storage_prefix
    job = cluster.job(job_id)
    with tarfile.open(cluster.storage_dir / job.adapter_key) as tar:
        assert sorted(tar.getnames()) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "adapter_prompt.json"]


def test_sigkill_mid_training_resumes_from_the_last_checkpoint(cluster, dataset_id):
    workers = [cluster.start_worker(), cluster.start_worker()]
    job_id = create_job(cluster, dataset_id, max_steps=60, checkpoint_every=10)

    def past_a_checkpoint() -> bool:  # a checkpoint, and metrics of later steps already written
        checkpoints, steps = cluster.checkpoints(job_id), train_steps(cluster, job_id)
        return bool(checkpoints and steps and steps[-1] > checkpoints[-1].step)

    wait_for(past_a_checkpoint, 120, "a checkpoint and later metrics", cluster.logs_text, poll=0.02)
    victim = cluster.worker_of(cluster.job(job_id).lease_owner)
    victim.signal(signal.SIGKILL)
    killed_at = time.time()
    victim.wait(10)
    resumed_from = cluster.checkpoints(job_id)[-1].step
    dead_run_steps = train_steps(cluster, job_id)
    assert dead_run_steps == list(range(1, dead_run_steps[-1] + 1)) and dead_run_steps[-1] > resumed_from
    assert cluster.job(job_id).status == "running"  # until its lease runs out

    job = cluster.wait_final(job_id, timeout=120)
    assert job.status == "succeeded", cluster.logs_text()
    assert job.attempts == 2 and job.step == job.total_steps == job.result["steps"] == 60
    survivor = next(w for w in workers if w is not victim)
    assert cluster.worker_of(job.lease_owner) is survivor
    # Recovered within a lease and a few reconciliations, not the 5-minute default.
    assert job.finished_at.timestamp() - killed_at < LEASE_SECONDS + 60

    rows = cluster.metrics(job_id)
    assert [r.step for r in rows] == list(range(1, 61))  # none missing, none twice
    # Steps up to the checkpoint are the dead run's; the later ones it wrote were replaced.
    assert all(r.values["time"] < killed_at for r in rows if r.step <= resumed_from)
    assert all(r.values["time"] > killed_at for r in rows if r.step > resumed_from)
    assert [c.step for c in cluster.checkpoints(job_id)] == [50, 60]  # the newest MOLA_KEEP_CHECKPOINTS
    assert_artifacts(cluster, job_id)

    # The resume is exact: an uninterrupted run of the same job has the same losses.
    reference = create_job(cluster, dataset_id, max_steps=60, checkpoint_every=10)
    assert cluster.wait_final(reference).status == "succeeded"
    expected = [r.values["loss"] for r in cluster.metrics(reference)]
    assert [r.values["loss"] for r in rows] == pytest.approx(expected, rel=1e-4)


def test_sigterm_checkpoints_requeues_and_another_worker_resumes(cluster, dataset_id):
    first = cluster.start_worker()
    job_id = create_job(cluster, dataset_id, max_steps=60)
    cluster.wait_job(job_id, lambda j: j.step >= 5, "step 5")
    first.signal(signal.SIGTERM)  # Celery's warm shutdown
    asked_at = time.time()
    assert first.wait(60) == 0, first.log()

    job = cluster.job(job_id)
    assert job.status == "queued" and job.lease_owner is None and job.attempts == 0, first.log()
    stopped_at = job.step
    assert [c.step for c in cluster.checkpoints(job_id)] == [stopped_at]
    assert train_steps(cluster, job_id) == list(range(1, stopped_at + 1))
    assert sum(m.values["time"] > asked_at for m in cluster.metrics(job_id)) <= 1  # at the next step
    assert cluster.redis.job_ids_waiting(cluster.queue) == [job_id]  # enqueued again

    second = cluster.start_worker()
    job = cluster.wait_final(job_id)
    assert job.status == "succeeded" and job.attempts == 1 and job.result["steps"] == 60, cluster.logs_text()
    assert cluster.worker_of(job.lease_owner) is second
    assert train_steps(cluster, job_id) == list(range(1, 61))
    assert [c.step for c in cluster.checkpoints(job_id)] == [stopped_at, 60]
    resumed_from = next(c.storage_prefix for c in cluster.checkpoints(job_id) if c.step == stopped_at)
    assert resumed_from.endswith(f"/checkpoint-{stopped_at}") and f"resuming from {resumed_from}" in second.log(tail=10**6)
    assert_artifacts(cluster, job_id)


def test_redis_restart_loses_no_queued_job(cluster, dataset_id):
    worker = cluster.start_worker()
    running = create_job(cluster, dataset_id, max_steps=100)
    cluster.wait_job(running, lambda j: j.step >= 1, "training")
    queued = [create_job(cluster, dataset_id, max_steps=3) for _ in range(2)]
    wait_for(lambda: sorted(cluster.redis.job_ids_waiting(cluster.queue)) == sorted(queued), 10, "two waiting messages")

    cluster.redis.restart()  # no persistence: both messages are gone
    assert cluster.redis.job_ids_waiting(cluster.queue) == []
    assert cluster.job(running).status == "running"

    for job_id in [running, *queued]:
        job = cluster.wait_final(job_id)
        assert job.status == "succeeded" and job.attempts == 1, cluster.logs_text()
    assert train_steps(cluster, running) == list(range(1, 101))
    for job_id in queued:
        assert train_steps(cluster, job_id) == [1, 2, 3]
        assert_artifacts(cluster, job_id)
    assert "enqueuing" in worker.log(tail=10**6)  # by the reconciler


def test_a_job_delivered_twice_trains_once(cluster, dataset_id):
    workers = [cluster.start_worker(), cluster.start_worker()]
    job_id = create_job(cluster, dataset_id, max_steps=30)
    CeleryQueue(cluster.settings).enqueue_training(job_id)  # a duplicate delivery, to the idle worker

    def both_received() -> bool:
        return all(f"job {job_id}" in w.log(tail=10**6) for w in workers)

    wait_for(both_received, 60, "both workers to receive the job", cluster.logs_text)
    job = cluster.wait_final(job_id)
    assert job.status == "succeeded" and job.attempts == 1, cluster.logs_text()
    assert train_steps(cluster, job_id) == list(range(1, 31))
    owner = cluster.worker_of(job.lease_owner)
    other = next(w for w in workers if w is not owner)
    assert f"job {job_id}: running as" in owner.log(tail=10**6)
    assert f"job {job_id}: running as" not in other.log(tail=10**6)
    assert "not queued: nothing to do" in other.log(tail=10**6)


def test_expired_leases_are_requeued_until_the_last_attempt(cluster, dataset_id):
    resumable, exhausted = (create_job(cluster, dataset_id, max_steps=3) for _ in range(2))
    cluster.redis.client().flushdb()  # no message either: only the reconciler can find them
    expired = {"status": "running", "lease_owner": "gone-host:1:dead", "lease_expires_at": utcnow() - timedelta(seconds=5)}
    with cluster.session() as session:
        session.execute(update(Job).where(Job.id == resumable).values(**expired, attempts=1))
        session.execute(update(Job).where(Job.id == exhausted).values(**expired, attempts=3))
        session.commit()

    cluster.start_worker()
    job = cluster.wait_final(resumable)
    assert job.status == "succeeded" and job.attempts == 2 and train_steps(cluster, resumable) == [1, 2, 3], cluster.logs_text()
    job = cluster.wait_final(exhausted)
    assert job.status == "failed" and job.attempts == 3 and train_steps(cluster, exhausted) == []
    assert "stopped without finishing it 3 time(s) (MOLA_MAX_ATTEMPTS=3)" in job.error and job.error_kind == "abandoned"

    # Resumed (POST /jobs/{id}/resume), it has a fresh budget of attempts and trains to its end.
    with cluster.http() as http:
        response = http.post(f"/jobs/{exhausted}/resume")
    assert response.status_code == 200 and (response.json()["status"], response.json()["attempts"]) == ("queued", 0), response.text
    job = cluster.wait_final(exhausted)
    assert (job.status, job.attempts, job.error) == ("succeeded", 1, None) and train_steps(cluster, exhausted) == [1, 2, 3], cluster.logs_text()
    assert_artifacts(cluster, exhausted)


def test_cancel_reaches_a_running_job_within_one_step(cluster, dataset_id):
    cluster.start_worker()
    job_id = create_job(cluster, dataset_id, max_steps=300)
    cluster.wait_job(job_id, lambda j: j.step >= 3, "step 3")
    with cluster.http() as http:
        response = http.post(f"/jobs/{job_id}/cancel")
    answered = time.time()  # the request is committed: every check from now on sees it
    assert response.status_code == 200 and response.json()["cancel_requested"]
    job = cluster.wait_final(job_id, timeout=60)
    assert job.status == "cancelled", cluster.logs_text()
    steps = train_steps(cluster, job_id)
    assert steps == list(range(1, job.result["steps"] + 1)) and job.result["steps"] < 300
    # Only the step in progress when the request landed ends after it.
    assert sum(m.values["time"] > answered for m in cluster.metrics(job_id)) <= 1
    assert cluster.checkpoints(job_id)[-1].step == job.result["steps"]  # it keeps what it trained
    assert_artifacts(cluster, job_id)


def test_api_restarts_under_load_lose_no_job_or_upload(cluster):
    """Four clients upload datasets and create jobs (each with its Idempotency-Key, retried
    until answered) while the API is killed (SIGKILL) and later stopped (SIGTERM) and
    restarted. No worker runs: every job must be in the database once, queued, with a message."""
    keys = [f"load-{c}-{i}" for c in range(4) for i in range(5)]
    created: dict[str, str] = {}
    uploaded: list[str] = []
    done = threading.Event()
    errors: list[BaseException] = []

    def retry(call):
        deadline = time.monotonic() + 120
        while True:
            try:
                response = call()
                if response.status_code < 500:
                    return response
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the API did not come back"
            time.sleep(0.1)

    def client(c: int) -> None:
        try:
            with cluster.http(timeout=5) as http:
                for key in keys[c * 5 : c * 5 + 5]:
                    files = {"file": (f"{key}.jsonl", jsonl(ROWS), "application/jsonl")}
                    response = retry(lambda: http.post("/datasets", files=files))
                    assert response.status_code == 201, response.text
                    uploaded.append(response.json()["id"])
                    body = {"base_model": "tiny-llama", "dataset_id": uploaded[-1], "hyperparameters": {**HP, "max_steps": 2}}
                    response = retry(lambda: http.post("/jobs", json=body, headers={"Idempotency-Key": key}))
                    assert response.status_code in (200, 201), response.text
                    created[key] = response.json()["id"]
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(created) >= 4 or errors, 60, "the first jobs")
    cluster.api.signal(signal.SIGKILL)
    cluster.api.wait(10)
    cluster.start_api()
    wait_for(lambda: len(created) >= 12 or errors or not any(t.is_alive() for t in threads), 60, "more jobs")
    cluster.api.signal(signal.SIGTERM)
    cluster.api.wait(30)
    cluster.start_api()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert sorted(created) == sorted(keys)

    with cluster.session() as session:
        rows = session.execute(select(Job.idempotency_key, Job.id, Job.status).where(Job.idempotency_key.in_(keys))).all()
        assert sorted((k, i) for k, i, _ in rows) == sorted(created.items())  # one job per key, the one answered
        assert {s for _, _, s in rows} == {"queued"}
        datasets = session.execute(select(Dataset.id, Dataset.storage_key, Dataset.size_bytes).where(Dataset.id.in_(uploaded))).all()
    assert len(datasets) == len(uploaded) == len(keys)
    for _, storage_key, size in datasets:
        assert (cluster.storage_dir / storage_key).stat().st_size == size
    waiting = set(cluster.redis.job_ids_waiting(cluster.queue))
    assert set(created.values()) <= waiting  # a job committed just before a crash was enqueued at the restart

    with cluster.http() as http:  # a retry after the answer was received: the same job
        key = keys[0]
        body = {"base_model": "tiny-llama", "dataset_id": cluster.job(created[key]).dataset_id, "hyperparameters": {**HP, "max_steps": 2}}
        response = http.post("/jobs", json=body, headers={"Idempotency-Key": key})
    assert response.status_code == 200 and response.json()["id"] == created[key]
    assert response.headers["Idempotent-Replayed"] == "true"
