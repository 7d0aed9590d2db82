"""POST /jobs/{id}/resume, at the API: which jobs may resume, what the body may change, and what
the job looks like once queued again. The worker's side (a resumed run that finishes, and
finishes as an uninterrupted one would) is in test_runner.py."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from service import jobs as job_service
from service.db import session_scope
from service.models import Checkpoint, Job, JobMetric
from tests.service.conftest import auth, job_body, make_dataset


def _job(client, key, **overrides) -> str:
    response = client.post("/jobs", headers=auth(key), json=job_body(make_dataset(client, key), **overrides))
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _stopped(sessions, storage, job_id: str, status: str, step: int = 6, checkpoints: tuple[int, ...] = (2, 4, 6)) -> str:
    """The job as a run that stopped at ``step`` leaves it: metrics for each step, checkpoint rows,
    an error or a result, its adapter in storage (cancelled), its analysis. Returns the adapter's key."""
    adapter = f"jobs/{job_id}/adapter-run1.tar.gz"
    archive = storage.root / "upload.tmp"
    archive.write_bytes(b"adapter")
    storage.put_file(adapter, archive)
    archive.unlink()
    now = job_service.utcnow()
    with session_scope(sessions) as session:
        job = session.get(Job, job_id)
        job.status, job.step, job.total_steps, job.finished_at, job.attempts = status, step, 8, now, 3
        job.started_at, job.lease_owner = now, "worker-1"
        if status == "failed":
            job.error = "CUDA out of memory. Tried to allocate 2.00 GiB"
        else:
            job.cancel_requested_at, job.adapter_key = now, adapter
            job.result, job.analysis = {"steps": step, "stopped_early": True}, {"status": "ready", "layers": []}
        for s in range(1, step + 1):
            session.add(JobMetric(job_id=job_id, step=s, kind="train", values={"loss": 1.0 / s}))
        for s in checkpoints:
            session.add(Checkpoint(job_id=job_id, step=s, storage_prefix=f"jobs/{job_id}/checkpoints/run1/checkpoint-{s}", size_bytes=1))
    return adapter


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_a_stopped_job_is_queued_again_from_its_newest_checkpoint(client, key, queue, sessions, storage, status):
    job_id = _job(client, key)
    _stopped(sessions, storage, job_id, status, step=7)
    queue.enqueued.clear()

    response = client.post(f"/jobs/{job_id}/resume", headers=auth(key))
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "queued" and job["progress"]["step"] == 6 and job["attempts"] == 0
    assert (job["error"], job["result"], job["finished_at"], job["cancel_requested"], job["adapter_available"]) == (None, None, None, False, False)
    assert job["started_at"] is not None  # the job's first start stays
    assert queue.enqueued == [job_id]
    # Step 7 came from the stopped run after its last checkpoint: the resumed run writes it again.
    assert [m["step"] for m in client.get(f"/jobs/{job_id}/metrics", headers=auth(key)).json()["data"]] == [1, 2, 3, 4, 5, 6]
    assert [c["step"] for c in client.get(f"/jobs/{job_id}/checkpoints", headers=auth(key)).json()["data"]] == [2, 4, 6]
    with sessions() as session:
        row = session.get(Job, job_id)
        assert (row.lease_owner, row.analysis) == (None, None)


def test_a_cancelled_runs_adapter_is_deleted_when_its_checkpoint_holds_it(client, key, sessions, storage):
    job_id = _job(client, key)
    adapter = _stopped(sessions, storage, job_id, "cancelled", step=6, checkpoints=(3, 6))
    assert client.post(f"/jobs/{job_id}/resume", headers=auth(key)).status_code == 200
    assert not storage.exists(adapter)


def test_a_stopped_runs_adapter_without_a_checkpoint_of_its_step_is_kept(client, key, sessions, storage):
    # The checkpoint at the stop was never recorded: the adapter is the only copy of steps 5-6.
    job_id = _job(client, key)
    adapter = _stopped(sessions, storage, job_id, "cancelled", step=6, checkpoints=(2, 4))
    job = client.post(f"/jobs/{job_id}/resume", headers=auth(key)).json()
    assert job["progress"]["step"] == 4 and not job["adapter_available"]
    assert storage.exists(adapter)


def test_without_a_checkpoint_the_job_starts_over(client, key, sessions, storage):
    job_id = _job(client, key)
    _stopped(sessions, storage, job_id, "failed", step=3, checkpoints=())
    job = client.post(f"/jobs/{job_id}/resume", headers=auth(key), json={}).json()
    assert job["status"] == "queued" and job["progress"]["step"] == 0
    assert client.get(f"/jobs/{job_id}/metrics", headers=auth(key)).json()["data"] == []


def test_the_body_changes_how_the_steps_run(client, key, sessions, storage):
    validation_id = make_dataset(client, key)
    job_id = _job(client, key, validation_dataset_id=validation_id, hyperparameters={"max_steps": 8, "batch_size": 4, "micro_batch_size": 4})
    _stopped(sessions, storage, job_id, "failed")
    changes = {"micro_batch_size": 16, "gradient_checkpointing": True, "bf16": False, "checkpoint_every": 1, "eval_every": 2, "eval_generate_rows": 3}
    response = client.post(f"/jobs/{job_id}/resume", headers=auth(key), json={"hyperparameters": changes})
    assert response.status_code == 200, response.text
    hp = response.json()["hyperparameters"]
    # micro_batch_size is lowered to batch_size, as at creation; the rest is as sent, and as before.
    assert {k: hp[k] for k in changes} == {**changes, "micro_batch_size": 4}
    assert (hp["max_steps"], hp["batch_size"], hp["torch_compile"]) == (8, 4, False)
    with sessions() as session:
        assert session.get(Job, job_id).spec["hyperparameters"] == hp  # what the worker runs


def test_a_null_body_or_hyperparameters_change_nothing(client, key, sessions, storage):
    job_id = _job(client, key)
    before = client.get(f"/jobs/{job_id}", headers=auth(key)).json()["hyperparameters"]
    _stopped(sessions, storage, job_id, "failed")
    job = client.post(f"/jobs/{job_id}/resume", headers=auth(key), json={"hyperparameters": None}).json()
    assert job["hyperparameters"] == before


@pytest.mark.parametrize(
    ("hyperparameters", "field", "message"),
    [
        ({"learning_rate": 1e-3}, "learning_rate", "cannot change on resume: it changes what the job trains"),
        ({"micro_batch_size": 2, "max_steps": 20}, "max_steps", "cannot change on resume"),
        ({"rank": 16}, "rank", "create a new job instead"),
        ({"micro_batch_size": 0}, "micro_batch_size", "must be a whole number within [1, 8192]"),
        ({"gradient_checkpointing": "yes"}, "gradient_checkpointing", "valid boolean"),
        ({"eval_every": 2}, "eval_every", "needs a validation set, and this job has none"),
        ({"warp_speed": True}, "warp_speed", "Extra inputs are not permitted"),
    ],
)
def test_a_change_to_what_is_trained_is_a_422_naming_the_field(client, key, sessions, storage, hyperparameters, field, message):
    job_id = _job(client, key)
    _stopped(sessions, storage, job_id, "failed")
    response = client.post(f"/jobs/{job_id}/resume", headers=auth(key), json={"hyperparameters": hyperparameters})
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == f"body.hyperparameters.{field}" and message in response.json()["detail"]
    assert client.get(f"/jobs/{job_id}", headers=auth(key)).json()["status"] == "failed"  # nothing changed


def test_only_failed_and_cancelled_jobs_resume(client, key, sessions, storage):
    job_id = _job(client, key)
    response = client.post(f"/jobs/{job_id}/resume", headers=auth(key))
    assert response.status_code == 409 and "is queued: only a failed or cancelled job can be resumed" in response.json()["detail"]

    with session_scope(sessions) as session:
        session.get(Job, job_id).status = "running"
    assert "is running: only" in client.post(f"/jobs/{job_id}/resume", headers=auth(key)).json()["detail"]
    client.post(f"/jobs/{job_id}/cancel", headers=auth(key))
    assert "is running and stopping: only" in client.post(f"/jobs/{job_id}/resume", headers=auth(key)).json()["detail"]

    with session_scope(sessions) as session:
        session.get(Job, job_id).status = "succeeded"
    response = client.post(f"/jobs/{job_id}/resume", headers=auth(key))
    assert response.status_code == 409 and "has succeeded: it has nothing left to train" in response.json()["detail"]

    _stopped(sessions, storage, job_id, "failed")
    assert client.post(f"/jobs/{job_id}/resume", headers=auth(key)).status_code == 200
    response = client.post(f"/jobs/{job_id}/resume", headers=auth(key))  # a retried resume
    assert response.status_code == 409 and "is queued" in response.json()["detail"]


def test_another_tenants_job_is_not_found(client, key, other_key, sessions, storage):
    job_id = _job(client, key)
    _stopped(sessions, storage, job_id, "failed")
    response = client.post(f"/jobs/{job_id}/resume", headers=auth(other_key))
    assert response.status_code == 404
    assert client.get(f"/jobs/{job_id}", headers=auth(key)).json()["status"] == "failed"


def test_a_job_whose_dataset_was_deleted_cannot_resume(client, key, sessions, storage):
    job_id = _job(client, key)
    _stopped(sessions, storage, job_id, "failed")
    dataset_id = client.get(f"/jobs/{job_id}", headers=auth(key)).json()["dataset_id"]
    assert client.delete(f"/datasets/{dataset_id}", headers=auth(key)).status_code == 200
    response = client.post(f"/jobs/{job_id}/resume", headers=auth(key))
    assert response.status_code == 409
    assert response.json()["detail"] == f"job {job_id} cannot be resumed: its dataset_id {dataset_id} has been deleted"


def test_a_job_being_deleted_is_not_found(client, key, sessions, storage):
    job_id = _job(client, key)
    _stopped(sessions, storage, job_id, "failed")
    with session_scope(sessions) as session:
        job_service.start_deletion(session, session.get(Job, job_id))
    assert client.post(f"/jobs/{job_id}/resume", headers=auth(key)).status_code == 404
    with sessions() as session:
        assert session.scalar(select(Job.status).where(Job.id == job_id)) == "failed"
