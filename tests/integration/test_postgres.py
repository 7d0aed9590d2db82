"""PostgreSQL through psycopg 3: the migrations on an empty database of this test (upgrade,
downgrade to base, upgrade again), the models agreeing with them, and the types that differ
from SQLite (JSONB, timezone-aware timestamps) round-tripping."""

from __future__ import annotations

from datetime import timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from service.db import downgrade, make_engine, make_sessionmaker, migrate, session_scope
from service.models import Base, Job
from service.settings import Settings
from tests.servers import pg_url  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration

TABLES = {"tenants", "api_keys", "base_models", "datasets", "jobs", "job_metrics", "checkpoints", "generations"}


def _diff(url: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True, "compare_server_default": True})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_migrations_upgrade_downgrade_and_match_the_models(pg_url: str, tmp_path) -> None:
    settings = Settings(data_dir=tmp_path, database_url=pg_url)
    assert _tables(pg_url) == set()
    migrate(settings)
    assert TABLES | {"alembic_version"} == _tables(pg_url)
    assert _diff(pg_url) == []
    downgrade(settings, "base")
    assert _tables(pg_url) == {"alembic_version"}
    migrate(settings)
    assert _diff(pg_url) == []


def test_jsonb_and_utc_timestamps_round_trip(pg_url: str, tmp_path) -> None:
    from tests.factories import job_row  # noqa: PLC0415

    settings = Settings(data_dir=tmp_path, database_url=pg_url)
    migrate(settings)
    engine = make_engine(settings)
    sessions = make_sessionmaker(engine)
    try:
        with session_scope(sessions) as session:
            job = job_row(session, spec={"allocation": [2, 4, 6, 8], "nested": {"ok": True}})
        with sessions() as session:
            loaded = session.get(Job, job.id)
            assert loaded.spec == {"allocation": [2, 4, 6, 8], "nested": {"ok": True}}
            assert loaded.created_at.tzinfo is not None and loaded.created_at.utcoffset() == timezone.utc.utcoffset(None)
            column_type = session.execute(
                text("SELECT data_type FROM information_schema.columns WHERE table_name = 'jobs' AND column_name = 'spec'")
            ).scalar_one()
            assert column_type == "jsonb"
            # JSONB can be queried inside: what the JSON text of SQLite cannot do.
            assert session.execute(text("SELECT spec->'nested'->>'ok' FROM jobs")).scalar_one() == "true"
    finally:
        engine.dispose()


def test_input_postgres_cannot_store_gets_a_4xx_not_a_500(pg_url: str, tmp_path) -> None:
    """NUL characters and infinite numbers: SQLite stores them, PostgreSQL's text and JSONB
    refuse them, so on PostgreSQL they once surfaced as 500s."""
    from fastapi.testclient import TestClient  # noqa: PLC0415

    from api.main import create_app  # noqa: PLC0415
    from service import catalogue, security  # noqa: PLC0415
    from service.storage import LocalStorage  # noqa: PLC0415
    from tests.service.conftest import TINY_LLAMA, RecordingQueue, auth, job_body, jsonl  # noqa: PLC0415

    settings = Settings(data_dir=tmp_path, database_url=pg_url, models=["tiny-llama"])
    migrate(settings)
    sessions = make_sessionmaker(make_engine(settings))
    with session_scope(sessions) as session:
        catalogue.upsert(session, "tiny-llama", TINY_LLAMA)
        _, token = security.create_api_key(session, "acme")
    app = create_app(settings, queue=RecordingQueue(), storage=LocalStorage(tmp_path / "objects"))
    with TestClient(app, raise_server_exceptions=False) as client:
        # A NUL inside a valid record is data: stored in the file, never in a column.
        rows = [{"text": f"row {i} \u0000 with a NUL"} for i in range(4)]
        uploaded = client.post("/datasets", headers=auth(token), files={"file": ("nul.jsonl", jsonl(rows))})
        assert uploaded.status_code == 201, uploaded.text
        dataset_id = uploaded.json()["id"]
        job_id = client.post("/jobs", headers=auth(token), json=job_body(dataset_id)).json()["id"]
        requests = [
            ("POST", "/jobs", {"json": job_body(dataset_id, suffix="a\u0000b")}),
            ("POST", "/jobs", {"json": job_body(dataset_id, base_model="tiny-llama\u0000")}),
            ("POST", "/jobs", {"json": job_body(dataset_id + "\u0000")}),
            ("POST", "/jobs", {"content": b'{"base_model": "tiny-llama", "dataset_id": "' + dataset_id.encode()
                               + b'", "hyperparameters": {"max_grad_norm": 1e999}}', "headers": {"Content-Type": "application/json"}}),
            ("GET", "/jobs/x%00", {}),
            ("POST", "/jobs/x%00/cancel", {}),
            ("GET", "/datasets/x%00", {}),
            ("GET", "/models/x%00", {}),
            ("GET", "/jobs?after=%00", {}),
            ("GET", f"/jobs/{job_id}/metrics?after_step={'9' * 20}", {}),
        ]
        for method, url, options in requests:
            headers = {**auth(token), **options.pop("headers", {})}
            response = client.request(method, url, headers=headers, **options)
            assert response.status_code == 422, (method, url, response.status_code, response.text)
        assert client.get(f"/jobs/{job_id}", headers=auth(token)).json()["status"] == "queued"
    app.state.engine.dispose()
