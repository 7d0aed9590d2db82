"""The FastAPI application. `create_app` builds it from settings; `mola serve` and
`uvicorn --factory api.main:create_app` run it."""

from __future__ import annotations

import logging
import threading
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI

from api import errors
from api.middleware import CredentialsBeforeBody, UploadSizeLimit
from api.routes import datasets, generations, health, jobs, models, queues, webhooks
from service.db import make_engine, make_sessionmaker
from service.queue import CeleryQueue, JobQueue
from service.settings import Settings, get_settings
from service.storage import Storage, make_storage

logger = logging.getLogger(__name__)

DESCRIPTION = """\
Fine-tune MoLA adapters (mixtures of LoRA experts with a layer-wise allocation of experts,
arXiv 2402.08562) and plain LoRA adapters on your own data.

1. `POST /datasets` a JSONL file; 2. `GET /models` to see the base models and their layers;
3. `POST /jobs` with an allocation (`"2468"`, a list, or a preset); 4. follow it with
`GET /jobs/{id}/events` or `/metrics`; 5. `GET /jobs/{id}/adapter`.

Every endpoint but `/healthz` and `/readyz` needs `Authorization: Bearer <API key>`.
"""


def _version() -> str:
    try:
        return version("mola")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0.0.0"


def create_app(settings: Settings | None = None, queue: JobQueue | None = None, storage: Storage | None = None) -> FastAPI:
    settings = settings or get_settings()
    engine = make_engine(settings)
    app = FastAPI(title="mola fine-tuning service", version=_version(), description=DESCRIPTION)
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = make_sessionmaker(engine)
    app.state.storage = storage or make_storage(settings)
    app.state.queue = queue or CeleryQueue(settings)
    # Set by `mola serve` at the first Ctrl-C: endless responses (event streams) end on their
    # own, since uvicorn waits for every open connection before it stops.
    app.state.shutting_down = threading.Event()
    errors.install(app)
    app.add_middleware(UploadSizeLimit, max_bytes=settings.max_upload_bytes)
    app.add_middleware(CredentialsBeforeBody)  # added last: runs first
    for module in (health, models, datasets, jobs, generations, queues, webhooks):
        app.include_router(module.router)
    return app
