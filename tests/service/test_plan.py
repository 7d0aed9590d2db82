"""`POST /jobs/plan`: what `POST /jobs` with the same body would create and run (examples,
steps, adapter size), checked the same way, and nothing created or queued."""

from __future__ import annotations

import json

import pytest

from tests.service.conftest import auth, job_body, make_dataset
from tests.service.test_walkthrough_jobs import ALL_DROPPED, count

# The quick task's counts for ALPACA_ROWS' 24 rows, as if 5 were longer than the cutoff and 2 of
# those lost their whole answer to the cut.
COUNTED = {"total_tokens": 4000, "mean_tokens": 200.0, "max_tokens": 300, "cutoff_len": 256,
           "over_cutoff": 5, "dropped_at_cutoff": 2, "valid_rows": 24}


def epochs_body(dataset_id: str, **hyperparameters) -> dict:
    body = job_body(dataset_id)
    body["hyperparameters"] = {"epochs": 3, "batch_size": 4, "micro_batch_size": 2, **hyperparameters}
    return body


def test_a_plan_from_the_token_counts_is_exact_and_creates_nothing(client, key, sessions, queue):
    dataset_id = make_dataset(client, key)
    count(sessions, dataset_id, COUNTED)
    body = epochs_body(dataset_id)
    response = client.post("/jobs/plan", headers=auth(key), json=body)
    assert response.status_code == 200, response.text
    plan = response.json()
    assert plan["data"] == {
        "train": {"dataset_id": dataset_id, "rows": 24, "examples": 22, "exact": True, "over_cutoff": 5, "dropped_at_cutoff": 2,
                  "basis": "the upload's token counts with tiny-llama's tokenizer at cutoff_len=256"},
        "validation": None,
    }  # fmt: skip
    # 22 examples in batches of 4: 6 steps an epoch (the last one short), 3 epochs; 3% warm-up rounds to 1.
    assert plan["schedule"] == {"epochs": 3.0, "steps_per_epoch": 6, "total_steps": 18, "warmup_steps": 1, "micro_batches_per_step": 2, "exact": True}
    assert plan["warnings"] == ["dataset_id: 5 of its 24 rows are longer than cutoff_len=256 and will be cut"]
    assert queue.enqueued == [] and client.get("/jobs", headers=auth(key)).json()["data"] == []

    # What the plan says the job would be is what POST /jobs creates.
    job = client.post("/jobs", headers=auth(key), json=body).json()
    assert (plan["base_model"], plan["method"], plan["allocation"], plan["top_k"]) == ("tiny-llama", "mola", [2, 4, 6, 8], [2, 2, 2, 2])
    assert plan["hyperparameters"] == job["hyperparameters"] and plan["hyperparameters"]["learning_rate"] == 3e-4
    assert plan["adapter_parameters"] == job["adapter_parameters"] > 0


def test_rows_with_an_empty_completion_are_a_warning(client, key, capsys):
    from mola.client import Dataset
    from mola.client_cli import _show_dataset

    rows = [{"instruction": f"Say {i}.", "output": "" if i < 3 else str(i)} for i in range(8)]
    uploaded = client.post("/datasets", headers=auth(key), files={"file": ("d.jsonl", "\n".join(map(json.dumps, rows)))})
    assert uploaded.status_code == 201 and uploaded.json()["report"]["empty_targets"] == 3
    plan = client.post("/jobs/plan", headers=auth(key), json=job_body(uploaded.json()["id"])).json()
    assert plan["warnings"][-1:] == [  # after the one saying its token counts are pending
        "dataset_id: 3 of its rows have an empty completion (output, completion or final reply): they teach the model to end its answer at once"
    ]
    _show_dataset(Dataset.from_json(uploaded.json()))
    assert "warning:     3 rows with an empty completion (output, completion or final reply): they teach to end the answer at once\n" in capsys.readouterr().out


def test_without_counts_for_the_cutoff_the_row_count_stands_in_and_a_warning_says_so(client, key, sessions):
    pending, other_cutoff = make_dataset(client, key), make_dataset(client, key)
    count(sessions, pending, COUNTED, status="pending")
    count(sessions, other_cutoff, COUNTED)
    body = epochs_body(pending, cutoff_len=128, warmup_steps=100)  # the warm-up may fit: only the run can tell
    body["validation_dataset_id"] = other_cutoff
    plan = client.post("/jobs/plan", headers=auth(key), json=body).json()
    assert plan["data"]["train"] == {"dataset_id": pending, "rows": 24, "examples": 24, "exact": False, "over_cutoff": None,
                                     "dropped_at_cutoff": None, "basis": "its token counts for tiny-llama are pending"}  # fmt: skip
    assert plan["data"]["validation"]["basis"] == "its token counts are at cutoff_len=256, not 128"
    assert plan["schedule"]["total_steps"] == 18 and plan["schedule"]["warmup_steps"] == 100 and not plan["schedule"]["exact"]
    assert plan["warnings"] == [
        f"dataset_id: the plan counts all 24 rows as examples (its token counts for tiny-llama are pending); rows that the cut "
        "at cutoff_len=128 leaves without a trainable token are dropped when the run starts",
        f"validation_dataset_id: the plan counts all 24 rows as examples (its token counts are at cutoff_len=256, not 128); "
        "rows that the cut at cutoff_len=128 leaves without a trainable token are dropped when the run starts",
    ]
    assert client.post("/jobs", headers=auth(key), json=body).status_code == 201


def test_max_steps_fix_the_steps_and_say_how_many_epochs_they_make(client, key, sessions):
    dataset_id = make_dataset(client, key)
    count(sessions, dataset_id, COUNTED, status="pending")
    plan = client.post("/jobs/plan", headers=auth(key), json=epochs_body(dataset_id, max_steps=8)).json()
    assert plan["schedule"] == {"epochs": 1.333, "steps_per_epoch": 6, "total_steps": 8, "warmup_steps": 0, "micro_batches_per_step": 2, "exact": True}


def test_train_on_inputs_keeps_every_row_whatever_the_cutoff(client, key, sessions):
    dataset_id = make_dataset(client, key)
    count(sessions, dataset_id, ALL_DROPPED)
    plan = client.post("/jobs/plan", headers=auth(key), json=epochs_body(dataset_id, cutoff_len=64, train_on_inputs=True)).json()
    train = plan["data"]["train"]
    assert (train["examples"], train["exact"], train["dropped_at_cutoff"], train["over_cutoff"]) == (24, True, 0, None)
    assert plan["schedule"]["total_steps"] == 18 and plan["warnings"] == []


def test_a_lora_plan_has_no_allocation(client, key):
    body = {**job_body(make_dataset(client, key)), "method": "lora", "allocation": None}
    plan = client.post("/jobs/plan", headers=auth(key), json=body).json()
    assert plan["method"] == "lora" and plan["allocation"] is None and plan["top_k"] is None and plan["adapter_parameters"] > 0
    assert plan["equal_size_lora"] is None


@pytest.mark.parametrize("allocation, targets", [("2468", None), ("8888", ["q_proj", "v_proj"])])
def test_a_mola_plan_names_the_lora_of_equal_size(client, key, capsys, allocation, targets):
    dataset_id = make_dataset(client, key)
    hyperparameters = {"max_steps": 4, **({"target_modules": targets} if targets else {})}
    plan = client.post("/jobs/plan", headers=auth(key), json=job_body(dataset_id, allocation=allocation, hyperparameters=hyperparameters)).json()
    lora = plan["equal_size_lora"]
    sizes = {}
    for rank in (lora["rank"] - 1, lora["rank"], lora["rank"] + 1):
        body = job_body(dataset_id, method="lora", allocation=None, hyperparameters={**hyperparameters, "rank": rank})
        sizes[rank] = client.post("/jobs/plan", headers=auth(key), json=body).json()["adapter_parameters"]
    # The size is what a LoRA job of that rank gets, and no other rank comes closer to the MoLA adapter.
    assert sizes[lora["rank"]] == lora["adapter_parameters"]
    assert min(sizes, key=lambda rank: abs(sizes[rank] - plan["adapter_parameters"])) == lora["rank"]


@pytest.mark.parametrize("path", ["/jobs/plan", "/jobs"])
def test_a_warmup_longer_than_the_counted_run_is_refused_before_anything_is_queued(client, key, sessions, queue, path):
    dataset_id = make_dataset(client, key)
    count(sessions, dataset_id, COUNTED)
    response = client.post(path, headers=auth(key), json=epochs_body(dataset_id, warmup_steps=19))
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == "body.hyperparameters.warmup_steps"
    assert response.json()["errors"][0]["msg"] == (
        "19 is more than the run's 18 steps (22 examples, batch_size 4, 3 epochs): the warmup must fit in the run"
    )
    assert queue.enqueued == []
    assert client.post(path, headers=auth(key), json=epochs_body(dataset_id, warmup_steps=18)).status_code in (200, 201)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"allocation": [2, 4, 6]}, "body.allocation"),
        ({"base_model": "no-such-model"}, "body.base_model"),
        ({"hyperparameters": {"target_modules": ["nope_proj"]}}, "body.hyperparameters.target_modules"),
        ({"hyperparameters": {"eval_every": 2}}, "body.hyperparameters.eval_every"),
        ({"dataset_id": "ds_nope"}, "body.dataset_id"),
    ],
)
def test_a_plan_is_refused_as_the_job_would_be(client, key, change, field):
    body = {**job_body(make_dataset(client, key)), **change}
    planned = client.post("/jobs/plan", headers=auth(key), json=body)
    created = client.post("/jobs", headers=auth(key), json=body)
    assert planned.status_code == created.status_code == 422
    assert planned.json() == created.json() and planned.json()["errors"][0]["field"] == field


def test_a_dataset_that_keeps_no_row_is_refused_and_another_tenants_is_not_found(client, key, other_key, sessions):
    dataset_id = make_dataset(client, key)
    count(sessions, dataset_id, ALL_DROPPED)
    refused = client.post("/jobs/plan", headers=auth(key), json=job_body(dataset_id))
    assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "body.hyperparameters.cutoff_len"
    theirs = client.post("/jobs/plan", headers=auth(other_key), json=job_body(dataset_id))
    assert theirs.status_code == 422 and theirs.json()["errors"][0]["field"] == "body.dataset_id"
    assert client.post("/jobs/plan", json=job_body(dataset_id)).status_code == 401
