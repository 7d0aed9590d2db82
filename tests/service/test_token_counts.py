"""Token counts of an upload: the route enqueues the quick task after the commit, the task
(`mola.count_tokens`, run here in-process) fills per-model counts that equal
`mola.data.inspect_dataset` with that model's tokenizer, and the queue/worker wiring sends it to
the quick queue."""

from __future__ import annotations

import pytest

from service import cli
from service.models import Dataset
from service.queue import COUNT_TOKENS_TASK, TRAIN_TASK, CeleryQueue
from service.settings import get_settings
from tests.service.conftest import ALPACA_ROWS, auth, job_body, jsonl, upload

torch = pytest.importorskip("torch")

CHAT_ROWS = [
    {"messages": [{"role": "user", "content": "x" * (10 * i)}, {"role": "assistant", "content": "y" * (40 * i)}]}
    for i in range(1, 12)
]


@pytest.fixture
def run_task(settings, monkeypatch):
    """The Celery task's body, in this process, on the test's settings."""
    from worker import tasks

    monkeypatch.setattr(tasks, "get_settings", lambda: settings)
    return tasks.count_tokens.run


def _expected(content: bytes, model: str, tmp_path) -> dict:
    from mola.data import inspect_dataset
    from mola.models import load_tokenizer

    path = tmp_path / f"{model}.jsonl"
    path.write_bytes(content)
    report = inspect_dataset(path, tokenizer=load_tokenizer(model), cutoff_len=256)
    return {
        "total_tokens": report.total_tokens,
        "mean_tokens": report.mean_tokens,
        "max_tokens": report.max_tokens,
        "cutoff_len": 256,
        "over_cutoff": report.over_cutoff,
        "dropped_at_cutoff": report.dropped_at_cutoff,
        "valid_rows": report.valid_rows,
        "unrenderable": report.unrenderable,
    }


def test_upload_is_pending_and_enqueues_after_the_commit(client, key, queue, sessions):
    response = upload(client, key, jsonl(ALPACA_ROWS))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["token_counts"] == {"status": "pending", "models": {}, "error": None}
    assert queue.token_counts == [body["id"]] and queue.enqueued == []
    with sessions() as session:  # committed before it was enqueued
        assert session.get(Dataset, body["id"]).token_counts_status == "pending"


@pytest.mark.parametrize("rows", [ALPACA_ROWS, CHAT_ROWS], ids=["alpaca", "chat-over-cutoff"])
def test_the_quick_task_fills_counts_equal_to_inspect_dataset(client, key, run_task, tmp_path, rows):
    content = jsonl(rows)
    dataset_id = upload(client, key, content).json()["id"]
    assert run_task(dataset_id) == "ready"
    counts = client.get(f"/datasets/{dataset_id}", headers=auth(key)).json()["token_counts"]
    assert counts["status"] == "ready" and counts["error"] is None
    assert set(counts["models"]) == {"tiny-llama", "tiny-gpt2"}  # the catalogue's models
    for model, stats in counts["models"].items():
        assert stats == _expected(content, model, tmp_path)
        assert stats["total_tokens"] > 0 and stats["valid_rows"] == len(rows)
    if rows is CHAT_ROWS:
        assert counts["models"]["tiny-llama"]["over_cutoff"] > 0


REPORT_KEYS = {"rows", "valid_rows", "format", "formats", "errors", "error_count", "empty_targets", "ok"}


def test_the_report_says_what_validation_found_and_the_counts_say_the_tokens(client, key, run_task, sessions):
    """The upload's report holds what validation found, nothing it never fills in (token
    fields, null without a tokenizer, sat beside the real `token_counts`); a report stored
    with them by an older server is shown the same way."""
    dataset_id = upload(client, key, jsonl(ALPACA_ROWS)).json()["id"]
    assert run_task(dataset_id) == "ready"
    body = client.get(f"/datasets/{dataset_id}", headers=auth(key)).json()
    assert set(body["report"]) == REPORT_KEYS
    assert body["report"]["valid_rows"] == len(ALPACA_ROWS) and body["report"]["ok"] is True
    assert body["token_counts"]["models"]["tiny-llama"]["total_tokens"] > 0

    refused = upload(client, key, b'{"text": "ok"}\n{not json\n')
    assert refused.status_code == 422 and set(refused.json()["report"]) == REPORT_KEYS

    older = {**body["report"], "truncated": False, "total_tokens": None, "mean_tokens": None, "max_tokens": None,
             "cutoff_len": None, "over_cutoff": None, "dropped_at_cutoff": None}  # fmt: skip
    with sessions() as session:
        session.get(Dataset, dataset_id).report = older
        session.commit()
    assert client.get(f"/datasets/{dataset_id}", headers=auth(key)).json()["report"] == body["report"]
    assert client.get("/datasets", headers=auth(key)).json()["data"][0]["report"] == body["report"]


def test_rows_a_models_chat_template_refuses_are_named_and_its_jobs_refused(client, key, run_task, monkeypatch, queue):
    """tiny-llama given a strict chat template (turns must alternate): the count for it names the
    row it cannot render, and a job on it is refused naming the row; tiny-gpt2 renders it."""
    import mola.models
    from tests.test_data import STRICT_CHAT_TEMPLATE

    real = mola.models.load_tokenizer

    def strict_for_tiny_llama(name, *args, **kwargs):
        tokenizer = real(name, *args, **kwargs)
        if name == "tiny-llama":
            tokenizer.chat_template = STRICT_CHAT_TEMPLATE
        return tokenizer

    monkeypatch.setattr(mola.models, "load_tokenizer", strict_for_tiny_llama)
    user_twice = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "user", "content": "Hi??"}, {"role": "assistant", "content": "Yes."}]}
    dataset_id = upload(client, key, jsonl([*CHAT_ROWS[:3], user_twice, *CHAT_ROWS[3:]])).json()["id"]
    assert run_task(dataset_id) == "ready"
    counts = client.get(f"/datasets/{dataset_id}", headers=auth(key)).json()["token_counts"]["models"]
    refused = "cannot render the record: Conversation roles must alternate user/assistant"
    assert (counts["tiny-llama"]["valid_rows"], counts["tiny-llama"]["unrenderable"]) == (11, [{"line": 4, "message": refused}])
    assert (counts["tiny-gpt2"]["valid_rows"], counts["tiny-gpt2"]["unrenderable"]) == (12, [])

    response = client.post("/jobs", headers=auth(key), json=job_body(dataset_id))
    assert response.status_code == 422 and response.json()["errors"][0]["msg"] == (
        f"{dataset_id}: 1 of its 12 rows cannot be rendered with tiny-llama's tokenizer (line 4: {refused}) "
        "and the run would fail on the first: upload the data without them, or train another base model"
    )
    assert client.post("/jobs", headers=auth(key), json=job_body(dataset_id, base_model="tiny-gpt2")).status_code == 201


def test_models_sharing_a_tokenizer_share_one_pass(client, key, run_task, monkeypatch):
    import mola.data

    calls = []
    real = mola.data.inspect_dataset
    monkeypatch.setattr(mola.data, "inspect_dataset", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    dataset_id = upload(client, key, jsonl(ALPACA_ROWS)).json()["id"]
    assert run_task(dataset_id) == "ready"
    counted = [kw for kw in calls if kw.get("tokenizer") is not None]  # not the upload's validation
    assert len(counted) == 1  # tiny-llama and tiny-gpt2: the same byte-level tokenizer


def test_a_file_gone_from_storage_fails_with_the_reason(client, key, run_task, storage, sessions):
    dataset_id = upload(client, key, jsonl(ALPACA_ROWS)).json()["id"]
    with sessions() as session:
        storage.delete(session.get(Dataset, dataset_id).storage_key)
    assert run_task(dataset_id) == "failed"
    counts = client.get(f"/datasets/{dataset_id}", headers=auth(key)).json()["token_counts"]
    assert counts["status"] == "failed" and counts["models"] == {} and counts["error"]


def test_a_model_whose_tokenizer_is_missing_is_named(client, key, run_task, sessions):
    from service import catalogue
    from tests.service.conftest import TINY_LLAMA

    with sessions() as session:
        catalogue.upsert(session, "no-such-model", {**TINY_LLAMA, "name": "no-such-model"})
        session.commit()
    dataset_id = upload(client, key, jsonl(ALPACA_ROWS)).json()["id"]
    assert run_task(dataset_id) == "failed"
    counts = client.get(f"/datasets/{dataset_id}", headers=auth(key)).json()["token_counts"]
    assert set(counts["models"]) == {"tiny-llama", "tiny-gpt2"}  # the others are still counted
    assert counts["error"].startswith("no-such-model: FileNotFoundError")


def test_repeated_messages_for_one_dataset_count_it_once(client, key, run_task, monkeypatch):
    """The reconciler re-sends a count that waited long; when the quick queue was only busy,
    the copies arrive after the first did the work and must not redo it."""
    import mola.data

    dataset_id = upload(client, key, jsonl(ALPACA_ROWS)).json()["id"]
    assert run_task(dataset_id) == "ready"
    first = client.get(f"/datasets/{dataset_id}", headers=auth(key)).json()["token_counts"]
    calls = []
    monkeypatch.setattr(mola.data, "inspect_dataset", lambda *a, **kw: calls.append(kw))
    assert run_task(dataset_id) == "done" and run_task(dataset_id) == "done"
    assert calls == []
    assert client.get(f"/datasets/{dataset_id}", headers=auth(key)).json()["token_counts"] == first


def test_a_deleted_dataset_is_left_alone(client, key, run_task, sessions):
    dataset_id = upload(client, key, jsonl(ALPACA_ROWS)).json()["id"]
    assert client.delete(f"/datasets/{dataset_id}", headers=auth(key)).status_code == 200
    assert run_task(dataset_id) == "gone"
    assert run_task("ds_missing") == "gone"
    with sessions() as session:
        assert session.get(Dataset, dataset_id).token_counts_status == "pending"


def test_an_unreachable_broker_does_not_fail_the_upload(client, key, queue, monkeypatch):
    def broken(dataset_id):
        raise ConnectionError("broker down")

    monkeypatch.setattr(queue, "enqueue_token_count", broken)
    response = upload(client, key, jsonl(ALPACA_ROWS))
    assert response.status_code == 201 and response.json()["token_counts"]["status"] == "pending"


def test_the_task_goes_to_the_quick_queue(settings):
    """Through the real folder broker: the message lands on MOLA_QUICK_QUEUE, not the training
    queue, and the app routes the task name there too."""
    queue = CeleryQueue(settings)
    queue.enqueue_token_count("ds_x")
    names = [p.name for p in (settings.broker_folder / "queue").iterdir()]
    assert len(names) == 1 and names[0].endswith(f".{settings.quick_queue}.msg"), names
    routes = queue.app.conf.task_routes
    assert routes[COUNT_TOKENS_TASK] == {"queue": "mola.quick"} and routes[TRAIN_TASK] == {"queue": "mola.train"}


@pytest.mark.parametrize("argv, expected", [([], "mola.train"), (["--queues", "mola.quick"], "mola.quick")])
def test_worker_consumes_the_training_queue_unless_told(argv, expected, tmp_path, monkeypatch):
    from celery import Celery

    seen = []
    monkeypatch.setattr(Celery, "worker_main", lambda self, args: seen.append(args))
    monkeypatch.delenv("MOLA_SERVE_PID", raising=False)
    monkeypatch.setenv("MOLA_DATA_DIR", str(tmp_path))
    try:
        assert cli.main(["worker", *argv]) == 0
    finally:
        get_settings.cache_clear()
    assert f"--queues={expected}" in seen[0] and "--concurrency=1" in seen[0]
