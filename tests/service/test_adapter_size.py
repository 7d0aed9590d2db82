"""POST /jobs counts the adapter from the catalogue's module shapes: the job says its size, and
an adapter over MOLA_MAX_ADAPTER_PARAMS is a 422 before anything is queued (not a failure when a
worker starts it)."""

from __future__ import annotations

import pytest

from service import catalogue
from service.db import session_scope
from tests.service.conftest import TINY_LLAMA, auth, job_body, make_dataset


def limit(client, max_adapter_params: int) -> None:
    # The app is built for each test: changing its settings leaks into no other test.
    client.app.state.settings = client.app.state.settings.model_copy(update={"max_adapter_params": max_adapter_params})


@pytest.mark.parametrize(
    "overrides",
    [
        {"allocation": "2468", "top_k": 2},
        {"allocation": [1, 1, 1, 8], "hyperparameters": {"rank": 4, "target_modules": ["self_attn.q_proj", "down_proj"]}},
        {"method": "lora", "allocation": None, "hyperparameters": {"rank": 16}},
    ],
)
def test_the_job_says_the_trainable_parameters_the_worker_builds(client, key, overrides):
    torch = pytest.importorskip("torch")  # noqa: F841 (the built adapter is the reference)
    from mola import MolaConfig, get_mola_model, tiny_model
    from mola.lora import get_lora_model

    response = client.post("/jobs", headers=auth(key), json=job_body(make_dataset(client, key), **overrides))
    assert response.status_code == 201, response.text
    job = response.json()
    hp = job["hyperparameters"]
    if job["method"] == "mola":
        config = MolaConfig(experts=job["allocation"], top_k=job["top_k"], rank=hp["rank"], target_modules=hp["target_modules"])
        built = get_mola_model(tiny_model("llama"), config)
    else:
        built = get_lora_model(tiny_model("llama"), hp["rank"], target_modules=hp["target_modules"])
    assert job["adapter_parameters"] == sum(p.numel() for p in built.parameters() if p.requires_grad)


def test_an_adapter_over_the_limit_is_refused_naming_the_allocation(client, key, queue):
    dataset_id = make_dataset(client, key)
    size = client.post("/jobs", headers=auth(key), json=job_body(dataset_id, allocation="8888")).json()["adapter_parameters"]
    assert size == 4 * (8 * 8 * (2 * 64 + 2 * (64 + 128) + (128 + 64) + 2 * (64 + 32) + 2 * 64) + 8 * (64 * 6 + 128))
    limit(client, size - 1)
    before = client.get("/jobs", headers=auth(key)).json()["data"]
    response = client.post("/jobs", headers=auth(key), json=job_body(dataset_id, allocation="8888"))
    assert response.status_code == 422, response.text
    error = response.json()["errors"][0]
    assert error["field"] == "body.allocation"
    assert error["msg"] == (
        f"the adapter would have {size:,} trainable parameters on tiny-llama, more than this server allows "
        f"({size - 1:,}): lower rank or the experts per layer, or adapt fewer target_modules"
    )
    assert client.get("/jobs", headers=auth(key)).json()["data"] == before and len(queue.enqueued) == 1
    # At the limit, or with fewer experts, it is accepted.
    limit(client, size)
    assert client.post("/jobs", headers=auth(key), json=job_body(dataset_id, allocation="8888")).status_code == 201


def test_a_lora_adapter_over_the_limit_names_the_rank(client, key):
    limit(client, 1000)
    body = job_body(make_dataset(client, key), method="lora", allocation=None, hyperparameters={"rank": 64})
    response = client.post("/jobs", headers=auth(key), json=body)
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "body.hyperparameters.rank"


def test_no_limit_and_rows_without_shapes_leave_the_check_to_the_worker(client, key, sessions):
    dataset_id = make_dataset(client, key)
    limit(client, 0)  # 0: no limit
    assert client.post("/jobs", headers=auth(key), json=job_body(dataset_id, allocation="8888")).status_code == 201
    limit(client, 1000)
    with session_scope(sessions) as session:  # a row synced before module shapes were recorded
        catalogue.upsert(session, "tiny-llama", {k: v for k, v in TINY_LLAMA.items() if k != "module_shapes"})
    response = client.post("/jobs", headers=auth(key), json=job_body(dataset_id, allocation="8888"))
    assert response.status_code == 201 and response.json()["adapter_parameters"] is None
