"""Routes against a real SQLite database and local storage (the broker is a recording stand-in)."""

from __future__ import annotations

from sqlalchemy import func, select

from api.schemas import JobCreate
from service import jobs as job_service
from service.db import session_scope
from service.models import BaseModelEntry, Checkpoint, Job
from tests.service.conftest import ALPACA_ROWS, auth, job_body, jsonl, make_dataset, new_key, upload


def test_health_needs_no_key(client):
    assert client.get("/healthz").json() == {"status": "ok"}


def test_openapi_docs(client):
    schema = client.get("/openapi.json").json()
    assert {"/datasets", "/jobs", "/jobs/{job_id}/events", "/jobs/{job_id}/adapter", "/models"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 200


def test_models_lists_layers_and_targets(client, key):
    data = client.get("/models", headers=auth(key)).json()["data"]
    llama = next(m for m in data if m["name"] == "tiny-llama")
    assert llama["num_layers"] == 4 and "q_proj" in llama["target_modules"]
    assert llama["max_positions"] == 512
    assert client.get("/models/tiny-gpt2", headers=auth(key)).json()["model_type"] == "gpt2"
    missing = client.get("/models/nope", headers=auth(key))
    assert missing.status_code == 404  # names what there is, like POST /jobs's 422 for a model
    assert missing.json()["detail"] == "base model 'nope' not found; available: tiny-gpt2, tiny-llama"


def test_upload_reports_and_stores(client, key, storage):
    response = upload(client, key, jsonl(ALPACA_ROWS), name="../../etc/my data.jsonl")
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["rows"] == len(ALPACA_ROWS) and dataset["format"] == "alpaca"
    assert dataset["filename"] == "my data.jsonl"
    assert dataset["report"]["errors"] == []
    assert len(storage.list("datasets")) == 1
    assert client.get(f"/datasets/{dataset['id']}", headers=auth(key)).json()["sha256"] == dataset["sha256"]
    listed = client.get("/datasets", headers=auth(key)).json()
    assert [d["id"] for d in listed["data"]] == [dataset["id"]] and not listed["has_more"]


def test_delete_dataset(client, key, storage):
    dataset_id = make_dataset(client, key)
    assert client.delete(f"/datasets/{dataset_id}", headers=auth(key)).json() == {"id": dataset_id, "deleted": True}
    assert client.get(f"/datasets/{dataset_id}", headers=auth(key)).status_code == 404
    assert storage.list("datasets") == []


def test_a_failed_commit_leaves_no_file_and_a_failed_file_delete_no_error(client, key, storage, monkeypatch):
    from sqlalchemy.orm import Session

    real_commit = Session.commit

    def commit_fails(self):
        raise RuntimeError("database went away")

    monkeypatch.setattr(Session, "commit", commit_fails)
    assert upload(client, key, jsonl(ALPACA_ROWS)).status_code == 500
    assert storage.list("datasets") == []
    monkeypatch.setattr(Session, "commit", real_commit)

    dataset_id = make_dataset(client, key)

    def delete_fails(key):
        raise OSError("storage unreachable")

    monkeypatch.setattr(storage, "delete", delete_fails)
    assert client.delete(f"/datasets/{dataset_id}", headers=auth(key)).status_code == 200
    assert client.get(f"/datasets/{dataset_id}", headers=auth(key)).status_code == 404


def test_delete_dataset_in_use_is_refused(client, key):
    dataset_id = make_dataset(client, key)
    job_id = client.post("/jobs", headers=auth(key), json=job_body(dataset_id)).json()["id"]
    response = client.delete(f"/datasets/{dataset_id}", headers=auth(key))
    assert response.status_code == 409
    assert response.json()["detail"] == (
        f"dataset {dataset_id} is used by queued or running job(s) {job_id}: cancel them or wait for them to finish, then delete it"
    )
    # Many jobs: the first five, and how many more.
    others = [client.post("/jobs", headers=auth(key), json=job_body(make_dataset(client, key), validation_dataset_id=dataset_id)).json()["id"] for _ in range(6)]
    detail = client.delete(f"/datasets/{dataset_id}", headers=auth(key)).json()["detail"]
    assert f"{job_id}, {', '.join(others[:4])} and 2 more:" in detail
    for job in [job_id, *others]:
        client.post(f"/jobs/{job}/cancel", headers=auth(key))
    assert client.delete(f"/datasets/{dataset_id}", headers=auth(key)).status_code == 200


def test_create_job_expands_allocation_and_enqueues_after_commit(client, key, queue, sessions):
    dataset_id = make_dataset(client, key)
    response = client.post("/jobs", headers=auth(key), json=job_body(dataset_id, top_k=[1, 2, 2, 3]))
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["status"] == "queued" and job["allocation"] == [2, 4, 6, 8] and job["top_k"] == [1, 2, 2, 3]
    assert job["hyperparameters"]["target_modules"][0] == "q_proj"  # the model's default filled in
    assert job["hyperparameters"]["max_steps"] == 4 and job["hyperparameters"]["rank"] == 8
    assert queue.enqueued == [job["id"]]
    with sessions() as session:  # the row was committed before the id was enqueued
        assert session.get(Job, job["id"]).status == "queued"


def test_allocation_forms(client, key):
    dataset_id = make_dataset(client, key)
    for allocation, expected in (
        ([1, 2, 3, 4], [1, 2, 3, 4]),
        ("2,2,8,8", [2, 2, 8, 8]),
        ({"preset": "rectangle", "average": 3}, [3, 3, 3, 3]),
        ("inverted_triangle:4", None),
    ):
        job = client.post("/jobs", headers=auth(key), json=job_body(dataset_id, allocation=allocation)).json()
        assert len(job["allocation"]) == 4 and (expected is None or job["allocation"] == expected), job
        assert job["allocation_spec"] == allocation


def test_target_modules_by_name_or_by_path(client, key, sessions):
    dataset_id = make_dataset(client, key)
    targets = ["self_attn.q_proj", "down_proj"]
    response = client.post("/jobs", headers=auth(key), json=job_body(dataset_id, hyperparameters={"target_modules": targets}))
    assert response.status_code == 201 and response.json()["hyperparameters"]["target_modules"] == targets
    # A catalogue row synced before module paths were recorded checks the last part only.
    with session_scope(sessions) as session:
        session.get(BaseModelEntry, "tiny-llama").module_paths = None
    body = job_body(dataset_id, hyperparameters={"target_modules": ["attn.q_proj"]})
    assert client.post("/jobs", headers=auth(key), json=body).status_code == 201
    body["hyperparameters"]["target_modules"] = ["attn.qq_proj"]
    assert client.post("/jobs", headers=auth(key), json=body).status_code == 422


def test_lora_job(client, key):
    dataset_id = make_dataset(client, key)
    body = job_body(dataset_id, method="lora", allocation=None)
    job = client.post("/jobs", headers=auth(key), json=body).json()
    assert job["method"] == "lora" and job["allocation"] is None


def test_idempotency_key_returns_the_same_job(client, key, queue):
    dataset_id = make_dataset(client, key)
    headers = {**auth(key), "Idempotency-Key": "abc-123"}
    first = client.post("/jobs", headers=headers, json=job_body(dataset_id))
    again = client.post("/jobs", headers=headers, json=job_body(dataset_id))
    assert first.status_code == 201 and again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true" and again.json()["id"] == first.json()["id"]
    assert queue.enqueued == [first.json()["id"]]
    different = client.post("/jobs", headers=headers, json=job_body(dataset_id, allocation="4444"))
    assert different.status_code == 409
    # Keys are per tenant: another tenant may use the same key.
    other = new_key_for_test(client, "globex2")
    other_ds = make_dataset(client, other)
    assert client.post("/jobs", headers={**auth(other), "Idempotency-Key": "abc-123"}, json=job_body(other_ds)).status_code == 201


def test_a_job_stored_before_webhook_url_existed_is_found_by_its_idempotency_key(client, key, sessions, queue):
    dataset_id = make_dataset(client, key)
    headers = {**auth(key), "Idempotency-Key": "before-webhooks"}
    first = client.post("/jobs", headers=headers, json=job_body(dataset_id)).json()
    # Its stored hash, as the server computed it before requests had a webhook_url.
    before = JobCreate.model_validate(job_body(dataset_id)).model_dump(mode="json")
    before.pop("webhook_url")
    with session_scope(sessions) as session:
        session.get(Job, first["id"]).request_hash = job_service.request_hash(before)
    again = client.post("/jobs", headers=headers, json=job_body(dataset_id))
    assert (again.status_code, again.json()["id"]) == (200, first["id"])
    with_hook = client.post("/jobs", headers=headers, json=job_body(dataset_id, webhook_url="http://127.0.0.1:9/h"))
    assert with_hook.status_code == 409  # a request that does use it is another request


def test_an_idempotency_key_is_read_without_surrounding_whitespace_and_a_blank_one_refused(client, key, queue):
    dataset_id = make_dataset(client, key)
    first = client.post("/jobs", headers={**auth(key), "Idempotency-Key": "k-1"}, json=job_body(dataset_id))
    padded = client.post("/jobs", headers={**auth(key), "Idempotency-Key": "  k-1 "}, json=job_body(dataset_id))
    assert (first.status_code, padded.status_code, padded.json()["id"]) == (201, 200, first.json()["id"])
    blank = client.post("/jobs", headers={**auth(key), "Idempotency-Key": "   "}, json=job_body(dataset_id))
    assert blank.status_code == 422 and blank.json()["errors"] == [
        {"loc": ["header", "Idempotency-Key"], "field": "header.Idempotency-Key", "msg": "must not be blank"}
    ]
    assert queue.enqueued == [first.json()["id"]]


def new_key_for_test(client, tenant: str) -> str:
    return new_key(client.app.state.sessionmaker, tenant)


def test_list_jobs_paginates_and_filters(client, key, sessions):
    dataset_id = make_dataset(client, key)
    ids = [client.post("/jobs", headers=auth(key), json=job_body(dataset_id)).json()["id"] for _ in range(5)]
    first = client.get("/jobs?limit=2", headers=auth(key)).json()
    assert [j["id"] for j in first["data"]] == ids[::-1][:2] and first["has_more"]
    second = client.get(f"/jobs?limit=2&after={first['last_id']}", headers=auth(key)).json()
    third = client.get(f"/jobs?limit=2&after={second['last_id']}", headers=auth(key)).json()
    assert [j["id"] for j in second["data"] + third["data"]] == ids[::-1][2:] and not third["has_more"]
    client.post(f"/jobs/{ids[0]}/cancel", headers=auth(key))
    cancelled = client.get("/jobs?status=cancelled", headers=auth(key)).json()["data"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    assert len(client.get("/jobs?status=queued", headers=auth(key)).json()["data"]) == 4


def test_list_jobs_by_dataset_model_and_method(client, key, other_key):
    first, second = make_dataset(client, key), make_dataset(client, key)
    ids = {
        name: client.post("/jobs", headers=auth(key), json=job_body(dataset, **extra)).json()["id"]
        for name, dataset, extra in [
            ("mola on first", first, {}),
            ("lora on first", first, {"method": "lora", "allocation": None}),
            ("mola on second", second, {}),
        ]
    }

    def listed(query: str, **params) -> list[str]:
        return [j["id"] for j in client.get(f"/jobs{query}", params=params, headers=auth(key)).json()["data"]]

    assert listed("", dataset_id=first) == [ids["lora on first"], ids["mola on first"]]
    assert listed("", dataset_id=first, method="mola") == [ids["mola on first"]]
    assert listed("", method="mola") == [ids["mola on second"], ids["mola on first"]]
    assert listed("", base_model="tiny-llama", status="queued", limit=1) == [ids["mola on second"]]
    assert listed("", base_model="tiny-mistral") == []
    page = client.get("/jobs", params={"dataset_id": first, "limit": 1}, headers=auth(key)).json()
    assert page["has_more"] and listed("", dataset_id=first, after=page["last_id"]) == [ids["mola on first"]]
    # A deleted dataset keeps its jobs to list; another tenant's id is no dataset of yours.
    client.post(f"/jobs/{ids['mola on second']}/cancel", headers=auth(key))
    assert client.delete(f"/datasets/{second}", headers=auth(key)).status_code == 200
    assert listed("", dataset_id=second) == [ids["mola on second"]]
    theirs = make_dataset(client, other_key)
    response = client.get("/jobs", params={"dataset_id": theirs}, headers=auth(key))
    assert response.status_code == 422 and response.json()["errors"][0]["field"] == "query.dataset_id"


def test_cancel_queued_then_cancelled_again(client, key):
    dataset_id = make_dataset(client, key)
    job_id = client.post("/jobs", headers=auth(key), json=job_body(dataset_id)).json()["id"]
    response = client.post(f"/jobs/{job_id}/cancel", headers=auth(key))
    assert response.json()["status"] == "cancelled" and response.json()["finished_at"]
    assert client.post(f"/jobs/{job_id}/cancel", headers=auth(key)).status_code == 409


def _start(sessions, job_id: str, owner: str = "test-worker") -> None:
    with session_scope(sessions) as session:
        assert job_service.claim_job(session, job_id, owner, 60) is not None


def test_cancel_running_asks_the_worker(client, key, sessions):
    dataset_id = make_dataset(client, key)
    job_id = client.post("/jobs", headers=auth(key), json=job_body(dataset_id)).json()["id"]
    _start(sessions, job_id)
    job = client.post(f"/jobs/{job_id}/cancel", headers=auth(key)).json()
    assert job["status"] == "running" and job["cancel_requested"]
    with sessions() as session:
        assert job_service.cancel_requested(session, job_id)


def test_metrics_pages_by_whole_steps(client, key, sessions):
    dataset_id = make_dataset(client, key)
    job_id = client.post("/jobs", headers=auth(key), json=job_body(dataset_id)).json()["id"]
    _start(sessions, job_id)
    rows = [{"step": s, "kind": "train", "values": {"loss": 1.0 / s}} for s in range(1, 7)]
    rows += [{"step": s, "kind": "eval", "values": {"eval_loss": 2.0 / s}} for s in (2, 4, 6)]
    with session_scope(sessions) as session:
        job_service.record_metrics(session, job_id, rows)
        job_service.record_metrics(session, job_id, rows[:3])  # a replay adds nothing
        assert job_service.heartbeat(session, job_id, "test-worker", 60, step=3, total_steps=10, epoch=0.3)
        assert job_service.heartbeat(session, job_id, "test-worker", 60, step=6, total_steps=10, epoch=0.6)
    page = client.get(f"/jobs/{job_id}/metrics?limit=2", headers=auth(key)).json()
    assert [(m["step"], m["kind"]) for m in page["data"]] == [(1, "train"), (2, "eval"), (2, "train")]
    assert page["has_more"] and page["last_step"] == 2
    rest = client.get(f"/jobs/{job_id}/metrics?after_step=2&limit=100", headers=auth(key)).json()
    assert [m["step"] for m in rest["data"]] == [3, 4, 4, 5, 6, 6] and not rest["has_more"]
    evals = client.get(f"/jobs/{job_id}/metrics?kind=eval", headers=auth(key)).json()["data"]
    assert [m["metrics"]["eval_loss"] for m in evals] == [1.0, 0.5, 2.0 / 6]
    job = client.get(f"/jobs/{job_id}", headers=auth(key)).json()
    assert job["progress"]["step"] == 6 and job["progress"]["fraction"] == 0.6
    assert job["progress"]["eta_seconds"] is not None


def test_events_stream_replays_metrics_and_ends(client, key, sessions):
    dataset_id = make_dataset(client, key)
    job_id = client.post("/jobs", headers=auth(key), json=job_body(dataset_id)).json()["id"]
    _start(sessions, job_id)
    with session_scope(sessions) as session:
        job_service.record_metrics(session, job_id, [{"step": s, "kind": "train", "values": {"loss": 1.0}} for s in (1, 2, 3)])
        job_service.finish_job(session, job_id, "test-worker", "failed", error="boom")
    with client.stream("GET", f"/jobs/{job_id}/events", headers={**auth(key), "Last-Event-ID": "1"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    events = [block for block in text.split("\n\n") if block.strip()]
    kinds = [next(line[7:] for line in e.splitlines() if line.startswith("event: ")) for e in events]
    assert kinds == ["job", "metric", "metric", "end"]
    assert "id: 2.train" in events[1] and '"error": "boom"' in events[-1]
    # A Last-Event-ID past any step (beyond a 32-bit column) replays nothing and still ends.
    with client.stream("GET", f"/jobs/{job_id}/events", headers={**auth(key), "Last-Event-ID": "9" * 20}) as response:
        text = response.read().decode()
    kinds = [line[7:] for line in text.splitlines() if line.startswith("event: ")]
    assert kinds == ["job", "end"]


def test_checkpoints_and_adapter(client, key, sessions, storage, tmp_path):
    dataset_id = make_dataset(client, key)
    job_id = client.post("/jobs", headers=auth(key), json=job_body(dataset_id)).json()["id"]
    assert client.get(f"/jobs/{job_id}/adapter", headers=auth(key)).status_code == 404
    _start(sessions, job_id)
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(b"not really a tarball")
    storage.put_file(f"jobs/{job_id}/adapter.tar.gz", archive)
    with session_scope(sessions) as session:
        job_service.record_checkpoint(session, job_id, 2, f"jobs/{job_id}/checkpoints/checkpoint-2", 123, {"epoch": 0.5})
        job_service.finish_job(session, job_id, "test-worker", "succeeded", adapter_key=f"jobs/{job_id}/adapter.tar.gz")
        assert session.scalar(select(func.count()).select_from(Checkpoint)) == 1
    checkpoints = client.get(f"/jobs/{job_id}/checkpoints", headers=auth(key)).json()["data"]
    assert [(c["step"], c["size_bytes"]) for c in checkpoints] == [(2, 123)]
    response = client.get(f"/jobs/{job_id}/adapter", headers=auth(key))
    assert response.status_code == 200 and response.content == b"not really a tarball"
    assert "attachment" in response.headers["content-disposition"]
    assert client.get(f"/jobs/{job_id}", headers=auth(key)).json()["adapter_available"]


def test_worker_writes_need_the_lease(client, key, sessions):
    dataset_id = make_dataset(client, key)
    job_id = client.post("/jobs", headers=auth(key), json=job_body(dataset_id)).json()["id"]
    _start(sessions, job_id, owner="w1")
    with session_scope(sessions) as session:
        assert job_service.claim_job(session, job_id, "w2", 60) is None  # already running
        assert not job_service.heartbeat(session, job_id, "w2", 60, step=3)
        assert not job_service.finish_job(session, job_id, "w2", "succeeded")
        assert job_service.release_job(session, job_id, "w1")  # a warm shutdown: not an attempt lost
        assert job_service.claim_job(session, job_id, "w2", 60).attempts == 1
