"""worker.failures: what each failure is recorded as, and finish_job's checks of the kind."""

from __future__ import annotations

import pytest

from service import jobs as job_service
from service.db import session_scope
from service.models import FAILURE_KINDS, Job
from tests.service.conftest import auth, job_body, make_dataset
from worker.failures import RunFailure, describe_error, failing_as, failure_kind


@pytest.mark.parametrize(
    "message",
    ["CUDA out of memory. Tried to allocate 2.00 GiB", "MPS backend out of memory", "[enforce fail at alloc_cpu.cpp:116] DefaultCPUAllocator: can't allocate memory"],
)
def test_running_out_of_memory_is_its_own_kind_wherever_it_happens(message):
    with pytest.raises(RuntimeError) as raised, failing_as("data"):  # not `data`, though raised there
        raise RuntimeError(message)
    assert failure_kind(raised.value) == "out_of_memory"
    assert describe_error(raised.value).endswith("(hint: lower micro_batch_size or cutoff_len, or turn on gradient_checkpointing)")


def test_a_failure_within_a_block_takes_its_kind_and_its_message():
    with pytest.raises(RunFailure) as raised, failing_as("base_model"):
        raise FileNotFoundError("model 'x' not found")
    assert (failure_kind(raised.value), describe_error(raised.value)) == ("base_model", "model 'x' not found")
    assert isinstance(raised.value.__cause__, FileNotFoundError)
    with pytest.raises(RunFailure) as inner, failing_as("data"):  # the innermost block names it
        raise RunFailure("evaluation", "no row fits")
    assert inner.value.kind == "evaluation"


def test_anything_else_is_internal_and_named_by_its_type():
    error = KeyError("surprise")
    assert (failure_kind(error), describe_error(error)) == ("internal", "KeyError: 'surprise'")
    assert len(describe_error(ValueError("x" * 5000))) == 2000


def test_kinds_are_the_known_ones():
    with pytest.raises(ValueError, match="not a failure kind: 'disk'"):
        RunFailure("disk", "full")
    assert set(FAILURE_KINDS) == {"out_of_memory", "data", "hyperparameters", "evaluation", "diverged", "base_model", "server_limit", "abandoned", "internal"}


def test_finish_job_records_the_kind_of_failures_only(client, key, sessions):
    dataset_id = make_dataset(client, key)
    job_ids = [client.post("/jobs", headers=auth(key), json=job_body(dataset_id)).json()["id"] for _ in range(3)]
    with session_scope(sessions) as session:
        for job_id in job_ids:
            assert job_service.claim_job(session, job_id, "host:1:w", 60) is not None
    with session_scope(sessions) as session:
        with pytest.raises(ValueError, match="not a failure kind: 'disk'"):
            job_service.finish_job(session, job_ids[0], "host:1:w", "failed", error="full", error_kind="disk")
        with pytest.raises(ValueError, match="error_kind is for failed jobs"):
            job_service.finish_job(session, job_ids[0], "host:1:w", "succeeded", error_kind="data")
        assert job_service.finish_job(session, job_ids[0], "host:1:w", "failed", error="boom")
        assert job_service.finish_job(session, job_ids[1], "host:1:w", "failed", error="no rows", error_kind="data")
        assert job_service.finish_job(session, job_ids[2], "host:1:w", "cancelled")
    with sessions() as session:
        assert [session.get(Job, job_id).error_kind for job_id in job_ids] == ["internal", "data", None]
    shown = [client.get(f"/jobs/{job_id}", headers=auth(key)).json()["error_kind"] for job_id in job_ids]
    assert shown == ["internal", "data", None]


@pytest.mark.parametrize(
    ("kind", "micro_batch", "advice"),
    [
        ("out_of_memory", 4, "from its newest checkpoint with less memory: `mola jobs resume {id} --micro-batch-size 2` (or --hp gradient_checkpointing=true)"),
        ("out_of_memory", 1, "from its newest checkpoint with less memory: `mola jobs resume {id} --hp gradient_checkpointing=true`"),
        ("data", 4, "no: a resume would fail the same way; create a new job with the cause changed"),
        ("hyperparameters", 4, "no: a resume would fail the same way; create a new job with the cause changed"),
        ("evaluation", 4, "with other eval_generate_rows: `mola jobs resume {id} --hp eval_generate_rows=null` (null: no generated evaluation)"),
        ("diverged", 4, "from the checkpoint before it without bf16: `mola jobs resume {id} --hp bf16=false` (it may diverge again: a new job with a lower learning_rate is the surer way)"),
        ("base_model", 4, "from its newest checkpoint once the server can load its base model: `mola jobs resume {id}`"),
        ("server_limit", 4, "from its newest checkpoint once the operator raises MOLA_MAX_ADAPTER_PARAMS: `mola jobs resume {id}`"),
        ("abandoned", 4, "from its newest checkpoint after checking the worker logs (its worker stopped without finishing it on every attempt): `mola jobs resume {id}`"),
        ("internal", 4, "from its newest checkpoint: `mola jobs resume {id}`"),
    ],
)
def test_jobs_show_says_what_resuming_takes_by_the_cause(client, key, sessions, kind, micro_batch, advice):
    from mola.client import Job as ClientJob
    from mola.client_cli import _resume_advice

    hp = {"max_steps": 4, "batch_size": 4, "micro_batch_size": micro_batch}
    job_id = client.post("/jobs", headers=auth(key), json=job_body(make_dataset(client, key), hyperparameters=hp)).json()["id"]
    with session_scope(sessions) as session:
        job_service.claim_job(session, job_id, "host:1:w", 60)
        assert job_service.finish_job(session, job_id, "host:1:w", "failed", error="it failed", error_kind=kind)
    job = ClientJob.from_json(client.get(f"/jobs/{job_id}", headers=auth(key)).json())
    assert (job.error_kind, _resume_advice(job)) == (kind, advice.format(id=job_id))
