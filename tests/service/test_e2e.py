"""End to end: the real `mola serve` (API, embedded Celery worker on the folder broker, SQLite,
local storage) as a subprocess on a free port, driven over HTTP by the client and the CLI."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from mola.client import MolaClient
from tests.service.conftest import jsonl

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
ROWS = [{"prompt": f"Say the number {i}: ", "completion": f"{i}, and {i + 1} after it."} for i in range(24)]
FAST = {"batch_size": 2, "micro_batch_size": 2, "cutoff_len": 64}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, data: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lines: list[str] = []
        self.env = {
            **os.environ,
            "MOLA_DATA_DIR": str(data),
            "MOLA_MODELS": "tiny-llama",
            "MOLA_PORT": str(self.port),
            "MOLA_HOST": "127.0.0.1",
            "MOLA_METRICS_FLUSH_SECONDS": "0.5",
            "MOLA_CANCEL_POLL_SECONDS": "0.2",
            # Generations on a queue of their own: `mola serve` starts a third worker for them.
            "MOLA_GENERATION_QUEUE": "mola.generate",
            "OMP_NUM_THREADS": "1",  # steady steps on a shared 2-core machine (no thread oversubscription)
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"],
            cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def log(self) -> str:
        return "".join(self.lines[-80:])

    def wait_ready(self, timeout: float = 180.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"mola serve exited:\n{self.log()}"
            key = next((m.group(0) for line in self.lines if (m := re.search(r"mola_[0-9a-f]{12}_[A-Za-z0-9_-]+", line))), None)
            try:
                if key and httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200 and any("ready." in l for l in self.lines):
                    return key
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"mola serve not ready after {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("e2e"))
    try:
        server.key = server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(server):
    with MolaClient(server.url, server.key) as client:
        yield client


@pytest.fixture(scope="module")
def dataset_id(server, tmp_path_factory):
    path = tmp_path_factory.mktemp("upload") / "numbers.jsonl"
    path.write_bytes(jsonl(ROWS))
    out = _cli(server, "datasets", "upload", str(path))
    match = re.search(r"(ds_[0-9a-f]+)\s+numbers.jsonl: 24 rows, format completion", out)
    assert match, out
    return match.group(1)


def _cli(server, *args: str, check: bool = True) -> str:
    env = {**os.environ, "MOLA_URL": server.url, "MOLA_API_KEY": server.key}
    result = subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_the_api_process_has_no_torch(server):
    maps = Path(f"/proc/{server.proc.pid}/maps")
    if not maps.exists():
        pytest.skip("needs /proc")
    assert "libtorch" not in maps.read_text()


def test_the_first_key_stays_in_sight(server):
    """No Celery banner (some 35 lines per embedded worker) after the key: it would scroll away."""
    key_line = next(i for i, line in enumerate(server.lines) if server.key in line)
    after = server.lines[key_line:]
    assert any("ready." in line for line in after)  # the workers did start after it
    assert not any("[queues]" in line or "[config]" in line for line in after), "".join(after[:60])


def test_each_worker_reports_itself_on_its_queue(server, client):
    """`mola serve`'s three workers, as GET /queues counts them from what each reports."""
    deadline = time.monotonic() + 60
    while (workers := {q.name: q.workers for q in client.queues()}) != {"mola.train": 1, "mola.quick": 1, "mola.generate": 1}:
        assert time.monotonic() < deadline, (workers, server.log())
        time.sleep(0.3)
    carries = {q.name: q.carries for q in client.queues()}
    assert carries == {"mola.train": ["jobs"], "mola.generate": ["generations"], "mola.quick": ["token counts", "webhooks"]}


def _token_counts_when_done(client, dataset_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while (counts := client.get_dataset(dataset_id).token_counts)["status"] == "pending":
        assert time.monotonic() < deadline, f"token counts still pending after {timeout} s"
        time.sleep(0.3)
    return counts


def test_token_counts_become_ready_after_an_upload(server, client, dataset_id):
    counts = _token_counts_when_done(client, dataset_id)
    assert counts["status"] == "ready", (counts, server.log())
    stats = counts["models"]["tiny-llama"]
    assert set(counts["models"]) == {"tiny-llama"} and stats["valid_rows"] == 24
    assert 0 < stats["max_tokens"] <= stats["total_tokens"] and stats["cutoff_len"] == 256


def test_token_counts_do_not_wait_behind_a_training_job(server, client, dataset_id, tmp_path):
    job = client.create_job("tiny-llama", dataset_id, hyperparameters={**FAST, "max_steps": 5000})
    try:
        for event, data in client.events(job.id):
            if event == "metric" and data.step >= 1:
                break
        path = tmp_path / "more.jsonl"
        path.write_bytes(jsonl(ROWS[:5]))
        uploaded = client.upload_dataset(path)
        assert uploaded.token_counts["status"] == "pending"
        counts = _token_counts_when_done(client, uploaded.id, timeout=60)
        assert counts["status"] == "ready" and counts["models"]["tiny-llama"]["valid_rows"] == 5, server.log()
        assert client.get_job(job.id).status == "running"  # counted while the training ran
    finally:
        client.cancel_job(job.id)
        assert client.wait(job.id, timeout=60, poll=0.2).status == "cancelled", server.log()


def test_a_generation_does_not_wait_behind_a_training_job(server, client, dataset_id):
    short = client.create_job("tiny-llama", dataset_id, hyperparameters={**FAST, "max_steps": 2})
    assert client.wait(short.id, timeout=120, poll=0.2).status == "succeeded", server.log()
    job = client.create_job("tiny-llama", dataset_id, hyperparameters={**FAST, "max_steps": 5000})
    try:
        for event, data in client.events(job.id):
            if event == "metric" and data.step >= 1:
                break
        generation = client.generate(short.id, ["Say the number 3: "], max_new_tokens=4, poll=0.2, timeout=90)
        assert generation.status == "succeeded" and len(generation.texts) == 1, (generation.error, server.log())
        assert client.get_job(job.id).status == "running"  # generated while the training ran
    finally:
        client.cancel_job(job.id)
        assert client.wait(job.id, timeout=60, poll=0.2).status == "cancelled", server.log()


def test_train_follow_download_load_generate(server, client, dataset_id, tmp_path):
    assert [m.name for m in client.list_models()] == ["tiny-llama"]
    assert client.get_model("tiny-llama").max_positions == 512  # migrated, synced, described
    hp = {**FAST, "max_steps": 6, "checkpoint_every": 3}
    job = client.create_job("tiny-llama", dataset_id, allocation="2468", top_k=2, hyperparameters=hp, idempotency_key="e2e-train")
    assert job.status == "queued" and job.allocation == [2, 4, 6, 8]
    assert client.create_job("tiny-llama", dataset_id, allocation="2468", top_k=2, hyperparameters=hp, idempotency_key="e2e-train").id == job.id

    seen_steps, statuses, end = [], [], None
    for event, data in client.events(job.id):
        if event == "metric" and data.kind == "train":
            seen_steps.append(data.step)
        elif event == "job":
            statuses.append(data.status)
        elif event == "end":
            end = data
    assert end == {"status": "succeeded", "error": None}, server.log()
    assert seen_steps == [1, 2, 3, 4, 5, 6] and statuses[-1] == "succeeded"

    job = client.get_job(job.id)
    assert job.progress.step == 6 and job.adapter_available and job.result["train"]["loss"] > 0
    assert [m.step for m in client.all_metrics(job.id, kind="train")] == [1, 2, 3, 4, 5, 6]
    assert [c.step for c in client.checkpoints(job.id)] == [3, 6]

    out = _cli(server, "jobs", "follow", job.id)
    assert f"{job.id}: succeeded" in out
    assert "step" in _cli(server, "jobs", "metrics", job.id)

    folder = client.download_adapter(job.id, tmp_path / "adapter", extract=True)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "adapter_prompt.json"]

    from mola import load_mola_model
    from mola.models import load_base_model

    base, tokenizer = load_base_model("tiny-llama")
    model = load_mola_model(base, folder)
    assert model.experts_per_layer == [2, 4, 6, 8] and model.top_k_per_layer == [2, 2, 2, 2]
    prompt = tokenizer("Say the number 7: ", return_tensors="pt").input_ids
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > prompt.shape[1]
    assert isinstance(tokenizer.decode(generated[0, prompt.shape[1]:]), str)


def test_cancel_a_running_job(server, client, dataset_id):
    job = client.create_job("tiny-llama", dataset_id, allocation=[2, 2, 4, 4], hyperparameters={**FAST, "max_steps": 5000})
    for event, data in client.events(job.id):
        if event == "metric" and data.step >= 2:
            break
    asked = time.monotonic()
    assert client.cancel_job(job.id).cancel_requested
    job = client.wait(job.id, timeout=60, poll=0.2)
    assert job.status == "cancelled", server.log()
    assert time.monotonic() - asked < 20
    assert 2 <= job.progress.step < 5000 and job.adapter_available
    assert client.checkpoints(job.id)[-1].step == job.progress.step
    assert "cancelled" in _cli(server, "jobs", "list", "--status", "cancelled")


def test_a_dead_worker_is_replaced_and_its_job_resumes(server, client, dataset_id):
    job = client.create_job("tiny-llama", dataset_id, hyperparameters={**FAST, "max_steps": 200, "checkpoint_every": 10})
    deadline = time.monotonic() + 120
    while not client.checkpoints(job.id):
        assert time.monotonic() < deadline and client.get_job(job.id).status in ("queued", "running"), server.log()
        time.sleep(0.05)
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children")
    if not children.exists():
        pytest.skip("needs /proc")
    # The training worker, not the quick or generation worker (`mola worker --queues ...`).
    worker_pid = next(int(p) for p in children.read_text().split() if b"--queues" not in Path(f"/proc/{p}/cmdline").read_bytes())
    os.kill(worker_pid, signal.SIGKILL)
    # `mola serve` ends the dead worker's lease; the restarted worker re-queues the job and
    # resumes it from its last checkpoint.
    try:
        job = client.wait(job.id, timeout=120, poll=0.5)
    except TimeoutError as error:
        raise AssertionError("".join(line for line in server.lines if '"GET /' not in line)[-8000:]) from error
    assert job.status == "succeeded" and job.attempts == 2 and job.result["steps"] == 200, server.log()
    assert [m.step for m in client.all_metrics(job.id, kind="train")] == list(range(1, 201))
