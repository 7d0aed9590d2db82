"""GET /jobs/{id}/analysis: a finished MoLA job's expert analysis, computed by the worker's run
(in-process on the tiny LLaMA, real SQLite and folder storage) and checked against the same
analysis recomputed from the downloaded adapter."""

from __future__ import annotations

import tarfile

import pytest

from service.db import session_scope
from service.models import Job
from tests.service.conftest import auth, make_dataset
from tests.service.test_runner import FAST, ROWS, _create

torch = pytest.importorskip("torch")
runner = pytest.importorskip("worker.runner")

pytestmark = pytest.mark.slow


def _download(client, key, job_id: str, folder):
    archive = folder.parent / f"{folder.name}.tar.gz"
    archive.write_bytes(client.get(f"/jobs/{job_id}/adapter", headers=auth(key)).content)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    return folder


def test_a_finished_mola_job_has_the_analysis_of_its_adapter(client, key, settings, tmp_path):
    validation_rows = ROWS[:5]
    validation_id = make_dataset(client, key, validation_rows)
    job_id = _create(client, key, hyperparameters={"max_steps": 3}, validation_dataset_id=validation_id)
    assert runner.run_job(job_id, settings) == "succeeded"
    response = client.get(f"/jobs/{job_id}/analysis", headers=auth(key))
    assert response.status_code == 200, response.text
    analysis = response.json()
    assert (analysis["job_id"], analysis["status"], analysis["error"]) == (job_id, "ready", None)
    assert (analysis["split"], analysis["examples"]) == ("validation", 5)
    assert [row["num_experts"] for row in analysis["layers"]] == [2, 4, 6, 8]
    assert len(analysis["modules"]) == 4 * 7
    for row in analysis["layers"]:
        assert len(row["selection_share"]) == row["num_experts"] and row["modules"] == 7
        assert sum(row["selection_share"]) == pytest.approx(row["top_k"], rel=1e-5)
        assert row["max_load"] >= 1.0 >= row["min_load"] >= 0.0
        assert row["relative_distance"] > 0  # three steps moved the experts apart

    # The same numbers from the downloaded adapter, routing the same validation examples.
    from mola import load_mola_model
    from mola.analysis import expert_report
    from mola.data import collate, load_training_data
    from mola.models import load_base_model

    base, tokenizer = load_base_model("tiny-llama")
    model = load_mola_model(base, _download(client, key, job_id, tmp_path / "adapter"))
    examples = load_training_data(validation_rows, tokenizer, cutoff_len=FAST["cutoff_len"])
    batches = [collate(examples[i : i + 2], tokenizer.pad_token_id) for i in range(0, len(examples), 2)]
    expected = expert_report(model, batches)
    assert analysis["tokens"] == expected["tokens"]
    for row, same in zip(analysis["layers"], expected["layers"]):
        for field in ("selection_share", "mean_weight", "mean_prob"):
            assert row[field] == pytest.approx(same[field], abs=1e-5)
        assert row["relative_distance"] == pytest.approx(same["relative_distance"], rel=1e-4)
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert f"## Experts\n\nRouting of the first 5 validation examples ({expected['tokens']:,} tokens)." in card
    table = [line for line in card.splitlines() if line.startswith("| ") and not line.startswith("| layer")]
    assert [line.split(" | ")[1] for line in table] == ["2", "4", "6", "8"]  # experts column, one row per layer


def test_without_a_validation_set_the_training_examples_are_routed(client, key, settings):
    job_id = _create(client, key, hyperparameters={"max_steps": 2})
    assert runner.run_job(job_id, settings) == "succeeded"
    analysis = client.get(f"/jobs/{job_id}/analysis", headers=auth(key)).json()
    assert (analysis["status"], analysis["split"], analysis["examples"]) == ("ready", "train", len(ROWS))


def test_jobs_without_an_analysis_say_why(client, key, other_key, settings, sessions):
    lora = _create(client, key, method="lora", allocation=None, hyperparameters={"max_steps": 1})
    assert runner.run_job(lora, settings) == "succeeded"
    response = client.get(f"/jobs/{lora}/analysis", headers=auth(key))
    assert response.status_code == 404 and "plain LoRA adapter" in response.json()["detail"]

    queued = _create(client, key, hyperparameters={"max_steps": 1})
    response = client.get(f"/jobs/{queued}/analysis", headers=auth(key))
    assert response.status_code == 409
    assert response.json()["detail"] == f"job {queued} is queued: its expert analysis is computed when it finishes"
    assert client.get(f"/jobs/{queued}/analysis", headers=auth(other_key)).status_code == 404  # another tenant's

    assert client.post(f"/jobs/{queued}/cancel", headers=auth(key)).status_code == 200
    response = client.get(f"/jobs/{queued}/analysis", headers=auth(key))
    assert response.status_code == 404 and "cancelled without an adapter" in response.json()["detail"]

    # A job that finished before analyses were recorded (its row has none).
    done = _create(client, key, hyperparameters={"max_steps": 1})
    assert runner.run_job(done, settings) == "succeeded"
    with session_scope(sessions) as session:
        session.get(Job, done).analysis = None
    response = client.get(f"/jobs/{done}/analysis", headers=auth(key))
    assert response.status_code == 404 and "mola analyze" in response.json()["detail"]


def test_an_analysis_that_fails_leaves_the_job_succeeded(client, key, settings, tmp_path, monkeypatch):
    import mola.analysis

    def out_of_memory(*_args, **_kwargs):
        raise RuntimeError("CUDA out of memory (pretend)")

    monkeypatch.setattr(mola.analysis, "expert_report", out_of_memory)
    job_id = _create(client, key, hyperparameters={"max_steps": 1})
    assert runner.run_job(job_id, settings) == "succeeded"
    analysis = client.get(f"/jobs/{job_id}/analysis", headers=auth(key)).json()
    assert (analysis["status"], analysis["error"], analysis["layers"]) == ("failed", "RuntimeError: CUDA out of memory (pretend)", [])
    card = (_download(client, key, job_id, tmp_path / "adapter") / "README.md").read_text()
    assert "## Experts" not in card and "## Use" in card
