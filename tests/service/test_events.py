"""The job event stream (`GET /jobs/{id}/events`) over the real app and SQLite: event ids,
resuming with Last-Event-ID, and ending when the server shuts down."""

from __future__ import annotations

from service import jobs as job_service
from service.db import session_scope
from tests.service.conftest import auth, job_body, make_dataset


def _running_job(client, key, sessions) -> str:
    job_id = client.post("/jobs", headers=auth(key), json=job_body(make_dataset(client, key))).json()["id"]
    with session_scope(sessions) as session:
        assert job_service.claim_job(session, job_id, "test-worker", 60) is not None
    return job_id


def _events(client, key, job_id: str, **headers) -> list[dict]:
    """The stream's events as {"id", "event", "data"} (and comments as {"comment"})."""
    with client.stream("GET", f"/jobs/{job_id}/events", headers={**auth(key), **headers}) as response:
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
