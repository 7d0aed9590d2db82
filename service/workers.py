"""Who consumes which queue, and what waits there (GET /queues; a queued job's or generation's
`queue`).

Each worker writes its row (`Worker`: its queues, when last seen) at every reconciler pass,
every `MOLA_RECONCILE_SECONDS`, and deletes it when it stops. A worker not seen for three
passes is counted as gone: it died without saying so, or cannot reach the database. Rows not
seen for a day are deleted by the next live worker's pass.

So a user whose job waits can tell "two jobs ahead of it, one worker" from "no worker consumes
this queue" (with `MOLA_GENERATION_QUEUE` set and no worker on it, generations would wait
forever).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy.orm import Session

from service import webhooks
from service.models import Dataset, Generation, Job, Worker, utcnow
from service.settings import Settings

FORGOTTEN_AFTER = timedelta(days=1)


def seen_since(settings: Settings, now: datetime | None = None) -> datetime:
    """A worker last seen before this is gone: three reconciler passes, and a little for a slow one."""
    return (now or utcnow()) - timedelta(seconds=3 * settings.reconcile_seconds + 10)


def beat(session: Session, worker_id: str, queues: list[str], now: datetime | None = None) -> None:
    """The worker ``worker_id`` is alive and consumes ``queues``."""
    now = now or utcnow()
    row = session.get(Worker, worker_id)
    if row is None:
        session.add(Worker(id=worker_id, queues=sorted(queues), started_at=now, seen_at=now))
    else:
        row.queues, row.seen_at = sorted(queues), now
    session.execute(delete(Worker).where(Worker.seen_at < now - FORGOTTEN_AFTER))


def forget(session: Session, worker_id: str) -> None:
    """The worker stops: its queues lose a consumer now, not three passes later."""
    session.execute(delete(Worker).where(Worker.id == worker_id))


def consumers(session: Session, settings: Settings, now: datetime | None = None) -> dict[str, int]:
    """Live workers per queue name."""
    counts: dict[str, int] = {}
    for queues in session.scalars(select(Worker.queues).where(Worker.seen_at >= seen_since(settings, now))):
        for name in queues:
            counts[name] = counts.get(name, 0) + 1
    return counts


def _carries(settings: Settings) -> dict[str, list[str]]:
    """Queue name -> what goes there ("jobs", "generations", "token counts", "webhooks")."""
    carries: dict[str, list[str]] = {}
    for name, what in (
        (settings.queue, "jobs"),
        (settings.generations_queue, "generations"),
        (settings.quick_queue, "token counts"),
        (settings.quick_queue, "webhooks"),
    ):
        carries.setdefault(name, []).append(what)
    return carries


def _count(session: Session, model: Any, *where: Any) -> int:
    return session.scalar(select(func.count()).select_from(model).where(*where)) or 0


def _waiting(session: Session, what: str, before: tuple[datetime, str] | None = None) -> int:
    """Queued ``what`` across tenants; with ``before`` (time, id), only those that went to the
    queue earlier: jobs by `Job.queued_at` (a resumed job goes to the back), generations by
    their creation (they go to the queue once)."""
    if what == "token counts":
        return _count(session, Dataset, Dataset.token_counts_status == "pending", Dataset.deleted_at.is_(None))
    if what == "webhooks":  # due now (a retry waiting for its time does not wait for a worker)
        return webhooks.due_count(session)
    model = Job if what == "jobs" else Generation
    where = [model.status == "queued"] + ([Job.deleted_at.is_(None)] if model is Job else [])
    if before is not None:
        at, row_id = before
        queued_at = Job.queued_at if model is Job else Generation.created_at
        where.append(or_(queued_at < at, and_(queued_at == at, model.id < row_id)))
    return _count(session, model, *where)


def _running(session: Session, what: str) -> int | None:
    if what in ("token counts", "webhooks"):
        return None  # not recorded: one takes seconds
    model = Job if what == "jobs" else Generation
    return _count(session, model, model.status == "running")


def queue_states(session: Session, settings: Settings) -> list[dict[str, Any]]:
    """Each queue the service uses: what goes there, its live workers, what waits and runs."""
    workers = consumers(session, settings)
    states = []
    for name, carries in _carries(settings).items():
        running = [_running(session, what) for what in carries]
        states.append({
            "name": name,
            "carries": carries,
            "workers": workers.get(name, 0),
            "waiting": sum(_waiting(session, what) for what in carries),
            "running": None if all(r is None for r in running) else sum(r or 0 for r in running),
        })  # fmt: skip
    return states


def _queued_at(row: Job | Generation) -> datetime:
    return row.queued_at if isinstance(row, Job) else row.created_at


def place_in_queue(session: Session, settings: Settings, row: Job | Generation) -> dict[str, Any] | None:
    """Where a queued job or generation stands: its queue's name and live workers, how many
    queued jobs and generations went to that queue before it (all tenants; the broker serves
    about in that order), and how many run now. None once it is not queued."""
    if row.status != "queued":
        return None
    name = settings.queue if isinstance(row, Job) else settings.generations_queue
    carries = [what for what in _carries(settings)[name] if what not in ("token counts", "webhooks")]
    return {
        "name": name,
        "workers": consumers(session, settings).get(name, 0),
        "ahead": sum(_waiting(session, what, (_queued_at(row), row.id)) for what in carries),
        "running": sum(_running(session, what) or 0 for what in carries),
    }
