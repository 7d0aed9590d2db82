"""DELETE /jobs/{id} over the real app, SQLite and a local storage folder: a finished job goes
with its metrics, checkpoints and stored files; a deletion interrupted halfway leaves nothing
visible and is finished by a repeated DELETE or by `mola serve` starting."""

from __future__ import annotations

from sqlalchemy import func, select

from service import cli
from service import jobs as job_service
from service.db import session_scope
from service.models import Checkpoint, Job, JobMetric
from tests.service.conftest import auth, job_body, make_dataset


def _finished_job(client, key, sessions, storage, tmp_path, idempotency_key: str | None = None) -> str:
    """A job that succeeded with metrics, two checkpoints and an adapter, all stored."""
    headers = {**auth(key), **({"Idempotency-Key": idempotency_key} if idempotency_key else {})}
    job_id = client.post("/jobs", headers=headers, json=job_body(make_dataset(client, key))).json()["id"]
    files = tmp_path / job_id
    files.mkdir()
    (files / "weights.bin").write_bytes(b"w" * 100)
    with session_scope(sessions) as session:
        assert job_service.claim_job(session, job_id, "test-worker", 60)
        job_service.record_metrics(session, job_id, [{"step": s, "kind": "train", "values": {"loss": 1.0}} for s in (1, 2, 3, 4)])
        for step in (2, 4):
            prefix = f"jobs/{job_id}/checkpoints/checkpoint-{step}"
            job_service.record_checkpoint(session, job_id, step, prefix, storage.put_dir(prefix, files))
        storage.put_file(f"jobs/{job_id}/adapter.tar.gz", files / "weights.bin")
        assert job_service.finish_job(session, job_id, "test-worker", "succeeded", adapter_key=f"jobs/{job_id}/adapter.tar.gz")
    return job_id


def _rows(sessions, job_id: str) -> tuple[int, int, int]:
    with sessions() as session:
        return tuple(
            session.scalar(select(func.count()).select_from(table).where(column == job_id))
            for table, column in ((Job, Job.id), (JobMetric, JobMetric.job_id), (Checkpoint, Checkpoint.job_id))
        )


def test_deleting_a_finished_job_removes_it_and_its_files(client, key, sessions, storage, tmp_path):
    job_id = _finished_job(client, key, sessions, storage, tmp_path)
    kept = _finished_job(client, key, sessions, storage, tmp_path)
    assert len(storage.list(f"jobs/{job_id}")) == 3

    response = client.delete(f"/jobs/{job_id}", headers=auth(key))
    assert response.status_code == 204 and response.content == b""
    assert _rows(sessions, job_id) == (0, 0, 0) and storage.list(f"jobs/{job_id}") == []
    for path in ("", "/metrics", "/checkpoints", "/adapter", "/events"):
        assert client.get(f"/jobs/{job_id}{path}", headers=auth(key)).status_code == 404, path
    assert [j["id"] for j in client.get("/jobs", headers=auth(key)).json()["data"]] == [kept]
    assert client.delete(f"/jobs/{job_id}", headers=auth(key)).status_code == 404  # gone already
    # The other job is untouched.
    assert _rows(sessions, kept) == (1, 4, 2) and len(storage.list(f"jobs/{kept}")) == 3


def test_paging_goes_on_after_the_cursor_job_is_deleted(client, key, sessions, storage, tmp_path):
    older, newer = (_finished_job(client, key, sessions, storage, tmp_path) for _ in range(2))
    first = client.get("/jobs?limit=1", headers=auth(key)).json()
    assert [j["id"] for j in first["data"]] == [newer] and first["has_more"]
    assert client.delete(f"/jobs/{newer}", headers=auth(key)).status_code == 204
    page = client.get(f"/jobs?limit=1&after={first['last_id']}", headers=auth(key))
    assert page.status_code == 200 and [j["id"] for j in page.json()["data"]] == [older]


def test_a_queued_or_running_job_must_be_cancelled_first(client, key, sessions):
    job_id = client.post("/jobs", headers=auth(key), json=job_body(make_dataset(client, key))).json()["id"]
    response = client.delete(f"/jobs/{job_id}", headers=auth(key))
    assert response.status_code == 409
    assert response.json()["detail"] == f"job {job_id} is queued: cancel it first (POST /jobs/{job_id}/cancel), and delete it once it has stopped"
    with session_scope(sessions) as session:
        assert job_service.claim_job(session, job_id, "test-worker", 60)
    assert client.delete(f"/jobs/{job_id}", headers=auth(key)).status_code == 409  # running
    assert client.post(f"/jobs/{job_id}/cancel", headers=auth(key)).json()["status"] == "running"  # asked to stop
    assert client.delete(f"/jobs/{job_id}", headers=auth(key)).status_code == 409  # not stopped yet
    with session_scope(sessions) as session:
        assert job_service.finish_job(session, job_id, "test-worker", "cancelled")
    assert client.delete(f"/jobs/{job_id}", headers=auth(key)).status_code == 204


def test_another_tenants_job_is_not_found_and_kept(client, key, other_key, sessions, storage, tmp_path):
    job_id = _finished_job(client, key, sessions, storage, tmp_path)
    assert client.delete(f"/jobs/{job_id}", headers=auth(other_key)).status_code == 404
    assert _rows(sessions, job_id) == (1, 4, 2) and len(storage.list(f"jobs/{job_id}")) == 3


def test_an_interrupted_deletion_hides_the_job_and_is_finished_later(client, key, sessions, storage, tmp_path, monkeypatch, settings):
    first = _finished_job(client, key, sessions, storage, tmp_path, idempotency_key="run-1")
    second = _finished_job(client, key, sessions, storage, tmp_path)

    def storage_down(prefix: str) -> None:
        raise OSError("storage unreachable")

    monkeypatch.setattr(storage, "delete_prefix", storage_down)
    for job_id in (first, second):
        response = client.delete(f"/jobs/{job_id}", headers=auth(key))
        assert response.status_code == 503 and "send the DELETE again" in response.json()["detail"]
        # Hidden at once, its rows gone; the marked job row still names the files to delete.
        assert client.get(f"/jobs/{job_id}", headers=auth(key)).status_code == 404
        assert _rows(sessions, job_id) == (1, 0, 0) and len(storage.list(f"jobs/{job_id}")) == 3
    assert client.get("/jobs", headers=auth(key)).json()["data"] == []
    # Its Idempotency-Key is not taken by another job while the deletion is pending.
    retry = client.post("/jobs", headers={**auth(key), "Idempotency-Key": "run-1"}, json=job_body(make_dataset(client, key)))
    assert retry.status_code == 409 and "being deleted" in retry.json()["detail"]
    monkeypatch.undo()

    assert client.delete(f"/jobs/{first}", headers=auth(key)).status_code == 204  # a repeated DELETE finishes it
    cli._finish_deletions(settings)  # and `mola serve` finishes the others when it starts
    for job_id in (first, second):
        assert _rows(sessions, job_id) == (0, 0, 0) and storage.list(f"jobs/{job_id}") == []
    # Once deleted, the key is free again.
    again = client.post("/jobs", headers={**auth(key), "Idempotency-Key": "run-1"}, json=job_body(make_dataset(client, key)))
    assert again.status_code == 201 and again.json()["id"] != first
