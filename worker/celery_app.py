"""The Celery application.

Long GPU jobs: a task is acknowledged only when it ends (`task_acks_late`) and a worker reserves
one job at a time (`worker_prefetch_multiplier=1`); run one worker process per GPU. The embedded
default broker is a folder of message files under the data folder (kombu's `filesystem://`), so
`mola serve` needs no broker server.

`celery -A worker.celery_app worker` finds the app as `app`, built on first access from the
`MOLA_*` settings.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from service.queue import COUNT_TOKENS_TASK, GENERATE_TASK, TRAIN_TASK
from service.settings import Settings, get_settings


def broker_options(settings: Settings) -> dict[str, Any]:
    url = settings.resolved_broker_url
    if url.startswith(("redis:", "rediss:")):
        # Without socket timeouts a Redis that accepts connections but never answers (hung,
        # failing over, behind a dead NAT entry) blocks a send forever: POST /jobs would hang
        # and so would the reconciler. The worker's BRPOP waits 1 s at a time, well inside them.
        timeout = settings.broker_timeout_seconds
        return {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if not url.startswith("filesystem"):
        return {}
    folder = settings.broker_folder
    queue, control = folder / "queue", folder / "control"
    for path in (queue, control):
        path.mkdir(parents=True, exist_ok=True)
    # Producer and consumer share one folder: messages written there are read from there.
    return {"data_folder_in": str(queue), "data_folder_out": str(queue), "control_folder": str(control)}


def create_celery_app(settings: Settings) -> Celery:
    app = Celery("mola", broker=settings.resolved_broker_url, include=["worker.tasks"])
    local_broker = settings.resolved_broker_url.startswith("filesystem")
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.queue,
        task_routes={
            TRAIN_TASK: {"queue": settings.queue},
            COUNT_TOKENS_TASK: {"queue": settings.quick_queue},
            GENERATE_TASK: {"queue": settings.generations_queue},
        },
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        broker_transport_options=broker_options(settings),
        broker_connection_retry_on_startup=True,
        # Bounds a send's connection attempts (their retries included), not the worker's reconnects.
        broker_connection_timeout=settings.broker_timeout_seconds,
        # One retry of a failed send, not Celery's three: the database is the truth, and the
        # reconciler enqueues a queued job whose message never left, so a caller need not wait.
        task_publish_retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        # The folder broker has no broadcast channel worth its polling.
        worker_enable_remote_control=not local_broker,
    )
    return app


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        value = create_celery_app(get_settings())
        globals()["app"] = globals()["celery"] = value
        return value
    raise AttributeError(name)
