"""PostgreSQL through psycopg 3: the migrations on an empty database of this test (upgrade,
downgrade to base, upgrade again), the models agreeing with them, and the types that differ
from SQLite (JSONB, timezone-aware timestamps) round-tripping."""

from __future__ import annotations

import threading
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

TABLES = {"tenants", "api_keys", "base_models", "datasets", "jobs", "job_metrics", "checkpoints", "generations", "workers", "webhook_deliveries"}


@pytest.fixture
def migrated(pg_url: str, tmp_path):
    """``migrated(**settings)``: Settings on this test's database, migrated to head, and a
    sessionmaker on it; its engine is disposed after the test."""
    engines = []

    def make(**overrides):
        settings = Settings(data_dir=tmp_path, database_url=pg_url, **overrides)
        migrate(settings)
        engines.append(make_engine(settings))
        return settings, make_sessionmaker(engines[-1])

    yield make
    for engine in engines:
        engine.dispose()


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


def test_jsonb_and_utc_timestamps_round_trip(migrated) -> None:
    from tests.factories import job_row  # noqa: PLC0415

    _, sessions = migrated()
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


def test_workers_report_themselves_and_the_queues_count_them(migrated) -> None:
    from datetime import timedelta  # noqa: PLC0415

    from service import workers  # noqa: PLC0415
    from service.models import utcnow  # noqa: PLC0415
    from tests.factories import job_row  # noqa: PLC0415

    settings, sessions = migrated()
    with session_scope(sessions) as session:
        workers.beat(session, "gpu-1:7", ["mola.train"])
        workers.beat(session, "cpu-1:8", ["mola.quick", "mola.train"])
        workers.beat(session, "gone:9", ["mola.train"], now=utcnow() - timedelta(hours=1))
        first, second = job_row(session), job_row(session)
    with session_scope(sessions) as session:
        workers.beat(session, "gpu-1:7", ["mola.train"])  # again: the row is updated, not doubled
        assert workers.consumers(session, settings) == {"mola.train": 2, "mola.quick": 1}
        place = workers.place_in_queue(session, settings, session.get(Job, second.id))
        assert place == {"name": "mola.train", "workers": 2, "ahead": 1, "running": 0}
        assert workers.place_in_queue(session, settings, session.get(Job, first.id))["ahead"] == 0


def test_input_postgres_cannot_store_gets_a_4xx_not_a_500(migrated, tmp_path) -> None:
    """NUL characters and infinite numbers: SQLite stores them, PostgreSQL's text and JSONB
    refuse them, so on PostgreSQL they once surfaced as 500s."""
    from fastapi.testclient import TestClient  # noqa: PLC0415

    from api.main import create_app  # noqa: PLC0415
    from service import catalogue, security  # noqa: PLC0415
    from service.storage import LocalStorage  # noqa: PLC0415
    from tests.service.conftest import TINY_LLAMA, RecordingQueue, auth, job_body, jsonl  # noqa: PLC0415

    settings, sessions = migrated(models=["tiny-llama"])
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
            ("GET", f"/jobs/compare?ids={job_id},x%00", {}),
        ]
        for method, url, options in requests:
            headers = {**auth(token), **options.pop("headers", {})}
            response = client.request(method, url, headers=headers, **options)
            assert response.status_code == 422, (method, url, response.status_code, response.text)
        assert client.get(f"/jobs/{job_id}", headers=auth(token)).json()["status"] == "queued"
    app.state.engine.dispose()


def _waits_for_the_commit(first, work) -> dict:
    """Run ``work`` in a thread while the session ``first`` holds its row locks: it must wait
    until ``first`` commits. Returns what it ended with: {"result": ...} or {"error": ...}."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except Exception as error:  # noqa: BLE001 - handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(1.0)
    assert thread.is_alive(), f"it did not wait for the other transaction: {outcome}"
    first.commit()
    first.close()
    thread.join(10)
    return outcome


def test_deleting_a_dataset_and_starting_a_job_on_it_take_turns(migrated) -> None:
    """A dataset's deletion and a job created or resumed on it at the same moment: the second
    waits for the first to commit and then sees it (the job: 409 for the deletion; the
    deletion: the job refused). Without the row locks both passed their checks, and a queued
    job named a deleted dataset."""
    from api.schemas import JobCreate  # noqa: PLC0415
    from service import catalogue  # noqa: PLC0415
    from service import datasets as dataset_service  # noqa: PLC0415
    from service import jobs as job_service  # noqa: PLC0415
    from service.errors import Conflict, InvalidRequest  # noqa: PLC0415
    from tests.factories import dataset_row, job_row, tenant_row  # noqa: PLC0415
    from tests.service.conftest import TINY_LLAMA, job_body  # noqa: PLC0415

    _, sessions = migrated(models=["tiny-llama"])
    report = {"rows": 24, "valid_rows": 24, "ok": True, "errors": [], "error_count": 0}
    with session_scope(sessions) as session:
        catalogue.upsert(session, "tiny-llama", TINY_LLAMA)
        owner = tenant_row(session)
        first, second, third = (dataset_row(session, owner, rows=24, report=report) for _ in range(3))
        stopped = job_row(session, third, status="cancelled", spec={"hyperparameters": {}})
        tenant, ids, stopped_id = owner.id, (first.id, second.id, third.id), stopped.id

    def create(dataset_id: str):
        with session_scope(sessions) as session:
            return job_service.create_job(session, tenant, JobCreate.model_validate(job_body(dataset_id)).model_dump(mode="json"))[0].id

    def delete(dataset_id: str):
        with session_scope(sessions) as session:
            dataset = dataset_service.get_dataset(session, tenant, dataset_id, lock="update")
            return dataset_service.delete_dataset(session, dataset)

    def resume():
        with session_scope(sessions) as session:
            return job_service.resume_job(session, session.get(Job, stopped_id), {})

    # The deletion first: the job waits for its commit, then finds no dataset.
    deleting = sessions()
    dataset_service.delete_dataset(deleting, dataset_service.get_dataset(deleting, tenant, ids[0], lock="update"))
    outcome = _waits_for_the_commit(deleting, lambda: create(ids[0]))
    assert isinstance(outcome.get("error"), InvalidRequest) and "not found" in outcome["error"].detail, outcome

    # The job first: the deletion waits for its commit, then finds it and refuses.
    creating = sessions()
    job_service.create_job(creating, tenant, JobCreate.model_validate(job_body(ids[1])).model_dump(mode="json"))
    outcome = _waits_for_the_commit(creating, lambda: delete(ids[1]))
    assert isinstance(outcome.get("error"), Conflict) and "used by queued or running job(s)" in outcome["error"].detail, outcome

    # Resuming takes the same turns as creating.
    deleting = sessions()
    dataset_service.delete_dataset(deleting, dataset_service.get_dataset(deleting, tenant, ids[2], lock="update"))
    outcome = _waits_for_the_commit(deleting, resume)
    assert isinstance(outcome.get("error"), Conflict) and "has been deleted" in outcome["error"].detail, outcome
    with sessions() as session:
        assert session.get(Job, stopped_id).status == "cancelled"


def test_deleting_a_dataset_and_a_generation_of_its_rows_take_turns(migrated) -> None:
    """A generation asked to complete a dataset's rows takes the dataset's row lock as a job
    does: the deletion that commits first makes it a 422, the generation that commits first
    makes the deletion a 409."""
    from service import catalogue  # noqa: PLC0415
    from service import datasets as dataset_service  # noqa: PLC0415
    from service import generations as generation_service  # noqa: PLC0415
    from service.errors import Conflict, InvalidRequest  # noqa: PLC0415
    from tests.factories import dataset_row, job_row, tenant_row  # noqa: PLC0415
    from tests.service.conftest import TINY_LLAMA  # noqa: PLC0415

    _, sessions = migrated(models=["tiny-llama"])
    report = {"rows": 4, "valid_rows": 4, "ok": True, "errors": [], "error_count": 0, "formats": {"alpaca": 4}}
    with session_scope(sessions) as session:
        catalogue.upsert(session, "tiny-llama", TINY_LLAMA)
        owner = tenant_row(session)
        first, second = (dataset_row(session, owner, rows=4, report=report) for _ in range(2))
        job = job_row(session, first, status="succeeded", adapter_key="jobs/x/adapter.tar.gz")
        tenant, ids, job_id = owner.id, (first.id, second.id), job.id
    request = {"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0}

    def ask(dataset_id: str):
        with session_scope(sessions) as session:
            return generation_service.create(session, tenant, job_id, {**request, "dataset_id": dataset_id}).id

    def delete(dataset_id: str):
        with session_scope(sessions) as session:
            return dataset_service.delete_dataset(session, dataset_service.get_dataset(session, tenant, dataset_id, lock="update"))

    deleting = sessions()
    dataset_service.delete_dataset(deleting, dataset_service.get_dataset(deleting, tenant, ids[0], lock="update"))
    outcome = _waits_for_the_commit(deleting, lambda: ask(ids[0]))
    assert isinstance(outcome.get("error"), InvalidRequest) and "not found" in outcome["error"].detail, outcome

    asking = sessions()
    generation_id = generation_service.create(asking, tenant, job_id, {**request, "dataset_id": ids[1]}).id
    outcome = _waits_for_the_commit(asking, lambda: delete(ids[1]))
    assert isinstance(outcome.get("error"), Conflict) and f"generation(s) {generation_id}" in outcome["error"].detail, outcome


def test_comparing_jobs_reads_each_ones_last_training_and_best_evaluation(migrated) -> None:
    """GET /jobs/compare's queries (the last train row per job through a grouped subquery, the
    eval rows of all the jobs at once) on PostgreSQL, where metric values are JSONB."""
    from service import comparison  # noqa: PLC0415
    from service import jobs as job_service  # noqa: PLC0415
    from tests.factories import dataset_row, job_row, tenant_row  # noqa: PLC0415

    _, sessions = migrated()
    with session_scope(sessions) as session:
        dataset = dataset_row(session, tenant_row(session))
        spec = {"hyperparameters": {"learning_rate": 3e-4}, "experts_per_layer": [2, 4, 6, 8]}
        first, second = job_row(session, dataset, spec=spec), job_row(session, dataset, spec={**spec, "experts_per_layer": [8, 6, 4, 2]})
        for job, losses in ((first, (0.9, 0.7, 0.8)), (second, (0.95, 0.75, 0.6))):
            job_service.record_metrics(session, job.id, [
                *({"step": step, "kind": "train", "values": {"lm_loss": 1.0 / step}} for step in (2, 4, 6)),
                *({"step": step, "kind": "eval", "values": {"eval_loss": loss}} for step, loss in zip((2, 4, 6), losses)),
            ])
        tenant, ids = dataset.tenant_id, [second.id, first.id]

    with sessions() as session:
        compared = comparison.compare_jobs(session, tenant, ids)
    assert [row["id"] for row in compared["jobs"]] == ids
    assert [(row["train"]["step"], row["train"]["lm_loss"]) for row in compared["jobs"]] == [(6, 1 / 6), (6, 1 / 6)]
    assert [(row["best_eval"]["step"], row["best_eval"]["eval_loss"]) for row in compared["jobs"]] == [(6, 0.6), (4, 0.7)]
    assert compared["best_eval_loss"] == ids[0]
    assert compared["differences"] == [{"field": "allocation", "values": [[8, 6, 4, 2], [2, 4, 6, 8]]}]


def test_two_jobs_of_a_tenant_at_its_last_place_take_turns(migrated) -> None:
    """Two POST /jobs of one tenant with one place left under MOLA_MAX_ACTIVE_JOBS: the second
    waits on the tenant's row for the first to commit, then counts its job and is refused.
    Without the lock both counted the same jobs and the tenant went over its limit."""
    from api.schemas import JobCreate  # noqa: PLC0415
    from service import catalogue  # noqa: PLC0415
    from service import jobs as job_service  # noqa: PLC0415
    from service.errors import TooManyRequests  # noqa: PLC0415
    from tests.factories import dataset_row, tenant_row  # noqa: PLC0415
    from tests.service.conftest import TINY_LLAMA, job_body  # noqa: PLC0415

    _, sessions = migrated(models=["tiny-llama"])
    report = {"rows": 24, "valid_rows": 24, "ok": True, "errors": [], "error_count": 0}
    with session_scope(sessions) as session:
        catalogue.upsert(session, "tiny-llama", TINY_LLAMA)
        owner = tenant_row(session)
        tenant, dataset_id = owner.id, dataset_row(session, owner, rows=24, report=report).id
    request = JobCreate.model_validate(job_body(dataset_id)).model_dump(mode="json")

    def create() -> str:
        with session_scope(sessions) as session:
            return job_service.create_job(session, tenant, request, max_active_jobs=1)[0].id

    creating = sessions()
    job_service.create_job(creating, tenant, request, max_active_jobs=1)
    outcome = _waits_for_the_commit(creating, create)
    assert isinstance(outcome.get("error"), TooManyRequests) and "MOLA_MAX_ACTIVE_JOBS=1" in outcome["error"].detail, outcome
    with sessions() as session:
        assert session.scalar(text("SELECT count(*) FROM jobs")) == 1
