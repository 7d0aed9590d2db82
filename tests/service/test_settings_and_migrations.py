from __future__ import annotations

from datetime import datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from pydantic import ValidationError
from sqlalchemy import create_engine, inspect

from service.db import downgrade, migrate
from service.models import Base
from service.settings import Settings


def test_defaults_are_embedded(tmp_path):
    settings = Settings(data_dir=tmp_path)
    assert settings.resolved_database_url == f"sqlite:///{tmp_path.resolve() / 'mola.db'}"
    assert settings.resolved_broker_url == "filesystem://localhost//"
    assert settings.resolved_storage_dir == (tmp_path / "artifacts").resolve()
    assert settings.models == ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "smollm2-135m-instruct"]


def test_environment_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("MOLA_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MOLA_MODELS", "tiny-llama, tiny-gpt2")
    monkeypatch.setenv("MOLA_MAX_UPLOAD_MB", "2")
    settings = Settings()
    assert settings.data_dir == tmp_path and settings.models == ["tiny-llama", "tiny-gpt2"]
    assert settings.max_upload_bytes == 2 * 1024 * 1024


def test_production_refuses_local_defaults(tmp_path):
    with pytest.raises(ValidationError, match="MOLA_DATABASE_URL.*MOLA_BROKER_URL.*MOLA_EMBEDDED_WORKER"):
        Settings(mode="production", data_dir=tmp_path)
    with pytest.raises(ValidationError, match="SQLite"):
        Settings(mode="production", database_url="sqlite:///x.db", broker_url="redis://r", embedded_worker=False)
    ok = Settings(mode="production", database_url="postgresql+psycopg://u:p@db/mola", broker_url="redis://redis:6379/0", embedded_worker=False)
    assert ok.resolved_broker_url.startswith("redis")


def test_migrations_match_the_models_and_downgrade(tmp_path):
    settings = Settings(data_dir=tmp_path)
    migrate(settings)
    engine = create_engine(settings.resolved_database_url)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)
    assert diff == []
    assert {"jobs", "job_metrics", "datasets", "api_keys", "tenants", "base_models", "checkpoints"} <= set(inspect(engine).get_table_names())
    downgrade(settings, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    migrate(settings)
    engine.dispose()


def _a_job_before(settings: Settings, revision: str, created) -> tuple:
    """The database migrated to ``revision`` with a tenant, a dataset (ds_1) and a queued job
    (job_1) created (and queued) at ``created``, as rows of that revision's tables. Returns
    (engine, tables)."""
    from sqlalchemy import MetaData, insert

    migrate(settings, revision)
    engine = create_engine(settings.resolved_database_url)
    tables = MetaData()
    tables.reflect(engine)
    with engine.begin() as connection:
        connection.execute(insert(tables.tables["tenants"]).values(id="ten_1", name="t", created_at=created))
        connection.execute(insert(tables.tables["datasets"]).values(
            id="ds_1", tenant_id="ten_1", filename="d.jsonl", rows=1, size_bytes=1, sha256="0" * 64,
            storage_key="k", report={}, token_stats={}, created_at=created,
        ))  # fmt: skip
        jobs = tables.tables["jobs"]
        since_0013 = {"queued_at": created} if "queued_at" in jobs.c else {}
        connection.execute(insert(jobs).values(
            **since_0013, id="job_1", tenant_id="ten_1", base_model="tiny-llama", dataset_id="ds_1", method="mola", spec={},
            status="queued", step=0, attempts=0, created_at=created, updated_at=datetime(2026, 1, 3),
        ))  # fmt: skip
    return engine, tables


def _reflected(engine):
    from sqlalchemy import MetaData

    tables = MetaData()
    tables.reflect(engine)
    return tables


def test_jobs_there_before_queued_at_keep_their_place(tmp_path):
    """0013 gives each existing job its created_at as queued_at: the queue's order stays."""
    from sqlalchemy import select

    settings = Settings(data_dir=tmp_path)
    created = datetime(2026, 1, 2, 3, 4, 5)
    engine, _ = _a_job_before(settings, "0012", created)
    migrate(settings)
    with engine.connect() as connection:
        jobs = _reflected(engine).tables["jobs"]
        assert connection.execute(select(jobs.c.queued_at, jobs.c.created_at)).one() == (created, created)
    downgrade(settings, "0012")
    assert "queued_at" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
    engine.dispose()


def test_generations_there_before_their_dataset_column_name_their_dataset(tmp_path):
    """0015 copies a generation's requested dataset_id into its column: a dataset a queued
    generation was asked for before the upgrade cannot be deleted under it after."""
    from sqlalchemy import insert, select

    settings = Settings(data_dir=tmp_path)
    created = datetime(2026, 1, 2, 3, 4, 5)
    engine, tables = _a_job_before(settings, "0014", created)
    with engine.begin() as connection:
        for generation_id, request in (("gen_1", {"dataset_id": "ds_1", "rows": 1}), ("gen_2", {"prompts": ["hi"]})):
            connection.execute(insert(tables.tables["generations"]).values(
                id=generation_id, job_id="job_1", status="queued", request=request, created_at=created, requested_at=created,
            ))  # fmt: skip
    migrate(settings)
    with engine.connect() as connection:
        generations = _reflected(engine).tables["generations"]
        assert connection.execute(select(generations.c.id, generations.c.dataset_id).order_by(generations.c.id)).all() == [("gen_1", "ds_1"), ("gen_2", None)]
    downgrade(settings, "0014")
    assert "dataset_id" not in {c["name"] for c in inspect(engine).get_columns("generations")}
    engine.dispose()
