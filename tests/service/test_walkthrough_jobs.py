"""What a user walking through the README met with `POST /jobs`: a job that its dataset's token
counts already show cannot train is refused at once, instead of failing when a worker starts it."""

from __future__ import annotations

import pytest

from service import datasets as dataset_service
from service.db import session_scope
from tests.service.conftest import auth, job_body, make_dataset

# What the quick task records for a dataset whose rows are all longer than a job's default
# cutoff_len with a byte-level tokenizer (tiny-llama): every row is cut before its answer.
ALL_DROPPED = {"total_tokens": 10392, "mean_tokens": 433.0, "max_tokens": 662, "cutoff_len": 256,
               "over_cutoff": 24, "dropped_at_cutoff": 24, "valid_rows": 24}


def count(sessions, dataset_id: str, stats: dict, status: str = "ready") -> None:
    with session_scope(sessions) as session:
        dataset_service.record_token_counts(session, dataset_id, {"tiny-llama": stats}, status)


def test_a_job_whose_rows_all_drop_at_its_cutoff_is_refused_naming_the_cutoff(client, key, sessions, queue):
    dataset_id = make_dataset(client, key)
    count(sessions, dataset_id, ALL_DROPPED)
    response = client.post("/jobs", headers=auth(key), json=job_body(dataset_id))
    assert response.status_code == 422, response.text
    error = response.json()["errors"][0]
    assert error["field"] == "body.hyperparameters.cutoff_len"
    assert error["msg"] == (
        f"dataset_id {dataset_id}: none of its 24 rows keeps a trainable token within cutoff_len=256 with tiny-llama's "
        "tokenizer (the rows have up to 662 tokens, 433 on average): raise cutoff_len (tiny-llama takes up to 512), "
        "shorten the prompts, or set train_on_inputs"
    )
    assert queue.enqueued == [] and client.get("/jobs", headers=auth(key)).json()["data"] == []


def test_the_validation_set_is_checked_too(client, key, sessions):
    train, validation = make_dataset(client, key), make_dataset(client, key)
    count(sessions, validation, ALL_DROPPED)
    body = job_body(train, validation_dataset_id=validation)
    response = client.post("/jobs", headers=auth(key), json=body)
    assert response.status_code == 422 and response.json()["detail"].startswith(f"body.hyperparameters.cutoff_len: validation_dataset_id {validation}:")


@pytest.mark.parametrize(
    "hyperparameters, stats, status",
    [
        ({"cutoff_len": 512}, ALL_DROPPED, "ready"),  # counted at another cutoff: the worker decides
        ({"train_on_inputs": True}, ALL_DROPPED, "ready"),  # the prompt is trainable: nothing drops
        ({}, ALL_DROPPED, "pending"),  # not counted yet
        ({}, {**ALL_DROPPED, "dropped_at_cutoff": 23}, "ready"),  # one row keeps its answer
    ],
    ids=["other-cutoff", "train-on-inputs", "pending", "one-row-left"],
)
def test_jobs_that_may_train_are_created(client, key, sessions, hyperparameters, stats, status):
    dataset_id = make_dataset(client, key)
    count(sessions, dataset_id, stats, status)
    body = job_body(dataset_id)
    body["hyperparameters"].update(hyperparameters)
    response = client.post("/jobs", headers=auth(key), json=body)
    assert response.status_code == 201, response.text


def test_a_replay_of_a_job_created_before_the_counts_still_answers_its_job(client, key, sessions):
    dataset_id = make_dataset(client, key)
    headers = {**auth(key), "Idempotency-Key": "before-the-count"}
    first = client.post("/jobs", headers=headers, json=job_body(dataset_id))
    assert first.status_code == 201
    count(sessions, dataset_id, ALL_DROPPED)
    again = client.post("/jobs", headers=headers, json=job_body(dataset_id))
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]


# ---- POST /datasets: what an upload is, said when the body is not one ------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"content": b'{"text": "x"}\n', "headers": {"Content-Type": "application/json"}},
         "body.file: an upload is a multipart/form-data body with the JSONL file in a part named 'file' "
         "(curl -F file=@train.jsonl), not application/json"),
        ({"content": b'{"text": "x"}\n'},
         "body.file: an upload is a multipart/form-data body with the JSONL file in a part named 'file' "
         "(curl -F file=@train.jsonl), not a body without a Content-Type"),
        ({"files": {"data": ("train.jsonl", b'{"text": "x"}\n')}},
         "body.file: no part named 'file' in the form (its parts: 'data'): send the JSONL file as -F file=@train.jsonl"),
    ],
    ids=["json-body", "raw-body", "other-part-name"],
)
def test_an_upload_that_is_not_a_file_part_says_what_an_upload_is(client, key, kwargs, message):
    headers = {**auth(key), **kwargs.pop("headers", {})}
    response = client.post("/datasets", headers=headers, **kwargs)
    assert response.status_code == 422, response.text
    assert response.json()["detail"] == message and response.json()["errors"][0]["field"] == "body.file"


def test_rows_the_models_tokenizer_cannot_render_are_refused_naming_how_many(client, key, sessions, queue):
    # The quick task counted 22 of the upload's 24 valid rows: the model's chat template refused
    # two, and the run would fail on the first of them. Counts from before they named the rows
    # (no `unrenderable`, as here) only say how many; test_token_counts has the rows named.
    train, validation = make_dataset(client, key), make_dataset(client, key)
    count(sessions, validation, {**ALL_DROPPED, "dropped_at_cutoff": 0, "valid_rows": 22})
    response = client.post("/jobs", headers=auth(key), json=job_body(train, validation_dataset_id=validation))
    assert response.status_code == 422 and response.json()["errors"][0] == {
        "loc": ["body", "validation_dataset_id"],
        "field": "body.validation_dataset_id",
        "msg": f"{validation}: 2 of its 24 rows cannot be rendered with tiny-llama's tokenizer (its chat template refuses them, say) "
        "and the run would fail on the first: upload the data without them, or train another base model",
    }
    assert client.post("/jobs/plan", headers=auth(key), json=job_body(train, validation_dataset_id=validation)).status_code == 422
    assert queue.enqueued == []


def test_counts_without_their_sizes_still_give_a_422_not_a_500(client, key, sessions):
    dataset_id = make_dataset(client, key)
    count(sessions, dataset_id, {"cutoff_len": 256, "dropped_at_cutoff": 24, "valid_rows": 24})
    response = client.post("/jobs", headers=auth(key), json=job_body(dataset_id))
    assert response.status_code == 422 and response.json()["errors"][0]["msg"] == (
        f"dataset_id {dataset_id}: none of its 24 rows keeps a trainable token within cutoff_len=256 with tiny-llama's "
        "tokenizer: raise cutoff_len (tiny-llama takes up to 512), shorten the prompts, or set train_on_inputs"
    )
