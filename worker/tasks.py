"""Celery tasks: take a job id, let the runner re-read the row and do the work. Signal handlers
start the reconciler thread when the worker is ready and stop the running job at a warm
shutdown."""

from __future__ import annotations

import logging

from celery import shared_task
from celery.exceptions import Reject
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from service.queue import COUNT_TOKENS_TASK, GENERATE_TASK, SEND_WEBHOOKS_TASK, TRAIN_TASK
from service.settings import get_settings

logger = logging.getLogger(__name__)

_reconciler = None


class _RejectWithoutTraceback(logging.Filter):
    """Celery logs a rejected task at WARNING with a traceback. Here a rejection is routine (a
    message taken while the worker stops goes back to the broker, as at every Ctrl-C of `mola
    serve`): its one line says all there is to say."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], Reject):
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("celery.app.trace").addFilter(_RejectWithoutTraceback())


@shared_task(name=TRAIN_TASK, acks_late=True, ignore_result=True)
def train_job(job_id: str) -> str:
    from worker import runner  # torch and mola load in the run, in the worker process

    if runner.SHUTDOWN.is_set():  # taken on the way out: back to the broker for another worker
        raise Reject("worker shutting down", requeue=True)
    return runner.run_job(job_id, get_settings())


@shared_task(name=GENERATE_TASK, acks_late=True, ignore_result=True)
def generate(generation_id: str) -> str:
    """Completions of a finished job's adapter (the training queue, which has the GPU, unless
    MOLA_GENERATION_QUEUE names another)."""
    from worker import runner
    from worker.generation import run_generation

    if runner.SHUTDOWN.is_set():  # taken on the way out: back to the broker for another worker
        raise Reject("worker shutting down", requeue=True)
    return run_generation(generation_id, get_settings())


@shared_task(name=COUNT_TOKENS_TASK, acks_late=True, ignore_result=True)
def count_tokens(dataset_id: str) -> str:
    """The token counts of an upload (quick queue, `MOLA_QUICK_QUEUE`): tokenizers only."""
    from worker.runner import Resources
    from worker.token_counts import count_tokens as count

    settings = get_settings()
    res = Resources.of(settings)
    return count(dataset_id, settings, res.sessions, res.storage)


@shared_task(name=SEND_WEBHOOKS_TASK, acks_late=True, ignore_result=True)
def send_webhooks() -> str:
    """The webhook deliveries that are due, POSTed (quick queue): asked for after a job ends
    and by the reconciler while any is due."""
    from service import webhooks
    from worker.runner import Resources

    settings = get_settings()
    sent = webhooks.send_due(settings, Resources.of(settings).sessions)
    return ", ".join(f"{delivery_id} {status}" for delivery_id, status in sent.items()) or "none due"


def consumed_queues(consumer) -> list[str]:
    """The names of the queues a worker's consumer takes tasks from (its `--queues`)."""
    task_consumer = getattr(consumer, "task_consumer", None)
    queues = getattr(task_consumer, "queues", None)
    if queues is None:  # not consuming yet: the queues the app was told to consume from
        queues = consumer.app.amqp.queues.consume_from.values()
    return sorted({queue.name for queue in queues})


@worker_ready.connect
def _start_reconciler(sender=None, **_kwargs) -> None:
    """Every worker reconciles the broker with the database (`service/reconcile.py`): jobs of
    dead workers are re-queued, queued jobs the broker lost are enqueued again. Each pass also
    records this worker as alive on its queues (`service/workers.py`, GET /queues)."""
    global _reconciler
    from service.reconcile import ReconcilerThread
    from worker.runner import Resources, worker_prefix

    settings = get_settings()
    queues = consumed_queues(sender) if sender is not None else []
    worker_id = worker_prefix().rstrip(":")
    _reconciler = ReconcilerThread(settings, Resources.of(settings).sessions, worker_id=worker_id, queues=queues)
    _reconciler.start()
    logger.info("reconciler started (every %.0f s); worker %s consumes %s", settings.reconcile_seconds, worker_id, ", ".join(queues) or "nothing")


@worker_shutdown.connect
def _stop_reconciler(**_kwargs) -> None:
    if _reconciler is not None:
        _reconciler.stop()


@worker_shutting_down.connect
def _stop_running_job(**_kwargs) -> None:
    """Warm shutdown (SIGTERM/SIGINT): the running job checkpoints at its next step and goes
    back to the queue, to resume where it stopped."""
    from worker import runner

    runner.SHUTDOWN.set()
