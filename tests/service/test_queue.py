"""A Redis broker that accepts connections and never answers (hung, failing over, behind a dead
NAT entry) must not hang whoever sends to it: the send fails after `broker_timeout_seconds`
(and one retry), POST /jobs still answers 201 with the job queued (the reconciler sends it
later), and the reconciler's own pass fails instead of blocking its thread."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from service.queue import CeleryQueue
from service.reconcile import reconcile
from tests.service.conftest import auth, job_body, make_dataset

# Far above the ~1 s a send takes to give up here: only a hang reaches it.
HANG = 60.0


@pytest.fixture
def silent_broker() -> Iterator[str]:
    """redis://... of a server that accepts every connection and never sends a byte."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not done.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    done.set()
    thread.join()
    for connection in accepted:
        connection.close()
    server.close()


@pytest.fixture
def queue(settings, silent_broker) -> CeleryQueue:
    """The real Celery queue, on the silent broker (replaces conftest's recording queue)."""
    return CeleryQueue(settings.model_copy(update={"broker_url": silent_broker, "broker_timeout_seconds": 0.3}))


def _within(seconds: float, call) -> BaseException | None:
    """Run ``call`` in a thread; what it raised, or a failure if it was still running."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds:.0f} s"
    return outcome[0]


def test_a_send_to_a_silent_broker_fails_instead_of_hanging(queue):
    assert isinstance(_within(HANG, lambda: queue.enqueue_training("job_x")), Exception)
    assert isinstance(_within(HANG, lambda: queue.enqueue_token_count("ds_x")), Exception)
    assert isinstance(_within(HANG, queue.waiting), Exception)


def test_post_jobs_answers_while_the_broker_is_silent(client, key):
    dataset_id = make_dataset(client, key)
    responses = []
    assert _within(HANG, lambda: responses.append(client.post("/jobs", headers=auth(key), json=job_body(dataset_id)))) is None
    assert responses[0].status_code == 201, responses[0].text
    assert responses[0].json()["status"] == "queued"


def test_a_reconciler_pass_fails_instead_of_hanging(client, key, settings, sessions, queue):
    dataset_id = make_dataset(client, key)
    assert client.post("/jobs", headers=auth(key), json=job_body(dataset_id)).status_code == 201
    # One queued job, and the broker cannot say how many messages wait: the pass must end.
    assert isinstance(_within(HANG, lambda: reconcile(settings, sessions, queue, requeue_after_seconds=0)), Exception)
