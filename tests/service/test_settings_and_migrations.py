from __future__ import annotations

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
