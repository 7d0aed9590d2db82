"""Celery tasks: take a job id, let the runner re-read the row and do the work."""

from __future__ import annotations

import logging

from celery import shared_task
from celery.signals import worker_shutting_down

from service.queue import TRAIN_TASK
from service.settings import get_settings

logger = logging.getLogger(__name__)


@shared_task(name=TRAIN_TASK, acks_late=True, ignore_result=True)
def train_job(job_id: str) -> str:
    from worker.runner import run_job  # torch and mola load here, in the worker process

    return run_job(job_id, get_settings())


@worker_shutting_down.connect
def _stop_running_job(**_kwargs) -> None:
    """Warm shutdown (SIGTERM/SIGINT): the running job checkpoints at its next step and goes
    back to the queue, to resume where it stopped."""
    from worker import runner

    runner.SHUTDOWN.set()
