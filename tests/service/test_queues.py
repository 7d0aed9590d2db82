"""GET /queues and a queued job's or generation's `queue`: which workers consume each queue
(as they report themselves, `service.workers`) and what waits ahead. Real SQLite; the workers'
rows are written by the code the workers run (`workers.beat` from the reconciler thread)."""

from __future__ import annotations

import time
from datetime import timedelta

from sqlalchemy import update

from service import workers
from service.db import session_scope
from service.models import Job, WebhookDelivery, Worker, utcnow
from service.reconcile import ReconcilerThread
from tests.service.conftest import auth, job_body, make_dataset
from tests.service.test_client import live, mola  # noqa: F401 - live is a fixture
from tests.service.test_generations import _finished_job, _post
from tests.service.test_reconcile import Broker


def _beat(sessions, worker_id: str, queues: list[str], ago: timedelta = timedelta(0)) -> None:
    with session_scope(sessions) as session:
        workers.beat(session, worker_id, queues, now=utcnow() - ago)


def _queues(client, key) -> dict[str, dict]:
    response = client.get("/queues", headers=auth(key))
    assert response.status_code == 200, response.text
    return {q["name"]: q for q in response.json()["data"]}


def test_the_queues_say_what_goes_there_and_who_consumes_it(client, key, other_key, sessions, settings):
    assert client.get("/queues").status_code == 401
    assert _queues(client, key) == {
        "mola.train": {"name": "mola.train", "carries": ["jobs", "generations"], "workers": 0, "waiting": 0, "running": 0},
        "mola.quick": {"name": "mola.quick", "carries": ["token counts", "webhooks"], "workers": 0, "waiting": 0, "running": None},
    }
    dataset = make_dataset(client, key)  # its token counts wait on the quick queue
    first = client.post("/jobs", headers=auth(key), json=job_body(dataset)).json()["id"]
    client.post("/jobs", headers=auth(other_key), json=job_body(make_dataset(client, other_key)))
    with session_scope(sessions) as session:
        session.execute(update(Job).where(Job.id == first).values(status="running"))
    _beat(sessions, "gpu-1:10", ["mola.train"])
    _beat(sessions, "cpu-1:11", ["mola.quick", "mola.train"])
    _beat(sessions, "gpu-2:12", ["mola.train"], ago=timedelta(seconds=3 * settings.reconcile_seconds + 11))  # gone quiet
    queues = _queues(client, key)
    assert (queues["mola.train"]["workers"], queues["mola.train"]["waiting"], queues["mola.train"]["running"]) == (2, 1, 1)
    assert (queues["mola.quick"]["workers"], queues["mola.quick"]["waiting"]) == (1, 2)

    # A worker that stops says so at once; rows unseen for a day go at the next beat.
    with session_scope(sessions) as session:
        workers.forget(session, "cpu-1:11")
    _beat(sessions, "old:1", ["mola.train"], ago=timedelta(days=2))
    _beat(sessions, "gpu-1:10", ["mola.train"])
    with sessions() as session:
        assert sorted(session.get(Worker, w) is not None for w in ("cpu-1:11", "old:1", "gpu-2:12", "gpu-1:10")) == [False, False, True, True]
    assert _queues(client, key)["mola.quick"]["workers"] == 0


def test_webhooks_due_wait_on_the_quick_queue(client, key, sessions):
    job_id = client.post("/jobs", headers=auth(key), json=job_body(make_dataset(client, key), webhook_url="http://127.0.0.1:9/hook")).json()["id"]
    waiting = _queues(client, key)["mola.quick"]["waiting"]  # the upload's token count
    client.post(f"/jobs/{job_id}/cancel", headers=auth(key))  # its event is due at once
    assert _queues(client, key)["mola.quick"]["waiting"] == waiting + 1
    with session_scope(sessions) as session:  # a retry waiting for its time waits for no worker
        session.execute(update(WebhookDelivery).values(next_attempt_at=utcnow() + timedelta(seconds=30)))
    assert _queues(client, key)["mola.quick"]["waiting"] == waiting


def test_a_queued_job_says_what_is_ahead_of_it_and_who_will_run_it(client, key, other_key, sessions):
    dataset = make_dataset(client, key)
    created = client.post("/jobs", headers=auth(key), json=job_body(dataset)).json()
    assert created["queue"] == {"name": "mola.train", "workers": 0, "ahead": 0, "running": 0}
    client.post("/jobs", headers=auth(other_key), json=job_body(make_dataset(client, other_key)))
    third = client.post("/jobs", headers=auth(key), json=job_body(dataset)).json()["id"]
    _beat(sessions, "gpu-1:10", ["mola.train"])
    assert client.get(f"/jobs/{third}", headers=auth(key)).json()["queue"] == {"name": "mola.train", "workers": 1, "ahead": 2, "running": 0}
    with session_scope(sessions) as session:
        session.execute(update(Job).where(Job.id == created["id"]).values(status="running"))
    assert client.get(f"/jobs/{third}", headers=auth(key)).json()["queue"]["ahead"] == 1  # the other tenant's
    assert client.get(f"/jobs/{created['id']}", headers=auth(key)).json()["queue"] is None  # not queued
    assert all(job["queue"] is None for job in client.get("/jobs", headers=auth(key)).json()["data"])  # lists: never
    cancelled = client.post(f"/jobs/{third}/cancel", headers=auth(key)).json()
    assert cancelled["queue"] is None
    fourth = client.post("/jobs", headers=auth(key), json=job_body(dataset)).json()["id"]
    # A resumed job goes to the back of the queue: behind the job created after it.
    resumed = client.post(f"/jobs/{third}/resume", headers=auth(key))
    assert resumed.status_code == 200 and resumed.json()["queue"]["ahead"] == 2, resumed.text
    assert client.get(f"/jobs/{fourth}", headers=auth(key)).json()["queue"]["ahead"] == 1


def test_a_generation_on_the_training_queue_waits_behind_its_jobs(client, key, sessions, queue):
    job_id = _finished_job(sessions, client, key)
    waiting_job = client.post("/jobs", headers=auth(key), json=job_body(make_dataset(client, key))).json()["id"]
    generation = _post(client, key, job_id).json()
    assert generation["queue"] == {"name": "mola.train", "workers": 0, "ahead": 1, "running": 0}
    second = _post(client, key, job_id).json()["id"]
    assert client.get(f"/jobs/{job_id}/generations/{second}", headers=auth(key)).json()["queue"]["ahead"] == 2
    assert client.get(f"/jobs/{waiting_job}", headers=auth(key)).json()["queue"]["ahead"] == 0  # created before both


def test_a_generation_queue_of_its_own_counts_only_generations(client, key, sessions, settings, monkeypatch):
    monkeypatch.setattr(settings, "generation_queue", "mola.generate")
    job_id = _finished_job(sessions, client, key)
    client.post("/jobs", headers=auth(key), json=job_body(make_dataset(client, key)))
    assert _post(client, key, job_id).json()["queue"] == {"name": "mola.generate", "workers": 0, "ahead": 0, "running": 0}
    queues = _queues(client, key)
    assert queues["mola.generate"]["carries"] == ["generations"] and queues["mola.train"]["carries"] == ["jobs"]
    assert (queues["mola.generate"]["waiting"], queues["mola.train"]["waiting"]) == (1, 1)


def test_a_workers_reconciler_reports_it_alive_until_it_stops(settings, sessions, client, key):
    thread = ReconcilerThread(settings, sessions, Broker(settings), worker_id="gpu-1:10", queues=["mola.train", "mola.generate"])
    thread.start()
    try:
        deadline = utcnow() + timedelta(seconds=10)
        while _queues(client, key)["mola.train"]["workers"] == 0 and utcnow() < deadline:
            time.sleep(0.05)
        assert _queues(client, key)["mola.train"]["workers"] == 1
    finally:
        thread.stop()
    assert not thread.is_alive() and _queues(client, key)["mola.train"]["workers"] == 0


def test_the_cli_shows_the_queues_and_warns_when_nobody_will_run_a_job(client, key, sessions, capsys, live):
    dataset = make_dataset(client, key)
    code, out, err = mola(capsys, live, key, "jobs", "create", "--model", "tiny-llama", "--dataset", dataset, "--allocation", "2")
    assert code == 0 and "warning: no worker consumes queue mola.train: the job waits until one starts" in err, err
    job_id = out.split()[1].rstrip(":")
    code, out, _ = mola(capsys, live, key, "jobs", "show", job_id)
    assert "waiting:     0 ahead of it, 0 running; no worker consumes queue mola.train" in out, out
    _beat(sessions, "gpu-1:10", ["mola.train"])
    code, out, err = mola(capsys, live, key, "jobs", "create", "--model", "tiny-llama", "--dataset", dataset, "--allocation", "2")
    assert code == 0 and err == ""
    code, out, _ = mola(capsys, live, key, "jobs", "show", out.split()[1].rstrip(":"))
    assert "waiting:     1 ahead of it, 0 running; 1 worker on queue mola.train" in out, out
    code, out, _ = mola(capsys, live, key, "queues")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:5] == ["mola.train", "jobs", "+", "generations", "1"] and "2 waiting, 0 running" in lines[0]
    assert "<- no worker" in lines[1]  # the upload's token counts wait on mola.quick
