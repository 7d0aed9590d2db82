"""The job event stream (`GET /jobs/{id}/events`) over the real app and SQLite: event ids,
resuming with Last-Event-ID, and ending when the server shuts down."""

from __future__ import annotations

import pytest

from service import jobs as job_service
from service.db import session_scope
from tests.service.conftest import auth, job_body, make_dataset


def _running_job(client, key, sessions) -> str:
    job_id = client.post("/jobs", headers=auth(key), json=job_body(make_dataset(client, key))).json()["id"]
    with session_scope(sessions) as session:
        assert job_service.claim_job(session, job_id, "test-worker", 60) is not None
    return job_id


def _events(client, key, job_id: str, query: str = "", **headers) -> list[dict]:
    """The stream's events as {"id", "event", "data"} (and comments as {"comment"})."""
    with client.stream("GET", f"/jobs/{job_id}/events{query}", headers={**auth(key), **headers}) as response:
        assert response.status_code == 200, response.read()
        text = response.read().decode()
    events = []
    for block in filter(str.strip, text.split("\n\n")):
        fields: dict = {}
        for line in block.splitlines():
            name, _, value = line.partition(": ")
            fields[name or "comment"] = value
        events.append(fields)
    return events


def test_a_stream_ends_when_the_server_shuts_down(client, key, sessions, app):
    job_id = _running_job(client, key, sessions)  # running: its stream would go on forever
    app.state.shutting_down.set()  # what `mola serve` does at Ctrl-C
    events = _events(client, key, job_id)
    assert events and "shutting down" in events[-1]["comment"]


def _finished_job_with_metrics(client, key, sessions) -> str:
    """A failed job with train metrics at steps 1-3 and eval metrics at step 2: step 2 has two
    rows, which used to share the id 2."""
    job_id = _running_job(client, key, sessions)
    rows = [{"step": s, "kind": "train", "values": {"loss": 1.0 / s}} for s in (1, 2, 3)]
    rows.append({"step": 2, "kind": "eval", "values": {"eval_loss": 0.7}})
    with session_scope(sessions) as session:
        job_service.record_metrics(session, job_id, rows)
        job_service.finish_job(session, job_id, "test-worker", "failed", error="boom")
    return job_id


def _metric_ids(events: list[dict]) -> list[str]:
    return [e["id"] for e in events if e.get("event") == "metric"]


def test_each_metric_event_has_its_own_ordered_id(client, key, sessions):
    job_id = _finished_job_with_metrics(client, key, sessions)
    events = _events(client, key, job_id)
    assert _metric_ids(events) == ["1.train", "2.eval", "2.train", "3.train"]
    assert [e["event"] for e in events][0] == "job" and events[-1]["event"] == "end"


# Last-Event-ID (and after_step) -> the metric ids the stream resumes with.
RESUME_CASES = [
    ("after the eval row of a step", {"Last-Event-ID": "2.eval"}, "", ["2.train", "3.train"]),
    ("after the train row of a step", {"Last-Event-ID": "2.train"}, "", ["3.train"]),
    ("an id of earlier versions: the whole step", {"Last-Event-ID": "2"}, "", ["3.train"]),
    ("after_step alone", {}, "?after_step=1", ["2.eval", "2.train", "3.train"]),
    ("after_step further than the id", {"Last-Event-ID": "1.train"}, "?after_step=2", ["3.train"]),
    ("the id further than after_step", {"Last-Event-ID": "2.eval"}, "?after_step=1", ["2.train", "3.train"]),
    ("past the step column", {"Last-Event-ID": "9" * 20}, "", []),
]


@pytest.mark.parametrize("name,headers,query,expected", RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_resuming_after_an_event_id(client, key, sessions, name, headers, query, expected):
    job_id = _finished_job_with_metrics(client, key, sessions)
    events = _events(client, key, job_id, query, **headers)
    assert _metric_ids(events) == expected and events[-1]["event"] == "end"


@pytest.mark.parametrize("bad", ["2.", "two", "2.train.x", "-1", "2;eval"])
def test_a_malformed_last_event_id_is_a_422(client, key, sessions, bad):
    job_id = _finished_job_with_metrics(client, key, sessions)
    response = client.get(f"/jobs/{job_id}/events", headers={**auth(key), "Last-Event-ID": bad})
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == "header.Last-Event-ID"


def test_steps_written_again_after_a_crash_are_not_sent_twice(client, key, sessions):
    """A resumed run deletes the rows after its checkpoint and writes them again (same losses,
    new timings): a client past them continues after its last id, without duplicates."""
    job_id = _running_job(client, key, sessions)
    with session_scope(sessions) as session:
        job_service.record_metrics(session, job_id, [{"step": s, "kind": "train", "values": {"loss": 1.0}} for s in (1, 2, 3)])
        job_service.prepare_resume(session, job_id, from_step=1)  # a new run from checkpoint 1
        job_service.record_metrics(session, job_id, [{"step": s, "kind": "train", "values": {"loss": 1.0}} for s in (2, 3, 4)])
        job_service.finish_job(session, job_id, "test-worker", "succeeded")
    assert _metric_ids(_events(client, key, job_id, **{"Last-Event-ID": "3.train"})) == ["4.train"]
