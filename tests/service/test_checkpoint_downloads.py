"""GET /jobs/{id}/checkpoints/{step}/adapter: the adapter of one checkpoint, from a real run of
the tiny LLaMA (in-process worker, SQLite, a storage folder)."""

from __future__ import annotations

import io
import tarfile

import pytest

from service import jobs as job_service
from tests.service.conftest import auth, job_body, make_dataset

torch = pytest.importorskip("torch")
runner = pytest.importorskip("worker.runner")

pytestmark = pytest.mark.slow

ROWS = [{"prompt": f"Say the number {i}: ", "completion": f"{i}, and {i + 1} after it."} for i in range(16)]


@pytest.fixture
def trained_job(client, key, settings) -> str:
    dataset_id = make_dataset(client, key, ROWS)
    hp = {"max_steps": 4, "checkpoint_every": 2, "batch_size": 2, "micro_batch_size": 2, "cutoff_len": 64}
    job_id = client.post("/jobs", headers=auth(key), json=job_body(dataset_id, hyperparameters=hp)).json()["id"]
    assert runner.run_job(job_id, settings) == "succeeded"
    return job_id


def _members(content: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(content)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_each_checkpoint_adapter_downloads_with_a_card_naming_its_step(client, key, trained_job, tmp_path):
    steps = [c["step"] for c in client.get(f"/jobs/{trained_job}/checkpoints", headers=auth(key)).json()["data"]]
    assert steps == [2, 4]
    response = client.get(f"/jobs/{trained_job}/checkpoints/2/adapter", headers=auth(key))
    assert response.status_code == 200 and response.headers["content-type"] == "application/gzip"
    assert f'filename="{trained_job}-step2-adapter.tar.gz"' in response.headers["content-disposition"]
    step2 = _members(response.content)
    assert sorted(step2) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "adapter_prompt.json"]
    assert "(checkpoint at step 2 of 4)" in step2["README.md"].decode()

    # The last checkpoint's weights are the final adapter's; step 2's are not.
    final = _members(client.get(f"/jobs/{trained_job}/adapter", headers=auth(key)).content)
    step4 = _members(client.get(f"/jobs/{trained_job}/checkpoints/4/adapter", headers=auth(key)).content)
    from safetensors.torch import load

    def weights(files):
        return load(files["adapter_model.safetensors"])

    assert all(torch.equal(weights(step4)[k], weights(final)[k]) for k in weights(final))
    assert not all(torch.equal(weights(step2)[k], weights(final)[k]) for k in weights(final))


def test_a_step_without_a_checkpoint_is_a_404_naming_the_steps_there_are(client, key, other_key, trained_job):
    response = client.get(f"/jobs/{trained_job}/checkpoints/3/adapter", headers=auth(key))
    assert response.status_code == 404
    assert response.json()["detail"] == f"job {trained_job} has no checkpoint at step 3 (checkpoints: 2, 4)"
    assert client.get(f"/jobs/{trained_job}/checkpoints/2/adapter", headers=auth(other_key)).status_code == 404
    bad = client.get(f"/jobs/{trained_job}/checkpoints/two/adapter", headers=auth(key))
    assert bad.status_code == 422 and "step" in bad.json()["detail"]
    assert client.get(f"/jobs/{trained_job}/checkpoints/-1/adapter", headers=auth(key)).status_code == 422


def test_a_checkpoint_whose_archive_is_gone_is_a_404_that_says_so(client, key, trained_job, sessions, storage):
    with sessions() as session:
        storage.delete(job_service.checkpoint_adapter_key(job_service.get_checkpoint(session, trained_job, 2).storage_prefix))
    response = client.get(f"/jobs/{trained_job}/checkpoints/2/adapter", headers=auth(key))
    assert response.status_code == 404 and "has no adapter archive in storage" in response.json()["detail"]
