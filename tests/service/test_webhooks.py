"""Webhooks against a real HTTP receiver on a local port: a job's end, however it ends (the
worker's run, a cancel, the reconciler failing an abandoned job), is POSTed once, signed with
the tenant's secret; a receiver that fails is retried, then given up on; URLs the server may not
reach are refused when the job is created, and again when a name resolves to one."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import select, update

from mola.webhooks import WebhookVerificationError, verify
from service import jobs as job_service
from service import webhooks
from service.db import session_scope
from service.models import WebhookDelivery, utcnow
from service.reconcile import reconcile
from tests.service.conftest import auth, job_body, make_dataset
from tests.service.test_reconcile import Broker

OWNER = "test-worker"


class Receiver:
    """An HTTP server on a free local port that records each request (headers and body) and
    answers each with the next status of ``answers`` (the last one repeats)."""

    def __init__(self, answers: list[int] = [204]) -> None:  # noqa: B006 - read only
        self.requests: list[dict[str, Any]] = []
        self.answers = list(answers)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status = receiver.answers.pop(0) if len(receiver.answers) > 1 else receiver.answers[0]
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "http://127.0.0.1:1/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/mola"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(answers: list[int] = [204]) -> Receiver:  # noqa: B006 - read only
        made.append(Receiver(answers))
        return made[-1]

    yield make
    for server in made:
        server.close()


def _create(client, key, url: str | None, **overrides) -> str:
    response = client.post("/jobs", headers=auth(key), json=job_body(make_dataset(client, key), webhook_url=url, **overrides))
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _deliveries(client, key, job_id: str) -> list[dict]:
    response = client.get(f"/jobs/{job_id}/webhooks", headers=auth(key))
    assert response.status_code == 200, response.text
    return response.json()["data"]


def _secret(client, key) -> str:
    return client.get("/webhooks/secret", headers=auth(key)).json()["secret"]


def _due_now(sessions) -> None:
    """The retries' time has come (the test moves the clock, not the code)."""
    with session_scope(sessions) as session:
        session.execute(update(WebhookDelivery).where(WebhookDelivery.status == "pending").values(next_attempt_at=utcnow() - timedelta(seconds=1)))


@pytest.mark.slow
def test_a_finished_run_posts_one_signed_event(client, key, settings, sessions, receiver):
    runner = pytest.importorskip("worker.runner")
    hooks = receiver()
    job_id = _create(client, key, hooks.url, hyperparameters={"max_steps": 2, "batch_size": 2, "micro_batch_size": 2})
    assert client.get(f"/jobs/{job_id}", headers=auth(key)).json()["webhook_url"] == hooks.url
    assert _deliveries(client, key, job_id) == []

    asked = []
    runner.Resources.of(settings).queue.enqueue_webhooks = lambda: asked.append(job_id)  # the broker's send, seen
    assert runner.run_job(job_id, settings) == "succeeded"
    assert asked == [job_id]  # the worker asked the quick workers to send it, after its commit
    (pending,) = _deliveries(client, key, job_id)
    assert (pending["event"], pending["status"], pending["attempts"], pending["url"]) == ("job.succeeded", "pending", 0, hooks.url)

    assert webhooks.send_due(settings, sessions) == {pending["id"]: "delivered"}
    (request,) = hooks.requests
    assert request["path"] == "/hooks/mola" and request["headers"]["Content-Type"] == "application/json"
    event = verify(_secret(client, key), request["headers"], request["body"])
    assert (event["id"], event["type"]) == (pending["id"], "job.succeeded") == (request["headers"]["webhook-id"], "job.succeeded")
    job = client.get(f"/jobs/{job_id}", headers=auth(key)).json()
    assert event["data"] == {
        "job_id": job_id, "status": "succeeded", "error": None, "error_kind": None, "step": 2, "total_steps": 2,
        "finished_at": job["finished_at"], "adapter_available": True, "train": job["result"]["train"], "eval": job["result"]["eval"],
    }  # fmt: skip
    assert event["data"]["train"]["step"] == 2 and event["data"]["train"]["loss"] > 0
    (delivered,) = _deliveries(client, key, job_id)
    assert (delivered["status"], delivered["attempts"], delivered["response_status"], delivered["next_attempt_at"]) == ("delivered", 1, 204, None)
    assert delivered["delivered_at"] is not None and delivered["payload"] == event
    # Sent once: nothing is due any more.
    assert webhooks.send_due(settings, sessions) == {} and len(hooks.requests) == 1
    # Another secret did not sign it; a changed body does not match.
    with pytest.raises(WebhookVerificationError, match="does not match"):
        verify(_secret(client, key).replace("whsec_", "whsec_A", 1)[:50] + "=", request["headers"], request["body"])
    with pytest.raises(WebhookVerificationError, match="does not match"):
        verify(_secret(client, key), request["headers"], request["body"].replace(b"succeeded", b"failed"))


def test_a_cancelled_job_s_receiver_that_fails_is_retried_then_given_up(client, key, settings, sessions, queue, receiver):
    settings = settings.model_copy(update={"webhook_max_attempts": 3})
    hooks = receiver([500, 307, 503])
    job_id = _create(client, key, hooks.url)
    assert client.post(f"/jobs/{job_id}/cancel", headers=auth(key)).json()["status"] == "cancelled"
    assert queue.webhook_sends == 1  # asked for at once, after the commit

    (first,) = webhooks.send_due(settings, sessions).values()
    (delivery,) = _deliveries(client, key, job_id)
    assert (first, delivery["attempts"], delivery["response_status"], delivery["last_error"]) == ("pending", 1, 500, "the receiver answered 500")
    # The next attempt waits 30 s (then 60, doubling up to an hour): nothing is due before.
    def moment(value: str) -> datetime:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))

    # 30 s after the attempt, which came after the event was made (and, on a slow machine, a while after).
    wait = moment(delivery["next_attempt_at"]) - moment(delivery["created_at"])
    assert timedelta(seconds=30) <= wait < timedelta(seconds=60) and moment(delivery["next_attempt_at"]) > utcnow()
    assert webhooks.retry_delay(2) == 60 and webhooks.retry_delay(20) == 3600
    assert webhooks.send_due(settings, sessions) == {} and len(hooks.requests) == 1

    _due_now(sessions)
    assert list(webhooks.send_due(settings, sessions).values()) == ["pending"]
    (delivery,) = _deliveries(client, key, job_id)
    assert delivery["last_error"] == "the receiver answered 307 (redirects are not followed: give the final URL)"
    _due_now(sessions)
    assert list(webhooks.send_due(settings, sessions).values()) == ["failed"]
    (delivery,) = _deliveries(client, key, job_id)
    assert (delivery["status"], delivery["attempts"], delivery["response_status"], delivery["next_attempt_at"]) == ("failed", 3, 503, None)
    # Every attempt carried the same event id, for the receiver to deduplicate on.
    assert {r["headers"]["webhook-id"] for r in hooks.requests} == {delivery["id"]} and len(hooks.requests) == 3
    assert json.loads(hooks.requests[0]["body"])["type"] == "job.cancelled"
    _due_now(sessions)
    assert webhooks.send_due(settings, sessions) == {}


def test_an_abandoned_job_failed_by_the_reconciler_has_its_event_sent(client, key, settings, sessions, receiver):
    hooks = receiver()
    job_id = _create(client, key, hooks.url)
    settings = settings.model_copy(update={"max_attempts": 1})
    with session_scope(sessions) as session:
        assert job_service.claim_job(session, job_id, OWNER, -1) is not None  # its lease has run out
    broker = Broker()
    report = reconcile(settings, sessions, broker)
    assert report.failed == [job_id] and report.webhooks_due == 1 and broker.webhook_sends == 1
    webhooks.send_due(settings, sessions)
    event = verify(_secret(client, key), hooks.requests[0]["headers"], hooks.requests[0]["body"])
    assert (event["type"], event["data"]["error_kind"], event["data"]["adapter_available"]) == ("job.failed", "abandoned", False)
    assert (event["data"]["train"], event["data"]["eval"]) == (None, None)
    # Delivered: the next pass asks for nothing.
    assert reconcile(settings, sessions, broker).webhooks_due == 0 and broker.webhook_sends == 1


def test_a_job_without_a_webhook_url_sends_nothing(client, key, settings, sessions, queue):
    job_id = _create(client, key, None)
    client.post(f"/jobs/{job_id}/cancel", headers=auth(key))
    assert queue.webhook_sends == 0 and _deliveries(client, key, job_id) == []
    with sessions() as session:
        assert session.scalars(select(WebhookDelivery)).all() == []


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/hook", "is not an http:// or https:// URL with a host"),
        ("https:///hook", "is not an http:// or https:// URL with a host"),
        ("https://user:pass@example.com/hook", "credentials in the URL would be stored with the job"),
        ("http://169.254.169.254/latest/meta-data", "169.254.169.254 is a link-local, multicast or reserved address"),
        ("http://[::ffff:a9fe:a9fe]/x", "is a link-local, multicast or reserved address"),
        ("http://example.com:99999/x", "not a URL"),
    ],
)
def test_a_url_the_server_will_not_send_to_is_a_422(client, key, url, message):
    body = job_body(make_dataset(client, key), webhook_url=url)
    for path in ("/jobs", "/jobs/plan"):
        response = client.post(path, headers=auth(key), json=body)
        assert response.status_code == 422, response.text
        assert response.json()["errors"][0]["field"] == "body.webhook_url" and message in response.json()["detail"]


def test_private_addresses_are_refused_where_the_operator_says_so(client, key, settings, sessions, receiver):
    client.app.state.settings = client.app.state.settings.model_copy(update={"webhook_private_addresses": False})
    response = client.post("/jobs", headers=auth(key), json=job_body(make_dataset(client, key), webhook_url="http://10.1.2.3/hook"))
    assert response.status_code == 422 and "10.1.2.3 is a loopback or private-network address" in response.json()["detail"]
    assert "MOLA_WEBHOOK_PRIVATE_ADDRESSES=false" in response.json()["detail"]

    # A name is checked against what it resolves to, at each attempt: refused, with no retry.
    hooks = receiver()
    job_id = _create(client, key, hooks.url.replace("127.0.0.1", "localhost"))
    client.post(f"/jobs/{job_id}/cancel", headers=auth(key))
    production = settings.model_copy(update={"webhook_private_addresses": False})
    assert list(webhooks.send_due(production, sessions).values()) == ["failed"]
    (delivery,) = _deliveries(client, key, job_id)
    assert delivery["attempts"] == 1 and delivery["last_error"].startswith("localhost resolves to ")
    assert hooks.requests == []
    # Local mode (the default) reaches this machine: `make serve` with a receiver beside it.
    assert settings.mode == "local" and settings.webhooks_reach_private


def test_the_secret_is_the_tenant_s_own_and_rotates(client, key, other_key, settings, sessions, receiver):
    first = _secret(client, key)
    assert first.startswith("whsec_") and _secret(client, key) == first and _secret(client, other_key) != first
    hooks = receiver()
    job_id = _create(client, key, hooks.url)
    client.post(f"/jobs/{job_id}/cancel", headers=auth(key))
    rotated = client.post("/webhooks/secret/rotate", headers=auth(key)).json()["secret"]
    assert rotated != first and _secret(client, key) == rotated
    webhooks.send_due(settings, sessions)  # an event from before the rotation: signed with the new secret
    request = hooks.requests[0]
    assert verify(rotated, request["headers"], request["body"])["data"]["job_id"] == job_id
    with pytest.raises(WebhookVerificationError):
        verify(first, request["headers"], request["body"])
    with pytest.raises(WebhookVerificationError, match="more than 300 s away"):
        verify(rotated, request["headers"], request["body"], now=int(request["headers"]["webhook-timestamp"]) + 301)
    with pytest.raises(WebhookVerificationError, match="no webhook-id header"):
        verify(rotated, {}, request["body"])


def test_deleting_a_job_deletes_its_unsent_events(client, key, settings, sessions, receiver):
    hooks = receiver()
    job_id = _create(client, key, hooks.url)
    client.post(f"/jobs/{job_id}/cancel", headers=auth(key))
    assert client.delete(f"/jobs/{job_id}", headers=auth(key)).status_code == 204
    assert webhooks.send_due(settings, sessions) == {} and hooks.requests == []


def test_a_receiver_can_be_tried_with_a_signed_ping(client, key, receiver):
    hooks, failing = receiver([204]), receiver([503])
    response = client.post("/webhooks/test", headers=auth(key), json={"url": hooks.url})
    assert response.status_code == 200, response.text
    result = response.json()
    assert (result["delivered"], result["response_status"], result["error"], result["url"]) == (True, 204, None, hooks.url)
    event = verify(_secret(client, key), hooks.requests[0]["headers"], hooks.requests[0]["body"])
    assert (event["id"], event["type"], event["data"]) == (result["id"], "ping", {})

    result = client.post("/webhooks/test", headers=auth(key), json={"url": failing.url}).json()
    assert (result["delivered"], result["response_status"], result["error"]) == (False, 503, "the receiver answered 503")
    closed = hooks.url.rsplit(":", 1)[0] + ":9/nobody"  # the discard port: nothing listens
    result = client.post("/webhooks/test", headers=auth(key), json={"url": closed}).json()
    assert result["delivered"] is False and result["response_status"] is None and result["error"].startswith("ConnectError")

    refused = client.post("/webhooks/test", headers=auth(key), json={"url": "http://169.254.169.254/"})
    assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "body.url"
    client.app.state.settings = client.app.state.settings.model_copy(update={"webhook_private_addresses": False})
    named = client.post("/webhooks/test", headers=auth(key), json={"url": hooks.url.replace("127.0.0.1", "localhost")}).json()
    assert named["delivered"] is False and named["error"].startswith("localhost resolves to ")
    assert len(hooks.requests) == 1  # nothing recorded, nothing retried
    with client.app.state.sessionmaker() as session:
        assert session.scalars(select(WebhookDelivery)).all() == []


def test_a_sender_takes_the_due_events_oldest_first_up_to_its_limit(client, key, settings, sessions, receiver):
    hooks = receiver()
    first, second = _create(client, key, hooks.url), _create(client, key, hooks.url)
    for job_id in (first, second):
        client.post(f"/jobs/{job_id}/cancel", headers=auth(key))
    (sent,) = webhooks.send_due(settings, sessions, limit=1)
    assert _deliveries(client, key, first)[0]["id"] == sent
    assert list(webhooks.send_due(settings, sessions).values()) == ["delivered"]
    assert [json.loads(r["body"])["data"]["job_id"] for r in hooks.requests] == [first, second]
