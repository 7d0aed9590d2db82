"""Per-tenant limits on what waits for or runs on the workers: MOLA_MAX_ACTIVE_JOBS queued and
running jobs (a 429 for one more, created or resumed; a replayed request is no new job)."""

from __future__ import annotations

from tests.service.conftest import auth, job_body, make_dataset


def _limit(client, active_jobs: int) -> None:
    client.app.state.settings = client.app.state.settings.model_copy(update={"max_active_jobs": active_jobs})


def _post(client, key, dataset_id: str, idempotency_key: str | None = None):
    headers = {**auth(key), **({"Idempotency-Key": idempotency_key} if idempotency_key else {})}
    return client.post("/jobs", headers=headers, json=job_body(dataset_id))


def test_a_tenant_at_its_limit_of_active_jobs_gets_a_429_until_one_ends(client, key, other_key, queue):
    _limit(client, 2)
    dataset_id = make_dataset(client, key)
    first = _post(client, key, dataset_id).json()["id"]
    second = _post(client, key, dataset_id, idempotency_key="second").json()["id"]

    refused = _post(client, key, dataset_id)
    assert refused.status_code == 429
    assert refused.json()["detail"] == (
        "you have 2 queued or running jobs, the most the server allows at once (MOLA_MAX_ACTIVE_JOBS=2): "
        "send this again once one has finished, or cancel one"
    )
    assert queue.enqueued == [first, second]
    # A retry of a request that created a job is that job, not one more.
    replayed = _post(client, key, dataset_id, idempotency_key="second")
    assert (replayed.status_code, replayed.json()["id"]) == (200, second)
    # Another tenant's jobs do not count against this one.
    assert _post(client, other_key, make_dataset(client, other_key)).status_code == 201

    assert client.post(f"/jobs/{first}/cancel", headers=auth(key)).json()["status"] == "cancelled"
    third = _post(client, key, dataset_id)
    assert third.status_code == 201
    # Resuming makes a job active again: the same limit, and the job stays as it was.
    resumed = client.post(f"/jobs/{first}/resume", headers=auth(key))
    assert resumed.status_code == 429 and "MOLA_MAX_ACTIVE_JOBS=2" in resumed.json()["detail"]
    assert client.get(f"/jobs/{first}", headers=auth(key)).json()["status"] == "cancelled"
    client.post(f"/jobs/{third.json()['id']}/cancel", headers=auth(key))
    assert client.post(f"/jobs/{first}/resume", headers=auth(key)).json()["status"] == "queued"


def test_a_bad_request_at_the_limit_is_told_what_is_wrong_with_it(client, key):
    _limit(client, 1)
    dataset_id = make_dataset(client, key)
    job_id = _post(client, key, dataset_id).json()["id"]
    # Waiting would not make it good: the 422 comes first.
    response = client.post("/jobs", headers=auth(key), json=job_body(dataset_id, allocation=[2, 2]))
    assert response.status_code == 422 and response.json()["errors"][0]["field"] == "body.allocation"
    response = client.post(f"/jobs/{job_id}/resume", headers=auth(key), json={"hyperparameters": {"rank": 4}})
    assert response.status_code == 409  # a queued job: nothing to resume, limit or not
    assert _post(client, key, dataset_id).status_code == 429


def test_no_limit_at_zero(client, key):
    _limit(client, 0)
    dataset_id = make_dataset(client, key)
    assert all(_post(client, key, dataset_id).status_code == 201 for _ in range(3))
