"""The worker's run of a job, in-process on the tiny LLaMA (no broker): success, cancellation,
shutdown and resume, failure, LoRA. The database and storage are the real SQLite and folder."""

from __future__ import annotations

import json
import re
import tarfile
import threading
import time
from collections.abc import Callable

import pytest
from sqlalchemy import event, select
from sqlalchemy.exc import OperationalError

from service import jobs as job_service
from service.db import session_scope
from service.models import Checkpoint, Job, JobMetric
from tests.service.conftest import auth, job_body, make_dataset

torch = pytest.importorskip("torch")
runner = pytest.importorskip("worker.runner")

pytestmark = pytest.mark.slow

FAST = {"batch_size": 2, "micro_batch_size": 2, "cutoff_len": 64}
ROWS = [{"prompt": f"Say the number {i}: ", "completion": f"{i}, and {i + 1} after it."} for i in range(24)]


def _create(client, key, **overrides) -> str:
    dataset_id = make_dataset(client, key, ROWS)
    hp = {**FAST, **overrides.pop("hyperparameters", {})}
    response = client.post("/jobs", headers=auth(key), json=job_body(dataset_id, hyperparameters=hp, **overrides))
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _steps(sessions, job_id: str, kind: str = "train") -> list[int]:
    with sessions() as session:
        return list(session.scalars(select(JobMetric.step).where(JobMetric.job_id == job_id, JobMetric.kind == kind).order_by(JobMetric.step)))


def _failing_at_train_step(monkeypatch, step: int, error: Exception) -> Callable[[], None]:
    """The run raises ``error`` when it reports training step ``step``; returns what puts the
    reporter back."""
    report = runner.Reporter.__call__

    def failing(self, event):
        if event["kind"] == "train" and event["step"] == step:
            raise error
        return report(self, event)

    monkeypatch.setattr(runner.Reporter, "__call__", failing)
    return lambda: monkeypatch.setattr(runner.Reporter, "__call__", report)


def _when_step(sessions, job_id: str, step: int, action, timeout: float = 120.0) -> threading.Thread:
    """Run ``action`` once the job has reported ``step`` (from another thread, as the API would)."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with sessions() as session:
                if (session.get(Job, job_id).step or 0) >= step:
                    action()
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_job_succeeds_and_its_adapter_loads(client, key, settings, sessions, storage, tmp_path):
    job_id = _create(client, key, hyperparameters={"max_steps": 4, "checkpoint_every": 2}, validation_dataset_id=None, suffix="numbers v1")
    assert runner.run_job(job_id, settings) == "succeeded"
    job = client.get(f"/jobs/{job_id}", headers=auth(key)).json()
    assert job["status"] == "succeeded" and job["progress"]["step"] == 4 and job["progress"]["total_steps"] == 4
    assert job["result"]["steps"] == 4 and job["result"]["train"]["loss"] > 0 and job["attempts"] == 1
    # Left to the run in the request (3% of 4 steps; no bf16 on this CPU run): what it used.
    assert job["hyperparameters"]["warmup_steps"] is None and (job["result"]["warmup_steps"], job["result"]["bf16"]) == (0, False)
    assert _steps(sessions, job_id) == [1, 2, 3, 4]
    assert [c["step"] for c in client.get(f"/jobs/{job_id}/checkpoints", headers=auth(key)).json()["data"]] == [2, 4]
    dataset = client.get(f"/datasets/{job['dataset_id']}", headers=auth(key)).json()
    assert dataset["token_stats"]["tiny-llama"]["examples"] == 24
    train = job["data"]["train"]
    assert (train["records"], train["examples"], train["over_cutoff"], train["dropped_at_cutoff"], train["cutoff_len"]) == (24, 24, 0, 0, 64)
    assert 0 < train["trainable_tokens"] < train["total_tokens"] and "validation" not in job["data"]
    assert runner.run_job(job_id, settings) == "skipped"  # a duplicate delivery does nothing

    archive = tmp_path / "adapter.tar.gz"
    archive.write_bytes(client.get(f"/jobs/{job_id}/adapter", headers=auth(key)).content)
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "adapter_prompt.json"]
        assert {m.mode for m in tar.getmembers()} == {0o644}  # anyone who unpacks it may read it
        tar.extractall(tmp_path / "adapter", filter="data")
    # How the (prompt/completion) training rows were dressed, for `mola generate` and the API's generations.
    assert json.loads((tmp_path / "adapter" / "adapter_prompt.json").read_text()) == {"template": "raw"}
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "tiny-llama" in card and "trained on 24 of 24 records" in card and "- label: numbers v1" in card

    from mola import load_mola_model
    from mola.models import load_base_model

    base, tokenizer = load_base_model("tiny-llama")
    model = load_mola_model(base, tmp_path / "adapter")
    assert model.experts_per_layer == [2, 4, 6, 8]
    ids = tokenizer("Say the number 3.", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]


def test_every_checkpoint_stores_its_adapter_for_download(client, key, settings, sessions, storage, tmp_path):
    validation_id = make_dataset(client, key, ROWS[:4])
    job_id = _create(client, key, hyperparameters={"max_steps": 4, "checkpoint_every": 2, "eval_every": 2}, validation_dataset_id=validation_id)
    assert runner.run_job(job_id, settings) == "succeeded"
    checkpoints = client.get(f"/jobs/{job_id}/checkpoints", headers=auth(key)).json()["data"]
    assert [c["step"] for c in checkpoints] == [2, 4]
    evals = {m["step"]: m["metrics"]["eval_loss"] for m in client.get(f"/jobs/{job_id}/metrics?kind=eval", headers=auth(key)).json()["data"]}
    trains = {m["step"]: m["metrics"]["loss"] for m in client.get(f"/jobs/{job_id}/metrics?kind=train", headers=auth(key)).json()["data"]}
    for checkpoint in checkpoints:
        assert checkpoint["metrics"]["eval_loss"] == evals[checkpoint["step"]] and checkpoint["metrics"]["loss"] == trains[checkpoint["step"]]
    with sessions() as session:
        prefix = session.scalar(select(Checkpoint.storage_prefix).where(Checkpoint.job_id == job_id, Checkpoint.step == 2))
    archive = storage.get_file(job_service.checkpoint_adapter_key(prefix), tmp_path / "step2.tar.gz")
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "adapter_prompt.json"]
        tar.extractall(tmp_path / "step2", filter="data")
    stored = storage.get_file(f"{prefix}/adapter_model.safetensors", tmp_path / "stored.safetensors")
    assert (tmp_path / "step2" / "adapter_model.safetensors").read_bytes() == stored.read_bytes()
    card = (tmp_path / "step2" / "README.md").read_text()
    assert f"job `{job_id}` (checkpoint at step 2 of 4)" in card and f"validation loss: {evals[2]:.4f}" in card

    from mola import load_mola_model
    from mola.models import load_base_model

    base, _ = load_base_model("tiny-llama")
    assert load_mola_model(base, tmp_path / "step2").experts_per_layer == [2, 4, 6, 8]


def test_eval_generate_rows_scores_generated_completions_at_each_evaluation(client, key, settings, tmp_path):
    # The first validation row's prompt and completion do not fit in cutoff_len=64: not generated.
    long_row = {"prompt": "Count on: ", "completion": " ".join(str(i) for i in range(40))}
    validation_id = make_dataset(client, key, [long_row, *ROWS[:4]])
    hp = {"max_steps": 4, "checkpoint_every": 2, "eval_every": 2, "eval_generate_rows": 4}
    job_id = _create(client, key, hyperparameters=hp, validation_dataset_id=validation_id)
    assert runner.run_job(job_id, settings) == "succeeded"
    evals = {m["step"]: m["metrics"] for m in client.get(f"/jobs/{job_id}/metrics?kind=eval", headers=auth(key)).json()["data"]}
    assert sorted(evals) == [2, 4]
    for metrics in evals.values():
        assert metrics["eval_generated"] == 3 and 0.0 <= metrics["eval_exact_match"] <= 1.0
        assert "eval_answer_accuracy" not in metrics  # no reference says "the answer is X"
    checkpoints = client.get(f"/jobs/{job_id}/checkpoints", headers=auth(key)).json()["data"]
    assert [c["metrics"]["eval_exact_match"] for c in checkpoints] == [evals[2]["eval_exact_match"], evals[4]["eval_exact_match"]]
    job = client.get(f"/jobs/{job_id}", headers=auth(key)).json()
    assert job["result"]["eval"]["eval_exact_match"] == evals[4]["eval_exact_match"]
    samples = job["result"]["samples"]
    assert [(s["prompt"], s["reference"]) for s in samples] == [(r["prompt"], r["completion"]) for r in ROWS[:3]]
    assert all(isinstance(s["generated"], str) for s in samples)
    archive = tmp_path / "adapter.tar.gz"
    archive.write_bytes(client.get(f"/jobs/{job_id}/adapter", headers=auth(key)).content)
    with tarfile.open(archive) as tar:
        card = tar.extractfile("README.md").read().decode()
    assert f"- generated completions of validation rows: {evals[4]['eval_exact_match']:.1%} exact\n" in card


def test_eval_generate_rows_without_a_row_that_fits_fails_the_job_at_its_start(client, key, settings):
    rows = [{"prompt": f"Count from {i}: ", "completion": " ".join(str(j) for j in range(i, i + 40))} for i in range(3)]
    validation_id = make_dataset(client, key, rows)
    job_id = _create(client, key, hyperparameters={"max_steps": 2, "eval_generate_rows": 2}, validation_dataset_id=validation_id)
    assert runner.run_job(job_id, settings) == "failed"
    job = client.get(f"/jobs/{job_id}", headers=auth(key)).json()
    assert job["error"] == (
        "eval_generate_rows: none of the first 2 validation rows has a prompt whose prompt and completion fit in cutoff_len=64"
    )
    assert (job["error_kind"], job["progress"]["step"]) == ("evaluation", 0)

    # A resume meets the same rows unless it changes eval_generate_rows.
    refused = client.post(f"/jobs/{job_id}/resume", headers=auth(key), json={"hyperparameters": {"micro_batch_size": 1}})
    assert refused.status_code == 409 and "resume with hyperparameters.eval_generate_rows changed" in refused.json()["detail"]
    resumed = client.post(f"/jobs/{job_id}/resume", headers=auth(key), json={"hyperparameters": {"eval_generate_rows": None}})
    assert resumed.status_code == 200 and (resumed.json()["error"], resumed.json()["error_kind"]) == (None, None)
    assert runner.run_job(job_id, settings) == "succeeded"


def test_cancel_stops_at_the_next_step_and_keeps_the_adapter(client, key, settings, sessions):
    job_id = _create(client, key, hyperparameters={"max_steps": 500})

    def cancel() -> None:
        with session_scope(sessions) as session:
            job_service.cancel_job(session, session.get(Job, job_id))

    _when_step(sessions, job_id, 2, cancel)
    assert runner.run_job(job_id, settings) == "cancelled"
    job = client.get(f"/jobs/{job_id}", headers=auth(key)).json()
    assert job["status"] == "cancelled" and job["adapter_available"] and job["result"]["stopped_early"]
    steps = _steps(sessions, job_id)
    assert 2 <= job["result"]["steps"] < 500 and steps == list(range(1, job["result"]["steps"] + 1))
    checkpoints = client.get(f"/jobs/{job_id}/checkpoints", headers=auth(key)).json()["data"]
    assert checkpoints[-1]["step"] == job["result"]["steps"]  # the trainer checkpoints where it stopped


def test_cancel_between_claim_and_start(client, key, settings, sessions):
    job_id = _create(client, key, hyperparameters={"max_steps": 4})
    with session_scope(sessions) as session:  # the cancel arrives as the worker takes the job
        session.get(Job, job_id).cancel_requested_at = job_service.utcnow()
    assert runner.run_job(job_id, settings) == "cancelled"
    job = client.get(f"/jobs/{job_id}", headers=auth(key)).json()
    assert job["status"] == "cancelled" and not job["adapter_available"] and _steps(sessions, job_id) == []


def test_shutdown_requeues_and_the_next_run_resumes(client, key, settings, sessions, monkeypatch):
    job_id = _create(client, key, hyperparameters={"max_steps": 8})
    report = runner.Reporter.__call__

    def shutdown_at_step_3(self, event):  # the worker's warm-shutdown signal, at a known step
        if event["kind"] == "train" and event["step"] == 3:
            runner.SHUTDOWN.set()
        return report(self, event)

    monkeypatch.setattr(runner.Reporter, "__call__", shutdown_at_step_3)
    try:
        assert runner.run_job(job_id, settings) == "requeued"
    finally:
        runner.SHUTDOWN.clear()
    monkeypatch.setattr(runner.Reporter, "__call__", report)
    job = client.get(f"/jobs/{job_id}", headers=auth(key)).json()
    stopped_at = job["progress"]["step"]
    assert job["status"] == "queued" and stopped_at == 3
    assert client.get(f"/jobs/{job_id}/checkpoints", headers=auth(key)).json()["data"][-1]["step"] == stopped_at

    assert runner.run_job(job_id, settings) == "succeeded"
    job = client.get(f"/jobs/{job_id}", headers=auth(key)).json()
    assert job["attempts"] == 1 and job["result"]["steps"] == 8  # a warm shutdown costs no attempt
    assert _steps(sessions, job_id) == list(range(1, 9))  # no step missing, none twice


def _adapter_tensors(client, key, job_id: str, folder) -> dict:
    from safetensors.torch import load_file

    archive = folder.with_suffix(".tar.gz")
    archive.write_bytes(client.get(f"/jobs/{job_id}/adapter", headers=auth(key)).content)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    return load_file(str(folder / "adapter_model.safetensors"))


def test_a_cancelled_job_resumed_ends_as_an_uninterrupted_one(client, key, settings, sessions, storage, monkeypatch, tmp_path):
    hp = {"max_steps": 6, "learning_rate": 3e-3, "dropout": 0.0}
    straight = _create(client, key, hyperparameters=hp)
    assert runner.run_job(straight, settings) == "succeeded"

    job_id = _create(client, key, hyperparameters=hp)
    report = runner.Reporter.__call__

    def cancel_at_step_3(self, event):  # as POST /cancel would, at a known step
        if event["kind"] == "train" and event["step"] == 3:
            with session_scope(sessions) as session:
                job_service.cancel_job(session, session.get(Job, job_id))
        return report(self, event)

    monkeypatch.setattr(runner.Reporter, "__call__", cancel_at_step_3)
    assert runner.run_job(job_id, settings) == "cancelled"
    monkeypatch.setattr(runner.Reporter, "__call__", report)

    resumed = client.post(f"/jobs/{job_id}/resume", headers=auth(key)).json()
    assert (resumed["status"], resumed["progress"]["step"], resumed["adapter_available"]) == ("queued", 3, False)
    assert runner.run_job(job_id, settings) == "succeeded"
    job = client.get(f"/jobs/{job_id}", headers=auth(key)).json()
    assert job["result"]["steps"] == 6 and not job["result"]["stopped_early"] and job["attempts"] == 1
    assert _steps(sessions, job_id) == list(range(1, 7))  # no step missing, none twice
    losses = {m["step"]: m["metrics"]["loss"] for m in client.get(f"/jobs/{job_id}/metrics", headers=auth(key)).json()["data"]}
    expected = {m["step"]: m["metrics"]["loss"] for m in client.get(f"/jobs/{straight}/metrics", headers=auth(key)).json()["data"]}
    assert losses == pytest.approx(expected, rel=1e-5)
    want = _adapter_tensors(client, key, straight, tmp_path / "straight")
    got = _adapter_tensors(client, key, job_id, tmp_path / "resumed")
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-7)
    with sessions() as session:  # one adapter file, the new run's: the cancelled run's was deleted
        adapter_key = session.get(Job, job_id).adapter_key
    assert [k for k in storage.list(f"jobs/{job_id}") if k.startswith(f"jobs/{job_id}/adapter-")] == [adapter_key]


def test_a_job_failed_out_of_memory_resumes_with_a_smaller_micro_batch(client, key, settings, sessions, monkeypatch):
    job_id = _create(client, key, hyperparameters={"max_steps": 6, "checkpoint_every": 2, "batch_size": 4, "micro_batch_size": 4})
    restore = _failing_at_train_step(monkeypatch, 5, RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert runner.run_job(job_id, settings) == "failed"
    restore()
    failed = client.get(f"/jobs/{job_id}", headers=auth(key)).json()
    assert "CUDA out of memory" in failed["error"] and "hint: lower micro_batch_size" in failed["error"]
    assert failed["error_kind"] == "out_of_memory"

    body = {"hyperparameters": {"micro_batch_size": 1, "gradient_checkpointing": True}}
    resumed = client.post(f"/jobs/{job_id}/resume", headers=auth(key), json=body).json()
    assert resumed["progress"]["step"] == 4 and resumed["error"] is None
    assert runner.run_job(job_id, settings) == "succeeded"
    job = client.get(f"/jobs/{job_id}", headers=auth(key)).json()
    assert job["result"]["steps"] == 6 and job["hyperparameters"]["micro_batch_size"] == 1 and job["adapter_available"]
    assert _steps(sessions, job_id) == list(range(1, 7))


def test_failure_records_a_useful_error(client, key, settings):
    job_id = _create(client, key, hyperparameters={"max_steps": 2, "cutoff_len": 12})
    assert runner.run_job(job_id, settings) == "failed"
    job = client.get(f"/jobs/{job_id}", headers=auth(key)).json()
    assert job["status"] == "failed" and "cutoff_len=12" in job["error"] and job["finished_at"]
    assert "all 24 records dropped" in job["error"] and job["error_kind"] == "data"
    assert (job["data"]["train"]["records"], job["data"]["train"]["dropped_at_cutoff"]) == (24, 24)
    # The same data under the same cutoff_len would fail again: not queued.
    refused = client.post(f"/jobs/{job_id}/resume", headers=auth(key))
    assert refused.status_code == 409 and "a resume would fail the same way" in refused.json()["detail"]
    assert client.get(f"/jobs/{job_id}", headers=auth(key)).json()["status"] == "failed"


def test_a_base_model_the_worker_cannot_load_fails_the_job_resumably(client, key, settings, sessions):
    from service import catalogue
    from tests.service.conftest import TINY_LLAMA

    with session_scope(sessions) as session:  # in the catalogue, but its files are not on this worker
        catalogue.upsert(session, "no-such-model", {**TINY_LLAMA, "name": "no-such-model"})
    job_id = _create(client, key, base_model="no-such-model", hyperparameters={"max_steps": 2})
    assert runner.run_job(job_id, settings) == "failed"
    job = client.get(f"/jobs/{job_id}", headers=auth(key)).json()
    assert job["error"].startswith("model 'no-such-model' not found") and job["error_kind"] == "base_model"
    # Once the server has the model the run can pass: a resume is allowed.
    assert client.post(f"/jobs/{job_id}/resume", headers=auth(key)).json()["status"] == "queued"


def test_an_unexpected_error_fails_the_job_as_internal_and_resumably(client, key, settings, monkeypatch):
    job_id = _create(client, key, hyperparameters={"max_steps": 4})
    _failing_at_train_step(monkeypatch, 2, KeyError("surprise"))
    assert runner.run_job(job_id, settings) == "failed"
    job = client.get(f"/jobs/{job_id}", headers=auth(key)).json()
    assert (job["error"], job["error_kind"]) == ("KeyError: 'surprise'", "internal")
    assert client.post(f"/jobs/{job_id}/resume", headers=auth(key)).json()["status"] == "queued"


def test_a_run_whose_loss_turns_nan_fails_as_diverged(client, key, settings, sessions, monkeypatch):
    build = runner._adapter

    def on_a_base_model_with_a_nan_weight(model, spec):
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
        return build(model, spec)

    monkeypatch.setattr(runner, "_adapter", on_a_base_model_with_a_nan_weight)
    job_id = _create(client, key, hyperparameters={"max_steps": 4})
    assert runner.run_job(job_id, settings) == "failed"
    job = client.get(f"/jobs/{job_id}", headers=auth(key)).json()
    assert job["error"].startswith("training diverged at step 1: lm_loss nan") and job["error_kind"] == "diverged"
    assert _steps(sessions, job_id) == [] and not job["adapter_available"]
    assert client.post(f"/jobs/{job_id}/resume", headers=auth(key), json={"hyperparameters": {"bf16": False}}).json()["status"] == "queued"


def test_a_warmup_longer_than_the_epochs_fails_the_job_before_any_step(client, key, settings, sessions):
    job_id = _create(client, key, hyperparameters={"epochs": 1, "max_steps": None, "warmup_steps": 50})
    assert runner.run_job(job_id, settings) == "failed"
    job = client.get(f"/jobs/{job_id}", headers=auth(key)).json()
    assert "warmup_steps=50 is more than the run's 12 steps" in job["error"] and _steps(sessions, job_id) == []
    assert job["error_kind"] == "hyperparameters"
    refused = client.post(f"/jobs/{job_id}/resume", headers=auth(key), json={"hyperparameters": {"micro_batch_size": 1}})
    assert refused.status_code == 409 and "a hyperparameter a resume cannot change" in refused.json()["detail"]


@pytest.mark.parametrize("method", ["mola", "lora"])
def test_an_adapter_over_the_servers_limit_fails_before_it_is_built(client, key, settings, sessions, method, monkeypatch):
    overrides = {"method": "lora", "allocation": None} if method == "lora" else {}
    job_id = _create(client, key, hyperparameters={"max_steps": 2}, **overrides)
    built = []
    monkeypatch.setattr(runner, "_adapter", lambda model, spec: built.append(spec) or model)
    assert runner.run_job(job_id, settings.model_copy(update={"max_adapter_params": 1000})) == "failed"
    job = client.get(f"/jobs/{job_id}", headers=auth(key)).json()
    assert re.search(r"the adapter would have [\d,]+ trainable parameters, more than this server allows \(MOLA_MAX_ADAPTER_PARAMS=1,000\)", job["error"])
    assert built == [] and _steps(sessions, job_id) == [] and job["error_kind"] == "server_limit"


def test_the_job_reports_the_examples_cut_and_dropped_at_cutoff(client, key, settings):
    rows = [*ROWS[:6], {"prompt": "x" * 300, "completion": "y"}, {"prompt": "Count: ", "completion": "1 2 3 " * 40}]
    dataset_id = make_dataset(client, key, rows)
    validation_id = make_dataset(client, key, [*ROWS[:2], {"prompt": "x" * 300, "completion": "y"}])
    body = job_body(dataset_id, validation_dataset_id=validation_id, hyperparameters={**FAST, "max_steps": 1})
    job_id = client.post("/jobs", headers=auth(key), json=body).json()["id"]
    assert runner.run_job(job_id, settings) == "succeeded"
    data = client.get(f"/jobs/{job_id}", headers=auth(key)).json()["data"]
    assert {k: data["train"][k] for k in ("records", "examples", "over_cutoff", "dropped_at_cutoff", "max_tokens")} == {
        "records": 8, "examples": 7, "over_cutoff": 2, "dropped_at_cutoff": 1, "max_tokens": 64
    }
    assert (data["validation"]["records"], data["validation"]["examples"], data["validation"]["dropped_at_cutoff"]) == (3, 2, 1)


def test_a_validation_set_with_nothing_within_cutoff_fails_before_training(client, key, settings, sessions):
    too_long = make_dataset(client, key, [{"prompt": "x" * 300, "completion": "y"}] * 3)
    job_id = _create(client, key, hyperparameters={"max_steps": 2}, validation_dataset_id=too_long)
    assert runner.run_job(job_id, settings) == "failed"
    job = client.get(f"/jobs/{job_id}", headers=auth(key)).json()
    assert "no validation example" in job["error"] and "cutoff_len=64" in job["error"] and job["error_kind"] == "data"
    assert _steps(sessions, job_id) == []


@pytest.mark.parametrize("keep", [2, 0])
def test_storage_keeps_the_newest_checkpoints(client, key, settings, storage, keep):
    job_id = _create(client, key, hyperparameters={"max_steps": 5, "checkpoint_every": 1})
    assert runner.run_job(job_id, settings.model_copy(update={"keep_checkpoints": keep})) == "succeeded"
    listed = [c["step"] for c in client.get(f"/jobs/{job_id}/checkpoints", headers=auth(key)).json()["data"]]
    assert listed == _stored_checkpoints(storage, job_id) == ([4, 5] if keep else [1, 2, 3, 4, 5])


def test_storage_keeps_the_checkpoint_with_the_lowest_eval_loss_too(client, key, settings, storage):
    # Text unlike the training rows: the more the adapter learns them, the worse its loss here,
    # so the best checkpoint is an early one, which keeping only the newest would delete.
    validation_id = make_dataset(client, key, [{"prompt": "Spell: ", "completion": "zqxj zqxj zqxj"}] * 2)
    hp = {"max_steps": 5, "checkpoint_every": 1, "eval_every": 1, "learning_rate": 0.05, "lr_schedule": "constant", "warmup_steps": 0}
    job_id = _create(client, key, hyperparameters=hp, validation_dataset_id=validation_id)
    assert runner.run_job(job_id, settings.model_copy(update={"keep_checkpoints": 1})) == "succeeded"
    evals = {m["step"]: m["metrics"]["eval_loss"] for m in client.get(f"/jobs/{job_id}/metrics?kind=eval", headers=auth(key)).json()["data"]}
    best = min(evals, key=evals.get)
    assert best < 5, evals  # what this test is about: an earlier checkpoint than the newest
    listed = client.get(f"/jobs/{job_id}/checkpoints", headers=auth(key)).json()["data"]
    assert [c["step"] for c in listed] == _stored_checkpoints(storage, job_id) == sorted({best, 5})
    assert listed[0]["metrics"]["eval_loss"] == evals[best]
    assert [c["best"] for c in listed] == [True, False]


def test_pruning_keeps_the_newest_and_the_best_evaluated_checkpoint(sessions, client, key):
    job_id = _create(client, key)
    losses = {1: None, 2: 0.9, 3: 0.4, 4: 0.6, 5: None, 6: 0.7}
    with session_scope(sessions) as session:
        for step, loss in losses.items():
            metrics = {"loss": 1.0, **({"eval_loss": loss} if loss is not None else {})}
            job_service.record_checkpoint(session, job_id, step, f"p/{step}", 1, metrics)
        assert job_service.prune_checkpoints(session, job_id, keep=2) == [4, 2, 1]
        assert [c.step for c in job_service.list_checkpoints(session, job_id)] == [3, 5, 6]
        assert job_service.prune_checkpoints(session, job_id, keep=0) == []
    assert job_service.best_checkpoint_step([(1, {"eval_loss": float("nan")}), (2, None), (3, {})]) is None


def _stored_checkpoints(storage, job_id: str) -> list[int]:
    root = f"jobs/{job_id}/checkpoints"
    return sorted(runner.stored_checkpoint_folders(storage.list(root), root).values())


def _take_the_job(sessions, job_id: str, owner: str = "elsewhere:1:0therrun") -> None:
    """What a recovery and another worker's claim do to the job's row."""
    with session_scope(sessions) as session:
        session.get(Job, job_id).lease_owner = owner


def _fake_files(storage, tmp_path, *keys: str) -> None:
    source = tmp_path / "fake.bin"
    source.write_bytes(b"not ours")
    for key in keys:
        storage.put_file(key, source)


def test_a_worker_that_loses_the_job_during_a_checkpoint_upload_deletes_it(client, key, settings, sessions, storage, tmp_path, monkeypatch):
    """Paused through its lease while uploading: the row is not written, the upload (under this
    run's own folder) is deleted, and the files of the run that took over are untouched."""
    job_id = _create(client, key, hyperparameters={"max_steps": 6, "checkpoint_every": 2})
    res = runner.Resources.of(settings)
    upload = res.storage.put_dir
    theirs = f"jobs/{job_id}/checkpoints/0therrun/checkpoint-5/adapter_model.safetensors"

    def stall_through_the_lease(prefix, directory):
        size = upload(prefix, directory)
        if prefix.endswith("/checkpoint-4"):
            _take_the_job(sessions, job_id)
            _fake_files(storage, tmp_path, theirs)
        return size

    monkeypatch.setattr(res.storage, "put_dir", stall_through_the_lease)
    assert runner.run_job(job_id, settings) == "lost"
    with sessions() as session:
        assert [c.step for c in session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id))] == [2]
        assert session.get(Job, job_id).status == "running"
    assert _stored_checkpoints(storage, job_id) == [2, 5] and storage.exists(theirs)


def test_a_worker_that_loses_the_job_during_the_adapter_upload_deletes_it(client, key, settings, sessions, storage, tmp_path, monkeypatch):
    job_id = _create(client, key, hyperparameters={"max_steps": 2})
    res = runner.Resources.of(settings)
    upload = res.storage.put_file
    theirs = f"jobs/{job_id}/adapter-0therrun.tar.gz"
    uploaded = []

    def stall_through_the_lease(key, path):
        size = upload(key, path)
        if key.endswith(".tar.gz"):
            uploaded.append(key)
            _take_the_job(sessions, job_id)
            _fake_files(storage, tmp_path, theirs)
        return size

    monkeypatch.setattr(res.storage, "put_file", stall_through_the_lease)
    assert runner.run_job(job_id, settings) == "lost"
    assert len(uploaded) == 1 and uploaded[0] != theirs and not storage.exists(uploaded[0])
    assert storage.exists(theirs)
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job.status == "running" and job.adapter_key is None


def test_a_run_deletes_the_files_that_runs_which_lost_the_job_left(client, key, settings, sessions, storage, tmp_path):
    """Uploads that no row names (from runs that lost the job, or whose row failed) go at the
    run's checkpoints and end; the adapter the job names is this run's own."""
    job_id = _create(client, key, hyperparameters={"max_steps": 4, "checkpoint_every": 2})
    left = [f"jobs/{job_id}/adapter-0ldrun.tar.gz", f"jobs/{job_id}/adapter.tar.gz", f"jobs/{job_id}/checkpoints/0ldrun/checkpoint-3/state.pt", f"jobs/{job_id}/checkpoints/checkpoint-1/state.pt"]
    _fake_files(storage, tmp_path, *left)
    assert runner.run_job(job_id, settings) == "succeeded"
    assert not any(storage.exists(k) for k in left)
    with sessions() as session:
        job = session.get(Job, job_id)
        named = {c.storage_prefix for c in session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id))}
    assert storage.list(f"jobs/{job_id}") == sorted([job.adapter_key, *(k for k in storage.list(f"jobs/{job_id}/checkpoints"))])
    root = f"jobs/{job_id}/checkpoints"
    assert set(runner.stored_checkpoint_folders(storage.list(root), root)) == named and len(named) == 2
    assert client.get(f"/jobs/{job_id}/adapter", headers=auth(key)).status_code == 200


def test_lora_job(client, key, settings, tmp_path):
    job_id = _create(client, key, method="lora", allocation=None, hyperparameters={"max_steps": 2})
    assert runner.run_job(job_id, settings) == "succeeded"
    archive = tmp_path / "lora.tar.gz"
    archive.write_bytes(client.get(f"/jobs/{job_id}/adapter", headers=auth(key)).content)
    with tarfile.open(archive) as tar:
        assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(tar.getnames())
        assert {m.mode for m in tar.getmembers()} == {0o644}  # peft's weights file is owner-only
        tar.extractall(tmp_path / "lora", filter="data")
    card = (tmp_path / "lora" / "README.md").read_text()
    assert card.startswith("# LoRA adapter for tiny-llama")
    # The card's own "Use" code loads the adapter (peft's loader: mola's reads MoLA adapters only).
    code = card.split("```python\n")[1].split("```")[0].replace("path/to/this/folder", str(tmp_path / "lora"))
    namespace: dict = {}
    exec(code, namespace)
    loaded = {k for k in namespace["model"].state_dict() if "lora_" in k}
    assert loaded and len(loaded) == len([k for k in safetensors_keys(tmp_path / "lora" / "adapter_model.safetensors")])


def safetensors_keys(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def test_metrics_are_written_in_batches_not_per_step(client, key, settings, sessions):
    """Training never waits on the database per step: between flushes, the callback only
    appends to a buffer, and cancellation reads are throttled."""
    job_id = _create(client, key, hyperparameters={"max_steps": 4})
    with session_scope(sessions) as session:
        job_service.claim_job(session, job_id, "bench", 60)
    quiet = settings.model_copy(update={"metrics_flush_seconds": 3600.0, "cancel_poll_seconds": 3600.0})
    res = runner.Resources.of(quiet)
    statements = []
    event.listen(res.sessions.kw["bind"], "before_cursor_execute", lambda *args: statements.append(args[2]))
    heartbeat = runner.Heartbeat(job_id, "bench", res)
    reporter = runner.Reporter(job_id, "bench", res, heartbeat)
    calls = 2000
    for step in range(1, calls + 1):
        reporter({"kind": "train", "step": step, "total_steps": calls, "epoch": 0.1, "loss": 1.0, "lm_loss": 1.0, "aux_loss": 0.1, "lr": 1e-4})
    # At most the first cancellation read (the poll interval counts from the clock's zero);
    # nothing else until a flush.
    assert len(statements) <= 1 and all("cancel_requested_at" in text for text in statements), statements
    reporter.flush()
    assert len(_steps(sessions, job_id)) == calls


class Outage:
    """Makes the database fail the next ``count`` statements that contain each pattern, the way
    a dropped connection or a restarting server fails them (OperationalError)."""

    def __init__(self, engine, **counts: int) -> None:
        self.engine, self.left, self.failed = engine, dict(counts), []

    def __call__(self, _conn, _cursor, statement, parameters, _context, _many):
        for pattern, left in self.left.items():
            if left and pattern.lower() in statement.lower():
                self.left[pattern] -= 1
                self.failed.append(pattern)
                raise OperationalError(statement, parameters, ConnectionError("server closed the connection unexpectedly"))

    def __enter__(self) -> "Outage":
        event.listen(self.engine, "before_cursor_execute", self)
        return self

    def __exit__(self, *_exc) -> None:
        event.remove(self.engine, "before_cursor_execute", self)


def test_a_database_outage_mid_run_loses_no_metrics(client, key, settings, sessions, storage):
    """Metric writes, cancellation reads and a checkpoint's row fail for a while: the run goes
    on, every step's metrics arrive (late), and only the checkpoint whose row failed is not
    offered for resuming."""
    job_id = _create(client, key, hyperparameters={"max_steps": 6, "checkpoint_every": 2})
    engine = runner.Resources.of(settings).sessions.kw["bind"]
    failures = {"INSERT INTO job_metrics": 2, "SELECT jobs.cancel_requested_at": 2, "INSERT INTO checkpoints": 1}
    with Outage(engine, **failures) as outage:
        assert runner.run_job(job_id, settings) == "succeeded"
    assert sorted(outage.failed) == sorted(p for p, n in failures.items() for _ in range(n))
    assert _steps(sessions, job_id) == [1, 2, 3, 4, 5, 6]
    with sessions() as session:
        assert list(session.scalars(select(Checkpoint.step).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step))) == [4, 6]
        assert session.get(Job, job_id).status == "succeeded"
    # checkpoint-2, whose row failed, is not left behind in storage either.
    assert _stored_checkpoints(storage, job_id) == [4, 6]


def test_a_final_write_whose_reply_was_lost_still_counts(client, key, settings, sessions, monkeypatch):
    """The commit of the job's final state succeeds but the connection drops before the reply:
    the retry matches no row, and the worker must not take that for a lost lease."""
    import sqlite3

    job_id = _create(client, key, hyperparameters={"max_steps": 2})
    engine = runner.Resources.of(settings).sessions.kw["bind"]
    wrote_final, commit = [], engine.dialect.do_commit

    def note(_conn, _cursor, statement, *_args) -> None:
        if "finished_at=" in statement:
            wrote_final.append(statement)

    def commit_then_lose_the_reply(dbapi_connection) -> None:
        commit(dbapi_connection)
        if len(wrote_final) == 1:
            wrote_final.append("reply lost")
            raise sqlite3.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(engine.dialect, "do_commit", commit_then_lose_the_reply)
    event.listen(engine, "after_cursor_execute", note)
    try:
        assert runner.run_job(job_id, settings) == "succeeded"
    finally:
        event.remove(engine, "after_cursor_execute", note)
    assert "reply lost" in wrote_final
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job.status == "succeeded" and job.adapter_key and job.result["steps"] == 2


@pytest.mark.parametrize(
    "hyperparameters",
    [{"max_steps": 2}, {"max_steps": 2, "cutoff_len": 12}],
    ids=["succeeding", "failing"],  # cutoff_len=12 keeps no example: the run fails at once
)
def test_a_database_that_stays_away_leaves_the_job_to_its_lease(client, key, settings, sessions, hyperparameters):
    """When the last writes (metrics, the final state, or the failure) keep failing past half a
    lease, the worker writes nothing and gives up; the job stays `running` for the reconciler
    to resume once its lease expires (not `failed`: the database failed, not the job)."""
    job_id = _create(client, key, hyperparameters=hyperparameters)
    short = settings.model_copy(update={"lease_seconds": 2.0})
    engine = runner.Resources.of(short).sessions.kw["bind"]
    with Outage(engine, **{"INSERT INTO job_metrics": 1000, "finished_at=": 1000}):
        assert runner.run_job(job_id, short) == "interrupted"
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job.status == "running" and job.error is None and job.lease_expires_at is not None
    time.sleep(short.lease_seconds + 0.5)
    with session_scope(sessions) as session:
        assert job_service.recover_expired_leases(session, short.max_attempts, job_id) == ([job_id], [])


def test_every_training_hyperparameter_reaches_the_train_config():
    # A field added to the API's Hyperparameters but not to TRAIN_FIELDS would be accepted,
    # echoed back in the job, and silently ignored by the trainer.
    import dataclasses

    from api.schemas import Hyperparameters
    from mola.train import TrainConfig

    adapter_fields = {"rank", "alpha", "dropout", "target_modules", "aux_loss_coef"}
    scorer_fields = {"eval_generate_rows"}  # the runner's extra evaluation (tested above), not TrainConfig's
    assert set(Hyperparameters.model_fields) - adapter_fields - scorer_fields == set(runner.TRAIN_FIELDS)
    assert set(runner.TRAIN_FIELDS) <= {f.name for f in dataclasses.fields(TrainConfig)}
