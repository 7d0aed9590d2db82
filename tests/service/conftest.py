"""Fixtures for the service tests: a migrated SQLite database and a local storage folder per
test (copied from one migrated template, so each test starts clean and fast), the FastAPI app
driven by TestClient, and plain factory functions."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.main import create_app
from service import catalogue, security
from service.db import make_engine, make_sessionmaker, migrate, session_scope
from service.settings import Settings
from service.storage import LocalStorage

# The shape `mola.models.describe_base_model` gives for the built-in tiny models.
TINY_LLAMA = {
    "name": "tiny-llama",
    "model_type": "llama",
    "num_layers": 4,
    "hidden_size": 64,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "linear_modules": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "module_paths": ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"],
    "max_positions": 512,
    "module_shapes": [
        {
            "mlp.down_proj": [128, 64], "mlp.gate_proj": [64, 128], "mlp.up_proj": [64, 128],
            "self_attn.k_proj": [64, 32], "self_attn.o_proj": [64, 64], "self_attn.q_proj": [64, 64], "self_attn.v_proj": [64, 32],
        }  # fmt: skip
    ]
    * 4,
}
TINY_GPT2 = {
    "name": "tiny-gpt2",
    "model_type": "gpt2",
    "num_layers": 4,
    "hidden_size": 64,
    "target_modules": ["c_attn", "c_proj", "c_fc"],
    "linear_modules": ["c_attn", "c_fc", "c_proj"],
    "module_paths": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "max_positions": 512,
    "module_shapes": [{"attn.c_attn": [64, 192], "attn.c_proj": [64, 64], "mlp.c_fc": [64, 256], "mlp.c_proj": [256, 64]}] * 4,
}

ALPACA_ROWS = [{"instruction": f"Say the number {i}.", "output": f"The number is {i}."} for i in range(24)]


class RecordingQueue:
    """Stands in for the broker in route tests: remembers what was enqueued."""

    def __init__(self) -> None:
        self.enqueued: list[str] = []
        self.token_counts: list[str] = []
        self.generations: list[str] = []
        self.webhook_sends = 0

    def enqueue_training(self, job_id: str) -> None:
        self.enqueued.append(job_id)

    def enqueue_token_count(self, dataset_id: str) -> None:
        self.token_counts.append(dataset_id)

    def enqueue_generation(self, generation_id: str) -> None:
        self.generations.append(generation_id)

    def enqueue_webhooks(self) -> None:
        self.webhook_sends += 1


@pytest.fixture(scope="session")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("template")
    migrate(Settings(data_dir=folder))
    return folder / "mola.db"


@pytest.fixture
def settings(tmp_path: Path, template_db: Path) -> Settings:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(template_db, data / "mola.db")
    return Settings(data_dir=data, max_upload_mb=0.05, models=["tiny-llama", "tiny-gpt2"], metrics_flush_seconds=0.2, cancel_poll_seconds=0.0)


@pytest.fixture
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def storage(settings: Settings) -> LocalStorage:
    return LocalStorage(settings.resolved_storage_dir)


@pytest.fixture
def queue() -> RecordingQueue:
    return RecordingQueue()


@pytest.fixture
def app(settings: Settings, queue: RecordingQueue, storage: LocalStorage, sessions):
    with session_scope(sessions) as session:
        catalogue.upsert(session, "tiny-llama", TINY_LLAMA)
        catalogue.upsert(session, "tiny-gpt2", TINY_GPT2)
    app = create_app(settings, queue=queue, storage=storage)
    yield app
    app.state.engine.dispose()


@pytest.fixture
def client(app) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def new_key(sessions: sessionmaker[Session], tenant: str = "acme") -> str:
    with session_scope(sessions) as session:
        _, token = security.create_api_key(session, tenant)
    return token


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def key(sessions) -> str:
    return new_key(sessions, "acme")


@pytest.fixture
def other_key(sessions) -> str:
    return new_key(sessions, "globex")


def jsonl(rows: list[dict]) -> bytes:
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def upload(client: TestClient, token: str, content: bytes, name: str = "train.jsonl"):
    return client.post("/datasets", headers=auth(token), files={"file": (name, content, "application/jsonl")})


def make_dataset(client: TestClient, token: str, rows: list[dict] | None = None) -> str:
    response = upload(client, token, jsonl(rows or ALPACA_ROWS))
    assert response.status_code == 201, response.text
    return response.json()["id"]


def job_body(dataset_id: str, **overrides) -> dict:
    body = {"base_model": "tiny-llama", "dataset_id": dataset_id, "allocation": "2468", "hyperparameters": {"max_steps": 4, "batch_size": 4}}
    body.update(overrides)
    return body
