"""Reconciling the broker with the database, which is the source of truth for every job.

Two things go wrong between them, and one pass of `reconcile` repairs both (and re-sends the
token counts of uploads whose quick-queue message was lost, see the end of `reconcile`; does
the same for generations, `service/generations.py`, on the training queue unless
`MOLA_GENERATION_QUEUE` names another; and asks the quick workers to send the webhooks that
are due, first attempts whose message was lost and retries, `service/webhooks.py`):

- A running job whose lease expired lost its worker (killed, out of memory, machine gone, or
  hung past its heartbeats). It goes back to `queued` and is enqueued again, and the next worker
  resumes it from its last checkpoint; after `max_attempts` such runs it fails with an error
  that says so. (`service.jobs.recover_expired_leases`.)
- A queued job that nobody claimed for `requeue_after_seconds` may have no message: the broker
  restarted without persistence, or the API died between its commit and the enqueue. When the
  broker holds fewer waiting messages than there are queued jobs, those jobs are enqueued again.
  A job waiting behind a busy worker is not, so long queues do not fill with copies.

Every worker runs a `ReconcilerThread` (started by `worker/tasks.py` when it is ready), and
`mola serve` runs one pass at start-up; `mola reconcile` runs it by hand or in a loop. Any
number of them may run at once: each change is a conditional UPDATE, so one reconciler wins
each job, and an extra message is harmless because a worker only claims a job that is queued.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service import datasets as dataset_service
from service import generations as generation_service
from service import jobs as job_service
from service import webhooks, workers
from service.db import session_scope
from service.models import Job
from service.queue import CeleryQueue
from service.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class Report:
    requeued: list[str] = field(default_factory=list)  # expired leases, back to queued
    failed: list[str] = field(default_factory=list)  # expired leases, out of attempts
    enqueued: list[str] = field(default_factory=list)  # messages sent
    token_counts: list[str] = field(default_factory=list)  # datasets whose count was asked again
    generations: list[str] = field(default_factory=list)  # queued generations sent again
    abandoned_generations: list[str] = field(default_factory=list)  # running ones whose worker stopped, failed
    webhooks_due: int = 0  # webhook deliveries due, for which the quick workers were asked

    def __bool__(self) -> bool:
        return bool(
            self.requeued or self.failed or self.enqueued or self.token_counts or self.generations or self.abandoned_generations or self.webhooks_due
        )


def reconcile(settings: Settings, sessions: sessionmaker[Session], queue: CeleryQueue, requeue_after_seconds: float | None = None) -> Report:
    """One pass; see the module's docstring. ``requeue_after_seconds`` overrides the setting
    (`mola serve` passes 0 at start-up: nothing is waiting in a broker that just started)."""
    report = Report()
    with session_scope(sessions) as session:
        report.requeued, report.failed = job_service.recover_expired_leases(session, settings.max_attempts)
    for job_id in report.failed:
        logger.error("job %s: its worker stopped %d times; failed", job_id, settings.max_attempts)
    to_send = list(report.requeued)

    after = settings.requeue_after_seconds if requeue_after_seconds is None else requeue_after_seconds
    with session_scope(sessions) as session:
        queued_jobs = session.scalar(select(func.count()).select_from(Job).where(Job.status == "queued")) - len(to_send)
        queued_generations = generation_service.queued_count(session)
    if settings.generations_queue == settings.queue:
        # Generations share the training queue (by default: they need its GPU), so its
        # messages count both.
        jobs_lost = generations_lost = _messages_lost(queue, settings.queue, queued_jobs + queued_generations)
    else:
        jobs_lost = _messages_lost(queue, settings.queue, queued_jobs)
        generations_lost = _messages_lost(queue, settings.generations_queue, queued_generations)
    if jobs_lost or generations_lost:
        with session_scope(sessions) as session:
            stale = job_service.touch_stale_queued(session, after) if jobs_lost else []
            report.generations = generation_service.touch_stale(session, after) if generations_lost else []
        to_send += [job_id for job_id in stale if job_id not in to_send]
        if stale or report.generations:
            logger.warning(
                "%d queued job(s) and %d generation(s), fewer messages waiting: enqueuing %d job(s) and %d generation(s) again",
                queued_jobs, queued_generations, len(stale), len(report.generations),
            )  # fmt: skip

    for job_id in to_send:  # after the commits, like the API
        queue.enqueue_training(job_id)
        report.enqueued.append(job_id)
    for generation_id in report.generations:
        queue.enqueue_generation(generation_id)
    with session_scope(sessions) as session:
        report.abandoned_generations = generation_service.fail_abandoned(session)
    if report.abandoned_generations:
        logger.warning("failed %d generation(s) whose worker stopped: %s", len(report.abandoned_generations), ", ".join(report.abandoned_generations))

    # Token counts run on the quick queue, whose messages can be lost the same way; a count is
    # cheap and idempotent, so a pending one that waited too long is simply asked for again.
    with session_scope(sessions) as session:
        report.token_counts = dataset_service.touch_stale_token_counts(session, after)
    for dataset_id in report.token_counts:
        queue.enqueue_token_count(dataset_id)
    if report.token_counts:
        logger.warning("asked again for the token counts of %d dataset(s): %s", len(report.token_counts), ", ".join(report.token_counts))
    if report.requeued:
        logger.warning("re-queued %d job(s) whose worker stopped: %s", len(report.requeued), ", ".join(report.requeued))

    # Jobs this pass ended, retries whose time has come, first attempts whose message was lost.
    with session_scope(sessions) as session:
        report.webhooks_due = webhooks.due_count(session)
    if report.webhooks_due:
        queue.enqueue_webhooks()
    return report


def _messages_lost(queue: CeleryQueue, name: str, queued: int) -> bool:
    """Whether the broker's queue ``name`` holds fewer messages than the ``queued`` rows that
    go there: some were lost (a message a worker has taken is not counted, nor is its row)."""
    return queued > 0 and queue.waiting(name) < queued


class ReconcilerThread(threading.Thread):
    """Runs `reconcile` every `reconcile_seconds`, the first pass at once, until stopped. A
    failed pass (database or broker down) is logged and retried at the next one. Given a
    ``worker_id``, each pass also records that worker as alive on its ``queues``
    (`service.workers`), and `stop` deletes the record."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        queue: CeleryQueue | None = None,
        worker_id: str | None = None,
        queues: list[str] | None = None,
    ) -> None:
        super().__init__(name="mola-reconciler", daemon=True)
        self.settings, self.sessions = settings, sessions
        self.queue = queue or CeleryQueue(settings)
        self.worker_id, self.queues = worker_id, list(queues or [])
        self.done = threading.Event()

    def run(self) -> None:
        while True:
            if self.worker_id is not None:
                try:
                    with session_scope(self.sessions) as session:
                        workers.beat(session, self.worker_id, self.queues)
                except Exception:
                    logger.warning("could not record worker %s as alive; retrying in %.0f s", self.worker_id, self.settings.reconcile_seconds, exc_info=True)
            try:
                reconcile(self.settings, self.sessions, self.queue)
            except Exception:
                logger.warning("reconciliation failed; retrying in %.0f s", self.settings.reconcile_seconds, exc_info=True)
            if self.done.wait(self.settings.reconcile_seconds):
                return

    def stop(self) -> None:
        self.done.set()
        if self.worker_id is not None:
            if self.is_alive() and threading.current_thread() is not self:
                self.join(timeout=5)  # a pass under way would write the row again after its deletion
            try:
                with session_scope(self.sessions) as session:
                    workers.forget(session, self.worker_id)
            except Exception:  # noqa: BLE001 - the row expires by itself; stopping goes on
                logger.warning("could not delete worker %s's record; it expires unseen", self.worker_id, exc_info=True)
