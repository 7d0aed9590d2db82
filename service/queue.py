"""Handing jobs to workers. The API enqueues a job id only after the row is committed; the
worker re-reads everything else from the database."""

from __future__ import annotations

import logging
from typing import Protocol

from service.settings import Settings

logger = logging.getLogger(__name__)

TRAIN_TASK = "mola.train_job"
COUNT_TOKENS_TASK = "mola.count_tokens"
GENERATE_TASK = "mola.generate"
SEND_WEBHOOKS_TASK = "mola.send_webhooks"


class JobQueue(Protocol):
    def enqueue_training(self, job_id: str) -> None: ...

    def enqueue_token_count(self, dataset_id: str) -> None: ...

    def enqueue_generation(self, generation_id: str) -> None: ...

    def enqueue_webhooks(self) -> None: ...


class CeleryQueue:
    """Sends `mola.train_job(job_id)` to the configured queue by name (no worker code imported)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._app = None

    @property
    def app(self):
        if self._app is None:
            from worker.celery_app import create_celery_app

            self._app = create_celery_app(self.settings)
        return self._app

    def enqueue_training(self, job_id: str) -> None:
        self.app.send_task(TRAIN_TASK, args=[job_id], queue=self.settings.queue)
        logger.info("enqueued %s on %s", job_id, self.settings.queue)

    def enqueue_token_count(self, dataset_id: str) -> None:
        """Sends `mola.count_tokens(dataset_id)` to the quick queue (a worker with
        `--queues` naming it takes it, never behind a training job)."""
        self.app.send_task(COUNT_TOKENS_TASK, args=[dataset_id], queue=self.settings.quick_queue)
        logger.info("enqueued the token count of %s on %s", dataset_id, self.settings.quick_queue)

    def enqueue_generation(self, generation_id: str) -> None:
        """Sends `mola.generate(generation_id)` to the generation queue: by default the training
        queue (it needs the base model on the worker's GPU, and runs there between jobs)."""
        self.app.send_task(GENERATE_TASK, args=[generation_id], queue=self.settings.generations_queue)
        logger.info("enqueued generation %s on %s", generation_id, self.settings.generations_queue)

    def enqueue_webhooks(self) -> None:
        """Sends `mola.send_webhooks()` to the quick queue: the deliveries that are due go out
        (it takes no id: whichever sender runs first sends them all)."""
        self.app.send_task(SEND_WEBHOOKS_TASK, queue=self.settings.quick_queue)

    def waiting(self, queue: str | None = None) -> int:
        """Messages waiting in the broker's ``queue`` (default the training queue; not those a
        worker has taken); 0 when the broker does not know the queue, e.g. after a restart
        without persistence."""
        from kombu.exceptions import ChannelError

        with self.app.connection_for_read() as connection:
            try:
                return connection.default_channel.queue_declare(queue or self.settings.queue, passive=True).message_count
            except ChannelError:
                return 0
