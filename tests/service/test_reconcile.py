"""Recovery of jobs on SQLite: expired leases re-queued or failed after the last attempt, queued
jobs enqueued again only when the broker lost their messages, a resumed run's metrics. The
same code against real servers and real worker deaths: tests/integration/test_failures.py."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update

from service import jobs as job_service
from service.db import session_scope
from service.models import Dataset, Job, JobMetric, utcnow
from service.reconcile import reconcile
from tests.service.conftest import auth, job_body, make_dataset


class Broker:
    """The broker as the reconciler sees it: messages waiting, and what it sends. Generations
    share the training queue's messages unless ``generation_queue`` names a queue of their own."""

    def __init__(self, waiting: int = 0, generation_queue: str | None = None) -> None:
        self.messages = waiting
        self.generation_queue, self.generation_messages = generation_queue, 0
        self.enqueued: list[str] = []
        self.counted: list[str] = []
        self.generations: list[str] = []
        self.webhook_sends = 0

    def enqueue_webhooks(self) -> None:
        self.webhook_sends += 1

    def waiting(self, queue: str | None = None) -> int:
        return self.generation_messages if queue is not None and queue == self.generation_queue else self.messages

    def enqueue_training(self, job_id: str) -> None:
        self.enqueued.append(job_id)
        self.messages += 1

    def enqueue_token_count(self, dataset_id: str) -> None:
        self.counted.append(dataset_id)

    def enqueue_generation(self, generation_id: str) -> None:
        self.generations.append(generation_id)
        if self.generation_queue:
            self.generation_messages += 1
        else:
            self.messages += 1


def _jobs(client, key, n: int = 1) -> list[str]:
    dataset_id = make_dataset(client, key)
    return [client.post("/jobs", headers=auth(key), json=job_body(dataset_id)).json()["id"] for _ in range(n)]


def _run(sessions, job_id: str, owner: str, lease_seconds: float = 60) -> None:
    with session_scope(sessions) as session:
        assert job_service.claim_job(session, job_id, owner, lease_seconds) is not None


def _job(sessions, job_id: str) -> Job:
    with sessions() as session:
        return session.get(Job, job_id)


def _age(sessions, job_id: str, seconds: float) -> None:
    with session_scope(sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow() - timedelta(seconds=seconds)))


def test_an_expired_lease_is_requeued_and_enqueued(client, key, settings, sessions):
    dead, alive = _jobs(client, key, 2)
    _run(sessions, dead, "host:1:a", lease_seconds=-1)
    _run(sessions, alive, "host:2:b")
    broker = Broker()
    report = reconcile(settings, sessions, broker)
    assert report.requeued == [dead] and report.enqueued == [dead] and broker.enqueued == [dead]
    job = _job(sessions, dead)
    assert job.status == "queued" and job.lease_owner is None and job.attempts == 1
    assert _job(sessions, alive).status == "running"
    assert not reconcile(settings, sessions, broker)  # nothing left to do
    _run(sessions, dead, "host:3:c")
    assert _job(sessions, dead).attempts == 2


def test_the_last_attempt_fails_with_a_clear_error(client, key, settings, sessions):
    (job_id,) = _jobs(client, key)
    settings = settings.model_copy(update={"max_attempts": 2})
    broker = Broker()
    for attempt in (1, 2):
        _run(sessions, job_id, f"host:{attempt}:x", lease_seconds=-1)
        report = reconcile(settings, sessions, broker)
    assert report.failed == [job_id] and broker.enqueued == [job_id]
    job = _job(sessions, job_id)
    assert job.status == "failed" and job.finished_at is not None and job.attempts == 2
    assert "stopped without finishing it 2 time(s)" in job.error and "MOLA_MAX_ATTEMPTS=2" in job.error
    assert job.error_kind == "abandoned"


def test_a_pending_cancel_ends_an_abandoned_job(client, key, settings, sessions):
    (job_id,) = _jobs(client, key)
    _run(sessions, job_id, "host:1:a", lease_seconds=-1)
    with session_scope(sessions) as session:
        job_service.cancel_job(session, session.get(Job, job_id))
    broker = Broker()
    reconcile(settings, sessions, broker)
    assert _job(sessions, job_id).status == "cancelled" and broker.enqueued == []


def test_a_warm_shutdown_gives_the_attempt_back(client, key, sessions):
    (job_id,) = _jobs(client, key)
    _run(sessions, job_id, "w1")
    before = _job(sessions, job_id).queued_at
    with session_scope(sessions) as session:
        assert job_service.release_job(session, job_id, "w1")
    job = _job(sessions, job_id)
    assert job.status == "queued" and job.attempts == 0
    assert job.queued_at > before  # back to the queue: behind what went there meanwhile


def test_a_delivery_takes_over_a_stale_lease_only(client, key, settings, sessions):
    (job_id,) = _jobs(client, key)
    _run(sessions, job_id, "w1")
    with session_scope(sessions) as session:  # a live lease: the second delivery is a no-op
        assert job_service.recover_expired_leases(session, 3, job_id) == ([], [])
        assert job_service.claim_job(session, job_id, "w2", 60) is None
        session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
        first_queued = session.get(Job, job_id).queued_at
        assert job_service.recover_expired_leases(session, 3, job_id) == ([job_id], [])
        session.expire_all()
        assert session.get(Job, job_id).queued_at > first_queued
        assert job_service.claim_job(session, job_id, "w2", 60).lease_owner == "w2"
        assert not job_service.heartbeat(session, job_id, "w1", 60)  # the old owner can write nothing


def test_queued_jobs_are_enqueued_again_only_when_the_broker_lost_them(client, key, settings, sessions):
    settings = settings.model_copy(update={"requeue_after_seconds": 60})
    old, new = _jobs(client, key, 2)
    _age(sessions, old, 120)
    broker = Broker(waiting=2)  # both messages are there: a busy worker, not a lost message
    assert not reconcile(settings, sessions, broker)
    broker.messages = 0  # the broker restarted without persistence
    assert reconcile(settings, sessions, broker).enqueued == [old]  # `new` is not stale yet
    broker.messages = 0
    assert reconcile(settings, sessions, broker).enqueued == []  # not again before another 60 s
    _age(sessions, old, 120)
    _age(sessions, new, 120)
    assert reconcile(settings, sessions, broker).enqueued == [old, new]


def test_concurrent_reconcilers_enqueue_a_lost_job_once(client, key, settings, sessions):
    settings = settings.model_copy(update={"requeue_after_seconds": 60})
    (job_id,) = _jobs(client, key)
    _age(sessions, job_id, 120)
    first, second = Broker(), Broker()
    reconcile(settings, sessions, first)
    reconcile(settings, sessions, second)
    assert first.enqueued + second.enqueued == [job_id]


def test_a_dead_worker_s_leases_end_at_once(client, key, settings, sessions):
    mine, other = _jobs(client, key, 2)
    _run(sessions, mine, "host:123:abcd")
    _run(sessions, other, "host:1234:abcd")
    with session_scope(sessions) as session:
        assert job_service.expire_leases_of_worker(session, "host:123:") == [mine]
    assert reconcile(settings, sessions, Broker()).requeued == [mine]
    assert _job(sessions, other).status == "running"


def test_a_resumed_run_replaces_the_metrics_after_its_checkpoint(client, key, sessions):
    (job_id,) = _jobs(client, key)
    rows = [{"step": s, "kind": "train", "values": {"loss": 1.0}} for s in range(1, 8)]
    rows += [{"step": s, "kind": "eval", "values": {"eval_loss": 1.0}} for s in (4, 6)]
    with session_scope(sessions) as session:
        job_service.record_metrics(session, job_id, rows)
        assert job_service.prepare_resume(session, job_id, 4) == 4  # train 5, 6, 7 and eval 6
    with sessions() as session:
        kept = session.execute(select(JobMetric.step, JobMetric.kind).where(JobMetric.job_id == job_id).order_by(JobMetric.step, JobMetric.kind)).all()
        assert kept == [(1, "train"), (2, "train"), (3, "train"), (4, "eval"), (4, "train")]
        assert session.get(Job, job_id).step == 4


def test_a_pending_token_count_is_asked_for_again_once_it_waited_too_long(client, key, settings, sessions):
    waiting, done = make_dataset(client, key), make_dataset(client, key, rows=[{"prompt": "Say hi. ", "completion": "hi"}])
    with session_scope(sessions) as session:
        session.execute(update(Dataset).where(Dataset.id == done).values(token_counts_status="ready"))
    broker = Broker()
    assert reconcile(settings, sessions, broker).token_counts == []  # asked for just now
    with session_scope(sessions) as session:
        long_ago = utcnow() - timedelta(seconds=settings.requeue_after_seconds + 1)
        session.execute(update(Dataset).values(token_counts_requested_at=long_ago))
    report = reconcile(settings, sessions, broker)
    assert report.token_counts == [waiting] and broker.counted == [waiting]
    assert reconcile(settings, sessions, broker).token_counts == []  # marked: waits as long again
    with sessions() as session:
        assert session.get(Dataset, waiting).token_counts_requested_at > long_ago
