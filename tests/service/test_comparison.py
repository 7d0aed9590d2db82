"""GET /jobs/compare: real runs of the tiny LLaMA side by side (their numbers are the ones their
metrics recorded), the settings that differ, the warnings where losses do not compare, and the
refusals of a bad `ids`."""

from __future__ import annotations

import pytest

from tests.service.conftest import auth, job_body, make_dataset

ROWS = [{"prompt": f"Say the number {i}: ", "completion": f"{i}, and {i + 1} after it."} for i in range(16)]
FAST = {"batch_size": 2, "micro_batch_size": 2, "cutoff_len": 64}


def _create(client, key, dataset_id: str, **overrides) -> str:
    hp = {**FAST, **overrides.pop("hyperparameters", {})}
    response = client.post("/jobs", headers=auth(key), json=job_body(dataset_id, hyperparameters=hp, **overrides))
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _compare(client, key, *ids: str, status: int = 200) -> dict:
    response = client.get("/jobs/compare", params={"ids": ",".join(ids)}, headers=auth(key))
    assert response.status_code == status, response.text
    return response.json()


def _metrics(client, key, job_id: str, kind: str) -> list[dict]:
    response = client.get(f"/jobs/{job_id}/metrics", params={"kind": kind, "limit": 1000}, headers=auth(key))
    return response.json()["data"]


@pytest.mark.slow
def test_finished_runs_side_by_side_with_the_numbers_their_metrics_recorded(client, key, settings):
    runner = pytest.importorskip("worker.runner")
    train_id, validation_id = make_dataset(client, key, ROWS), make_dataset(client, key, ROWS[:6])
    hp = {"max_steps": 4, "eval_every": 2, "learning_rate": 3e-3}
    mola_id = _create(client, key, train_id, hyperparameters=hp, validation_dataset_id=validation_id, allocation="2468")
    lora_id = _create(client, key, train_id, hyperparameters=hp, validation_dataset_id=validation_id, method="lora", allocation=None, top_k=None)
    for job_id in (mola_id, lora_id):
        assert runner.run_job(job_id, settings) == "succeeded"

    compared = _compare(client, key, lora_id, mola_id)

    assert [row["id"] for row in compared["jobs"]] == [lora_id, mola_id]  # the order asked
    assert compared["warnings"] == []
    for row in compared["jobs"]:
        job = client.get(f"/jobs/{row['id']}", headers=auth(key)).json()
        assert (row["status"], row["step"], row["total_steps"]) == ("succeeded", 4, 4)
        assert row["adapter_parameters"] == job["adapter_parameters"] > 0
        assert row["seconds"] > 0
        # The run chose its warm-up and bf16 (null in the request): the comparison shows the values used.
        assert job["hyperparameters"]["warmup_steps"] is None
        assert row["hyperparameters"]["warmup_steps"] == job["result"]["warmup_steps"]
        assert row["hyperparameters"]["bf16"] is False
        last_train = _metrics(client, key, row["id"], "train")[-1]
        assert row["train"]["step"] == last_train["step"] == 4
        assert row["train"]["lm_loss"] == last_train["metrics"]["lm_loss"]
        assert row["train"]["tokens_per_s"] == last_train["metrics"]["tokens_per_s"] > 0
        evals = _metrics(client, key, row["id"], "eval")
        assert [e["step"] for e in evals] == [2, 4]
        assert row["eval"]["eval_loss"] == evals[-1]["metrics"]["eval_loss"]
        best = min(evals, key=lambda e: e["metrics"]["eval_loss"])
        assert (row["best_eval"]["step"], row["best_eval"]["eval_loss"]) == (best["step"], best["metrics"]["eval_loss"])
    mola_row = compared["jobs"][1]
    assert mola_row["allocation"] == [2, 4, 6, 8] and mola_row["allocation_spec"] == "2468"
    assert compared["jobs"][0]["allocation"] is None and compared["jobs"][0]["train"]["aux_loss"] == 0
    assert mola_row["train"]["aux_loss"] > 0

    differences = {d["field"]: d["values"] for d in compared["differences"]}
    assert differences == {"method": ["lora", "mola"], "allocation": [None, [2, 4, 6, 8]], "top_k": [None, [2, 2, 2, 2]]}
    lowest = min(compared["jobs"], key=lambda row: row["best_eval"]["eval_loss"])
    assert compared["best_eval_loss"] == lowest["id"]


def test_queued_jobs_compare_with_nothing_measured_yet(client, key):
    dataset_id = make_dataset(client, key, ROWS)
    first = _create(client, key, dataset_id, allocation="2468")
    second = _create(client, key, dataset_id, allocation="8642", hyperparameters={"learning_rate": 1e-4})

    compared = _compare(client, key, first, second)

    for row in compared["jobs"]:
        assert row["status"] == "queued"
        assert (row["train"], row["eval"], row["best_eval"], row["seconds"]) == (None, None, None, None)
    assert compared["best_eval_loss"] is None
    assert compared["differences"] == [
        {"field": "allocation", "values": [[2, 4, 6, 8], [8, 6, 4, 2]]},
        {"field": "hyperparameters.learning_rate", "values": [3e-4, 1e-4]},
    ]
    assert compared["warnings"] == []


def test_losses_that_are_not_over_the_same_tokens_are_named_and_no_best_is_picked(client, key):
    dataset_id, other_data = make_dataset(client, key, ROWS), make_dataset(client, key, ROWS[:8])
    validation, other_validation = make_dataset(client, key, ROWS[:4]), make_dataset(client, key, ROWS[4:8])
    a = _create(client, key, dataset_id, validation_dataset_id=validation)
    b = _create(client, key, dataset_id, validation_dataset_id=other_validation, hyperparameters={"cutoff_len": 128})
    c = _create(client, key, other_data)  # no validation set: no eval_loss to disagree with
    d = _create(client, key, dataset_id, validation_dataset_id=validation, hyperparameters={"eval_generate_rows": 2})

    warnings = _compare(client, key, a, b, c)["warnings"]

    assert warnings == [
        f"eval_loss: the jobs evaluate on different validation sets ({a}: {validation}; {b}: {other_validation})",
        f"eval_loss and train loss: the jobs cut their examples at different lengths (cutoff_len: {a}, {c}: 64; {b}: 128)",
        f"train loss: the jobs train on different datasets ({a}, {b}: {dataset_id}; {c}: {other_data})",
    ]
    # A job that generates none has no exact match: only those that score rows can disagree.
    e = _create(client, key, dataset_id, validation_dataset_id=validation, hyperparameters={"eval_generate_rows": 3})
    compared = _compare(client, key, a, d, e)
    assert compared["warnings"] == [
        f"eval_exact_match and eval_answer_accuracy: the jobs score different numbers of validation rows (eval_generate_rows: {d}: 2; {e}: 3)"
    ]
    assert compared["best_eval_loss"] is None  # nothing evaluated yet, though their eval_loss compare
    assert _compare(client, key, a, d)["warnings"] == []
    # Without the job on another validation set, nothing about eval_loss but the cutoff.
    assert _compare(client, key, a, c)["warnings"] == [f"train loss: the jobs train on different datasets ({a}: {dataset_id}; {c}: {other_data})"]


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ("job_a", "give 2 to 20 job ids to compare, got 1"),
        (",".join(f"job_{i}" for i in range(21)), "give 2 to 20 job ids to compare, got 21"),
        ("job_a,,job_b", "an empty id"),
        ("job_a,job_b,job_a", "job_a given more than once"),
    ],
)
def test_a_bad_ids_is_a_422_naming_the_problem(client, key, ids, message):
    body = _compare(client, key, *ids.split(","), status=422)
    assert body["errors"][0]["field"] == "query.ids"
    assert message in body["detail"]


def test_a_missing_ids_is_a_422(client, key):
    response = client.get("/jobs/compare", headers=auth(key))
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "query.ids"


def test_another_tenants_job_is_not_found(client, key, other_key):
    dataset_id, theirs_data = make_dataset(client, key, ROWS), make_dataset(client, other_key, ROWS)
    mine, theirs = _create(client, key, dataset_id), _create(client, other_key, theirs_data)
    body = _compare(client, key, mine, theirs, status=404)
    assert theirs in body["detail"]
