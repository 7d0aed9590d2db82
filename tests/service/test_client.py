"""The client and its CLI commands against real servers: the API of the `app` fixture served by
uvicorn on a port (stopped and started again where a test needs a restart), and, for streams
that break off in exact places, a small socket server that speaks HTTP and SSE by script."""

from __future__ import annotations

import json
import re
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from sqlalchemy import update

from mola import client as client_module
from mola.client import MolaAPIError, MolaClient
from service import cli
from service import jobs as job_service
from service.db import session_scope
from service.models import Dataset, WebhookDelivery
from tests.service.conftest import ALPACA_ROWS, jsonl

pytestmark = pytest.mark.timeout(120)

OWNER = "test-worker"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """The app served by uvicorn in a thread on a port of its own; `stop` then `start` again
    on the same port is a restarting server (open event streams are cut, not drained)."""

    def __init__(self, app) -> None:
        self.app = app
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=0.2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            assert self._thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(20)
        assert not self._thread.is_alive(), "uvicorn did not stop"


@pytest.fixture
def live(app) -> Iterator[LiveServer]:
    server = LiveServer(app)
    server.start()
    yield server
    if server.running:
        server.stop()


@pytest.fixture
def api(live, key) -> Iterator[MolaClient]:
    with MolaClient(live.url, key) as client:
        yield client


@pytest.fixture
def dataset_id(api, tmp_path) -> str:
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl(ALPACA_ROWS))
    return api.upload_dataset(path).id


def mola(capsys, live, key, *args: str) -> tuple[int, str, str]:
    """Run a client command of the `mola` CLI in this process: (exit code, stdout, stderr). An
    exception the command does not handle fails the test with its traceback."""
    code = cli.main([*args, "--url", live.url, "--api-key", key])
    out = capsys.readouterr()
    return code, out.out, out.err


def start_job(sessions, job_id: str, metrics: list[tuple[int, str]] = ()) -> None:
    with session_scope(sessions) as session:
        assert job_service.claim_job(session, job_id, OWNER, 60) is not None
    record(sessions, job_id, metrics)


def record(sessions, job_id: str, metrics: list[tuple[int, str]]) -> None:
    rows = [{"step": step, "kind": kind, "values": {"loss": 1.0 / step}} for step, kind in metrics]
    with session_scope(sessions) as session:
        job_service.record_metrics(session, job_id, rows)


def finish_job(sessions, job_id: str, adapter_key: str | None = None) -> None:
    with session_scope(sessions) as session:
        assert job_service.finish_job(session, job_id, OWNER, "succeeded", result={"train": {"loss": 0.5}}, adapter_key=adapter_key)


def adapter_archive(tmp_path: Path) -> Path:
    folder = tmp_path / "made-adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    archive = tmp_path / "made-adapter.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder / "adapter_config.json", arcname="adapter_config.json")
    return archive


# ---- flags -----------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k, expected", [("2", [2, 2, 2, 2]), ("[2, 2, 1, 1]", [2, 2, 1, 1])])
def test_top_k_is_sent_as_a_number_or_a_list(capsys, live, key, dataset_id, top_k, expected):
    code, out, err = mola(capsys, live, key, "jobs", "create", "--model", "tiny-llama", "--dataset", dataset_id, "--top-k", top_k, "--json")
    assert code == 0, err
    assert json.loads(out)["top_k"] == expected


BAD_FLAGS = [
    # (arguments, the flag the error must name)
    (["--allocation", "[1,2"], "--allocation"),
    (["--allocation", ""], "--allocation"),
    (["--allocation", " "], "--allocation"),
    (["--top-k", "[1,2"], "--top-k"),
    (["--top-k", "two"], "--top-k"),
    (["--top-k", "true"], "--top-k"),
    (["--hp", "warmup_steps"], "--hp"),
    (["--hp", "=3"], "--hp"),
    (["--hp", "dropout=NaN"], "--hp"),
    (["--hp", "target_modules=[q_proj"], "--hp"),
    (["--max-steps", "many"], "--max-steps"),
]


@pytest.mark.parametrize("flags, flag", BAD_FLAGS)
def test_a_bad_flag_value_is_a_usage_error_naming_the_flag(capsys, flags, flag):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["jobs", "create", "--model", "tiny-llama", "--dataset", "ds_1", *flags, "--url", "http://127.0.0.1:9"])
    assert exit_.value.code == 2
    assert f"error: argument {flag}" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["jobs", "show"], ["jobs", "delete"], ["jobs", "download"], ["datasets", "delete"]])
def test_an_empty_id_is_a_usage_error(capsys, command):
    """`mola jobs show "$ID"` with ID unset: a usage error, not the client's traceback."""
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "", "--url", "http://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "error: argument id: not an id: ''" in err and "Traceback" not in err


def test_hp_values_are_json_or_plain_words():
    args = cli.build_parser().parse_args(
        ["jobs", "create", "--model", "m", "--dataset", "d", "--hp", "warmup_steps=0", "--hp", "bf16=false",
         "--hp", "lr_schedule=linear", "--hp", "target_modules=[\"q_proj\"]", "--allocation", "inverted_triangle:5"]
    )
    assert args.allocation == ["inverted_triangle:5"]  # one per --allocation
    assert dict(args.hp) == {"warmup_steps": 0, "bf16": False, "lr_schedule": "linear", "target_modules": ["q_proj"]}


def test_files_that_cannot_be_read_are_errors_not_tracebacks(capsys, live, key, tmp_path):
    code, _, err = mola(capsys, live, key, "datasets", "upload", str(tmp_path / "nonexist.jsonl"))
    assert code == 1 and err == f"error: {tmp_path / 'nonexist.jsonl'}: No such file or directory\n"
    code, _, err = mola(capsys, live, key, "datasets", "upload", str(tmp_path))
    assert code == 1 and err == f"error: {tmp_path}: Is a directory\n"


@pytest.mark.parametrize("command", [["jobs", "follow", "job_1"], ["jobs", "download", "job_1"], ["datasets", "upload", "FILE"], ["models", "list"]])
def test_a_server_that_is_not_running_is_an_error_line(capsys, tmp_path, command):
    upload = tmp_path / "train.jsonl"
    upload.write_bytes(jsonl(ALPACA_ROWS))
    args = [str(upload) if a == "FILE" else a for a in command]
    code = cli.main([*args, "--url", f"http://127.0.0.1:{_free_port()}", "--api-key", "k"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: cannot reach http://127.0.0.1:") and err.count("\n") == 1


# ---- --json: the API's answer as it sent it -------------------------------------------------
def test_json_output_is_the_api_answer(capsys, live, key, api, dataset_id, sessions):
    first = api.create_job("tiny-llama", dataset_id, hyperparameters={"max_steps": 2})
    api.create_job("tiny-llama", dataset_id, method="lora")
    start_job(sessions, first.id, [(1, "train")])
    http = httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {key}"})
    commands = [
        (["jobs", "list", "--limit", "1"], "/jobs?limit=1"),
        (["jobs", "show", first.id], f"/jobs/{first.id}"),
        (["jobs", "metrics", first.id], f"/jobs/{first.id}/metrics"),
        (["jobs", "checkpoints", first.id], f"/jobs/{first.id}/checkpoints"),
        (["datasets", "list"], "/datasets"),
        (["datasets", "show", dataset_id], f"/datasets/{dataset_id}"),
        (["models", "list"], "/models"),
    ]
    for args, path in commands:
        code, out, err = mola(capsys, live, key, *args, "--json")
        answer = http.get(path).json()
        if args[:2] == ["jobs", "show"]:  # the ETA is computed at each request
            answer["progress"]["eta_seconds"] = json.loads(out)["progress"]["eta_seconds"]
        assert code == 0 and json.loads(out) == answer, args
    page = json.loads(mola(capsys, live, key, "jobs", "list", "--limit", "1", "--json")[1])
    assert page["has_more"] is True and page["last_id"] == page["data"][0]["id"]
    assert page["data"][0]["created_at"].endswith("Z") and "T" in page["data"][0]["created_at"]
    http.close()


def test_datasets_show_is_text_without_json(capsys, live, key, dataset_id):
    code, out, _ = mola(capsys, live, key, "datasets", "show", dataset_id)
    assert code == 0 and out.startswith(f"id:          {dataset_id}\n")
    assert "rows:        24 valid of 24, format alpaca" in out and not out.lstrip().startswith("{")


def test_datasets_show_writes_counts_a_person_reads(capsys, live, key, api, settings, sessions, monkeypatch, tmp_path):
    """Token counts as the quick task writes them (here one whose mean is 8/3): the mean
    rounded, a count of one in the singular, the creation time in UTC like `jobs show`; the
    rows a model's tokenizer cannot render, by line."""
    from worker import tasks

    path = tmp_path / "thirds.jsonl"
    path.write_bytes(jsonl([{"text": "a"}, {"text": "bb"}, {"text": "bb"}]))
    code, out, _ = mola(capsys, live, key, "datasets", "upload", str(path))
    dataset_id = out.split()[0]
    assert code == 0 and out.endswith(": 3 rows, format text\n")
    monkeypatch.setattr(tasks, "get_settings", lambda: settings)
    assert tasks.count_tokens.run(dataset_id) == "ready"
    assert api.get_dataset(dataset_id).token_counts["models"]["tiny-llama"]["mean_tokens"] == 8 / 3

    code, out, _ = mola(capsys, live, key, "datasets", "show", dataset_id)
    assert code == 0 and "  tiny-llama: 8 tokens, mean 2.7, max 3; 0 rows over cutoff_len 256\n" in out
    assert re.search(r"^created:     \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$", out, re.M), out

    path.write_bytes(jsonl([{"text": "x" * 300}]))
    code, out, _ = mola(capsys, live, key, "datasets", "upload", str(path))
    one = out.split()[0]
    assert code == 0 and out.endswith(": 1 row, format text\n")
    assert tasks.count_tokens.run(one) == "ready"
    code, out, _ = mola(capsys, live, key, "datasets", "show", one)
    assert "; 1 row over cutoff_len 256" in out
    code, out, _ = mola(capsys, live, key, "datasets", "list")
    assert re.search(rf"^{one}  thirds.jsonl +1 row  ", out, re.M) and re.search(rf"^{dataset_id}  thirds.jsonl +3 rows  ", out, re.M), out

    refused = {"line": 2, "message": "cannot render the record: Conversation roles must alternate user/assistant"}
    with session_scope(sessions) as session:
        dataset = session.get(Dataset, dataset_id)
        dataset.token_counts = {"tiny-llama": {**dataset.token_counts["tiny-llama"], "valid_rows": 2, "unrenderable": [refused]}}
    code, out, _ = mola(capsys, live, key, "datasets", "show", dataset_id)
    assert "over cutoff_len 256\n    line 2: cannot render the record: Conversation roles must alternate user/assistant\n" in out, out


def _work_when_queued(queue, sessions, metrics: list[tuple[int, str]]) -> threading.Thread:
    """The worker's writes, done when the API enqueues the next job: claim, metrics, success."""
    before = len(queue.enqueued)

    def work() -> None:
        deadline = time.monotonic() + 30
        while len(queue.enqueued) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        job_id = queue.enqueued[-1]
        start_job(sessions, job_id, metrics)
        finish_job(sessions, job_id)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_create_json_follow_keeps_stdout_one_json_answer(capsys, live, key, dataset_id, queue, sessions):
    worker = _work_when_queued(queue, sessions, [(1, "train"), (2, "train")])
    code, out, err = mola(capsys, live, key, "jobs", "create", "--model", "tiny-llama", "--dataset", dataset_id, "--json", "--follow")
    worker.join()
    job = json.loads(out)  # one JSON document: nothing else on stdout
    assert code == 0 and job["status"] == "queued" and job["created_at"].endswith("Z")
    assert f"{job['id']}: succeeded" in err

    code, out, err = mola(capsys, live, key, "jobs", "follow", job["id"], "--json")
    assert code == 0 and json.loads(out)["status"] == "succeeded" and f"{job['id']}: succeeded" in err


# ---- following, downloading ----------------------------------------------------------------
def test_following_a_missing_job_draws_no_progress_bar(capsys, live, key):
    code, out, err = mola(capsys, live, key, "jobs", "follow", "job_nope")
    assert code == 1 and out == "" and err == "error (404): job 'job_nope' not found\n"


@pytest.mark.parametrize("method, shape, loader", [
    ("mola", "experts per layer [2, 4, 6, 8], top-k [2, 2, 2, 2]", "mola.load_mola_model(base, "),
    ("lora", "LoRA rank 8, alpha 16.0", "peft.PeftModel.from_pretrained(base, "),
])
def test_create_and_extract_speak_of_the_method(capsys, live, key, dataset_id, sessions, storage, tmp_path, method, shape, loader):
    code, out, _ = mola(capsys, live, key, "jobs", "create", "--model", "tiny-llama", "--dataset", dataset_id, "--method", method)
    assert code == 0 and out.endswith(f"{method} on tiny-llama, {shape}\n")
    job_id = out.split()[1].rstrip(":")
    storage.put_file(f"jobs/{job_id}/adapter.tar.gz", adapter_archive(tmp_path))
    start_job(sessions, job_id)
    finish_job(sessions, job_id, adapter_key=f"jobs/{job_id}/adapter.tar.gz")
    code, out, err = mola(capsys, live, key, "jobs", "download", job_id, "--extract", str(tmp_path / "out"))
    assert code == 0, err
    assert f"{loader}'{tmp_path / 'out'}')" in out and (tmp_path / "out" / "adapter_config.json").is_file()
    assert out.endswith(f"try it: mola generate {tmp_path / 'out'} --prompt '...'\n")
    code, out, err = mola(capsys, live, key, "jobs", "download", job_id, "-o", str(tmp_path / "a.tar.gz"))
    assert code == 0 and out == f"saved {tmp_path / 'a.tar.gz'}\ntry it: mola generate {tmp_path / 'a.tar.gz'} --prompt '...'\n"


def test_download_to_stdout_writes_the_archive_there(capsysbinary, live, key, api, dataset_id, sessions, storage, tmp_path, monkeypatch):
    job_id = api.create_job("tiny-llama", dataset_id).id
    archive = adapter_archive(tmp_path)
    storage.put_file(f"jobs/{job_id}/adapter.tar.gz", archive)
    start_job(sessions, job_id)
    finish_job(sessions, job_id, adapter_key=f"jobs/{job_id}/adapter.tar.gz")
    monkeypatch.chdir(tmp_path)
    code = cli.main(["jobs", "download", job_id, "-o", "-", "--url", live.url, "--api-key", key])
    out = capsysbinary.readouterr().out
    assert code == 0 and out == archive.read_bytes() and not (tmp_path / "-").exists()


def test_jobs_delete_removes_a_finished_job_and_refuses_a_queued_one(capsys, live, key, api, dataset_id, sessions, storage, tmp_path):
    queued = api.create_job("tiny-llama", dataset_id).id
    code, _, err = mola(capsys, live, key, "jobs", "delete", queued)
    assert code == 1 and err.startswith("error (409): ")
    done = api.create_job("tiny-llama", dataset_id).id
    storage.put_file(f"jobs/{done}/adapter.tar.gz", adapter_archive(tmp_path))
    start_job(sessions, done, [(1, "train")])
    finish_job(sessions, done, adapter_key=f"jobs/{done}/adapter.tar.gz")
    code, out, err = mola(capsys, live, key, "jobs", "delete", done)
    assert (code, out) == (0, f"deleted {done}\n"), err
    assert storage.list(f"jobs/{done}") == []
    with pytest.raises(MolaAPIError) as gone:
        api.get_job(done)
    assert gone.value.status_code == 404
    assert [job.id for job in api.list_jobs()] == [queued]


def test_jobs_resume_in_the_client_and_the_cli(capsys, live, key, api, dataset_id, sessions):
    job_id = api.create_job("tiny-llama", dataset_id, hyperparameters={"max_steps": 8, "batch_size": 4}).id
    start_job(sessions, job_id, [(1, "train"), (2, "train"), (3, "train")])
    with session_scope(sessions) as session:
        job_service.record_checkpoint(session, job_id, 2, f"jobs/{job_id}/checkpoints/r/checkpoint-2", 1000, {"loss": 0.5})
        assert job_service.finish_job(session, job_id, OWNER, "failed", error="CUDA out of memory", error_kind="out_of_memory")

    assert api.get_job(job_id).error_kind == "out_of_memory"
    code, out, _ = mola(capsys, live, key, "jobs", "show", job_id)
    assert code == 0 and out.endswith(
        f"resume:      from its newest checkpoint with less memory: `mola jobs resume {job_id} --micro-batch-size 2` (or --hp gradient_checkpointing=true)\n"
    )
    code, _, err = mola(capsys, live, key, "jobs", "resume", job_id, "--hp", "learning_rate=0.1")
    assert code == 1 and err.startswith("error (422): body.hyperparameters.learning_rate: cannot change on resume")
    code, out, err = mola(capsys, live, key, "jobs", "resume", job_id, "--micro-batch-size", "1", "--hp", "gradient_checkpointing=true")
    assert (code, out) == (0, f"{job_id}: queued, resuming from its checkpoint at step 2\n"), err
    job = api.get_job(job_id)
    assert (job.hyperparameters["micro_batch_size"], job.hyperparameters["gradient_checkpointing"], job.error) == (1, True, None)
    with pytest.raises(MolaAPIError) as again:
        api.resume_job(job_id)
    assert again.value.status_code == 409 and "is queued" in again.value.detail

    start_job(sessions, job_id)
    finish_job(sessions, job_id)
    with pytest.raises(MolaAPIError) as done:
        api.resume_job(job_id, {"micro_batch_size": 2})
    assert done.value.status_code == 409 and "has succeeded" in done.value.detail


# ---- events: reconnecting ------------------------------------------------------------------
def test_events_resume_across_a_server_restart(live, api, dataset_id, sessions):
    job_id = api.create_job("tiny-llama", dataset_id).id
    start_job(sessions, job_id, [(1, "train"), (2, "eval"), (2, "train")])
    events = api.events(job_id)
    seen = [next(events) for _ in range(4)]
    assert [e for e, _ in seen] == ["job", "metric", "metric", "metric"]

    live.stop()  # cuts the open stream; the client finds nothing listening until the restart
    record(sessions, job_id, [(3, "train")])
    finish_job(sessions, job_id)
    restart = threading.Timer(1.5, live.start)
    restart.start()
    seen += list(events)
    restart.join()

    metrics = [(m.step, m.kind) for e, m in seen if e == "metric"]
    assert metrics == [(1, "train"), (2, "eval"), (2, "train"), (3, "train")]
    assert [j.status for e, j in seen if e == "job"] == ["running", "succeeded"]
    assert seen[-1] == ("end", {"status": "succeeded", "error": None})


def job_json(status: str = "running", step: int = 0) -> dict:
    return {
        "id": "job_1", "status": status, "base_model": "tiny-llama", "method": "mola", "dataset_id": "ds_1",
        "validation_dataset_id": None, "allocation": [2, 4, 6, 8], "top_k": [2, 2, 2, 2], "allocation_spec": "2468",
        "hyperparameters": {}, "suffix": None, "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z",
        "started_at": None, "finished_at": None, "cancel_requested": False,
        "progress": {"step": step, "total_steps": 3, "epoch": None, "fraction": None, "eta_seconds": None},
        "error": None, "result": None, "adapter_available": False, "attempts": 1,
    }


def sse(event: str, data: dict, event_id: str | None = None) -> str:
    return (f"id: {event_id}\n" if event_id else "") + f"event: {event}\ndata: {json.dumps(data)}\n\n"


def metric(step: int, kind: str = "train") -> dict:
    return {"step": step, "kind": kind, "created_at": "2026-01-01T00:00:00Z", "metrics": {"loss": 1.0}}


class ScriptedServer:
    """A real HTTP server on a socket that answers its Nth connection with the Nth script entry:
    (status, body text, whole) — ``whole`` False cuts the chunked body off mid-way, as a server
    that dies does. It records each request's headers and when it arrived; after the last entry
    it stops listening, so further connections are refused."""

    def __init__(self, script: list[tuple[int, str, bool]]) -> None:
        self.script = script
        self.requests: list[tuple[float, dict[str, str]]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.cut_at: list[float] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with self.listener:
            for status, body, whole in self.script:
                conn, _ = self.listener.accept()
                with conn:
                    self.requests.append((time.monotonic(), self._read_headers(conn)))
                    self._answer(conn, status, body, whole)
                    self.cut_at.append(time.monotonic())

    @staticmethod
    def _read_headers(conn: socket.socket) -> dict[str, str]:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        lines = data.split(b"\r\n\r\n")[0].decode().split("\r\n")[1:]
        return {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}

    @staticmethod
    def _answer(conn: socket.socket, status: int, body: str, whole: bool) -> None:
        kind = "text/event-stream" if status == 200 else "application/json"
        payload = body.encode()
        head = f"HTTP/1.1 {status} X\r\nContent-Type: {kind}\r\nTransfer-Encoding: chunked\r\n\r\n"
        conn.sendall(head.encode() + f"{len(payload):x}\r\n".encode() + payload + b"\r\n" + (b"0\r\n\r\n" if whole else b""))
        if not whole:
            conn.shutdown(socket.SHUT_RDWR)  # the body's end never comes


def test_events_reconnect_with_the_last_id_and_skip_what_is_replayed():
    first = (
        "retry: 1200\n\n"
        + sse("job", job_json(step=1)) + sse("metric", metric(1), "1:train") + sse("metric", metric(2, "eval"), "2:eval")
        + "id: 2:train\nevent: metric\ndata: {\"st"  # cut off: this event never completed
    )
    second = (  # a server that resumes too early: the same job state and step 2's eval again
        sse("job", job_json(step=1)) + sse("metric", metric(2, "eval"), "2:eval") + sse("metric", metric(2), "2:train")
        + sse("job", job_json("succeeded", 3)) + sse("metric", metric(3), "3:train") + sse("end", {"status": "succeeded", "error": None})
    )
    server = ScriptedServer([(200, first, False), (503, '{"detail": "restarting"}', True), (200, second, True)])
    with MolaClient(server.url, "k") as client:
        seen = list(client.events("job_1"))
    assert [(e, d.step, d.kind) if e == "metric" else (e,) for e, d in seen] == [
        ("job",), ("metric", 1, "train"), ("metric", 2, "eval"), ("metric", 2, "train"), ("job",), ("metric", 3, "train"), ("end",)
    ]
    assert [headers.get("last-event-id") for _, headers in server.requests] == [None, "2:eval", "2:eval"]
    assert server.requests[1][0] - server.cut_at[0] >= 1.2  # the server's retry: 1200 (ms)


def test_events_give_up_with_an_api_error(capsys, monkeypatch):
    server = ScriptedServer([(200, sse("job", job_json()) + sse("metric", metric(1), "1"), False)])
    with MolaClient(server.url, "k") as client:
        events = client.events("job_1", reconnect_seconds=1.0)
        assert [e for e, _ in [next(events), next(events)]] == ["job", "metric"]
        started = time.monotonic()
        with pytest.raises(MolaAPIError) as error:
            next(events)
    assert error.value.status_code == 0 and "lost the event stream of job job_1" in error.value.detail
    assert 0.9 <= time.monotonic() - started < 10  # the budget counts from the last event, just before

    server = ScriptedServer([(200, sse("job", job_json()), False)])
    monkeypatch.setattr(client_module, "EVENTS_RECONNECT_SECONDS", 1.0)
    code = cli.main(["jobs", "follow", "job_1", "--url", server.url, "--api-key", "k"])
    err = capsys.readouterr().err
    assert code == 1 and "error: lost the event stream of job job_1" in err and "Traceback" not in err


def test_a_download_that_breaks_off_leaves_no_half_archive(capsys, tmp_path):
    """The adapter's answer cut off mid-way: no partial file at the destination (a new one, or
    a folder to extract into, made for it), an earlier archive there kept as it was, and an
    error that says the answer broke off (the server was reached)."""
    earlier = tmp_path / "adapter.tar.gz"
    earlier.write_bytes(b"the archive of an earlier download")
    server = ScriptedServer([(200, "x" * 5000, False)] * 4)
    with MolaClient(server.url, "k") as client:
        for dest, extract in ((earlier, False), (tmp_path / "new" / "a.tar.gz", False), (tmp_path / "unpacked", True)):
            with pytest.raises(MolaAPIError) as error:
                client.download_adapter("job_1", dest, extract=extract)
            assert error.value.status_code == 0 and "/jobs/job_1/adapter broke off" in error.value.detail
    assert earlier.read_bytes() == b"the archive of an earlier download"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.tar.gz"]

    code = cli.main(["jobs", "download", "job_1", "-o", str(tmp_path / "cli.tar.gz"), "--url", server.url, "--api-key", "k"])
    err = capsys.readouterr().err
    assert code == 1 and "broke off" in err and "cannot reach" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.tar.gz"]


def test_ids_are_one_path_segment(api, dataset_id):
    """An id with '/', '..' or '?' in it (pasted with something else, or taken from elsewhere)
    names no object: it never reaches another endpoint, such as a DELETE of a dataset."""
    job = api.create_job("tiny-llama", dataset_id, hyperparameters={"max_steps": 2})
    for call in (api.delete_job, api.get_job, api.cancel_job, api.resume_job, api.checkpoints, lambda i: list(api.events(i))):
        with pytest.raises(MolaAPIError) as error:
            call(f"{job.id}/../../datasets/{dataset_id}")
        assert error.value.status_code == 404, error.value
    with pytest.raises(MolaAPIError) as error:
        api.delete_dataset(f"{dataset_id}?x=1")
    assert error.value.status_code == 404
    assert api.get_dataset(dataset_id).id == dataset_id and api.get_job(job.id).status == "queued"
    assert api.get_model("tiny-llama").name == "tiny-llama"
    for bad in ("", ".."):
        with pytest.raises(ValueError, match="not an id"):
            api.get_job(bad)


# ---- expert analysis -------------------------------------------------------------------------
def _real_analysis() -> dict:
    """What a worker stores: `expert_report` of a tiny MoLA model routing one batch."""
    torch = pytest.importorskip("torch")
    from mola import MolaConfig, byte_tokenizer, get_mola_model, tiny_model
    from mola.analysis import expert_report
    from mola.data import collate, load_training_data

    torch.manual_seed(0)
    model = get_mola_model(tiny_model("llama"), MolaConfig(experts="2468", top_k=2))
    for _, module in model.mola_modules():
        torch.nn.init.normal_(module.lora_B, std=0.1)
    tokenizer = byte_tokenizer()
    batch = collate(load_training_data([{"text": "route these tokens"}], tokenizer), tokenizer.pad_token_id)
    return {"status": "ready", "split": "train", "examples": 1, **expert_report(model, [batch])}


def test_jobs_analysis_in_the_client_and_the_cli(capsys, live, key, api, dataset_id, sessions):
    running = api.create_job("tiny-llama", dataset_id).id
    start_job(sessions, running)
    with pytest.raises(MolaAPIError) as refused:
        api.analysis(running)
    assert refused.value.status_code == 409 and "computed when it finishes" in refused.value.detail
    code, _, err = mola(capsys, live, key, "jobs", "analysis", running)
    assert code == 1 and err.startswith("error (409): ")

    stored = _real_analysis()
    with session_scope(sessions) as session:
        assert job_service.finish_job(session, running, OWNER, "succeeded", adapter_key="jobs/x/adapter.tar.gz", analysis=stored)
    analysis = api.analysis(running)
    assert (analysis.job_id, analysis.status, analysis.split, analysis.tokens) == (running, "ready", "train", stored["tokens"])
    assert [row["num_experts"] for row in analysis.layers] == [2, 4, 6, 8] and len(analysis.modules) == 28
    assert analysis.layers[3]["selection_share"] == stored["layers"][3]["selection_share"]

    code, out, _ = mola(capsys, live, key, "jobs", "analysis", running)
    lines = out.splitlines()
    assert code == 0 and lines[0] == f"routing of the first 1 train examples ({stored['tokens']} tokens)"
    layer3 = stored["layers"][3]
    assert lines[-1].split() == [
        "layer", "3", "8", "2", f"{layer3['max_load']:.2f}", f"{layer3['min_load']:.2f}", f"{layer3['relative_distance']:.2f}",
        *(f"{share:.2f}" for share in layer3["selection_share"]),
    ]
    code, out, _ = mola(capsys, live, key, "jobs", "analysis", running, "--modules")
    rows = out.splitlines()[3:]
    assert code == 0 and len(rows) == 28 and rows[-1].split()[:3] == ["model.layers.3.mlp.down_proj", "8", "2"]
    code, out, _ = mola(capsys, live, key, "jobs", "analysis", running, "--json")
    assert code == 0 and json.loads(out) == analysis.raw
    code, out, _ = mola(capsys, live, key, "jobs", "show", running)
    assert code == 0 and out.endswith(f"experts:     routing and redundancy per layer: `mola jobs analysis {running}`\n")


def test_checkpoints_mark_the_best_eval_loss(capsys, live, key, api, dataset_id, sessions):
    job_id = api.create_job("tiny-llama", dataset_id).id
    start_job(sessions, job_id)
    with session_scope(sessions) as session:
        for step, metrics in [(2, {"loss": 1.0, "eval_loss": 0.8}), (4, {"loss": 0.9, "eval_loss": 0.6}), (6, {"loss": 0.7})]:
            job_service.record_checkpoint(session, job_id, step, f"jobs/{job_id}/checkpoints/r/checkpoint-{step}", 1000, metrics)
    assert [(c.step, c.best) for c in api.checkpoints(job_id)] == [(2, False), (4, True), (6, False)]
    code, out, _ = mola(capsys, live, key, "jobs", "checkpoints", job_id)
    lines = out.splitlines()
    assert code == 0 and lines[1].endswith("eval_loss=0.6000  (best eval_loss)") and "best" not in lines[0] + lines[2]


# ---- comparing jobs --------------------------------------------------------------------------
def test_jobs_compare_in_the_client_and_the_cli(capsys, live, key, api, dataset_id, sessions, tmp_path):
    (tmp_path / "val.jsonl").write_bytes(jsonl(ALPACA_ROWS[:2]))
    validation = api.upload_dataset(tmp_path / "val.jsonl").id
    inverted = api.create_job("tiny-llama", dataset_id, allocation="8642", validation_dataset_id=validation).id
    lora = api.create_job("tiny-llama", dataset_id, method="lora", validation_dataset_id=validation, hyperparameters={"rank": 16}).id
    queued = api.create_job("tiny-llama", dataset_id, allocation=[2, 2, 4, 4], top_k=[1, 1, 2, 2], validation_dataset_id=validation).id
    evals = {inverted: [(2, 0.9), (4, 0.7), (6, 0.8)], lora: [(2, 0.95), (4, 0.75), (6, 0.72)]}
    for job_id, losses in evals.items():
        start_job(sessions, job_id)
        with session_scope(sessions) as session:
            job_service.heartbeat(session, job_id, OWNER, 60, step=6, total_steps=6)
            job_service.record_metrics(session, job_id, [
                {"step": 6, "kind": "train", "values": {"loss": 0.61, "lm_loss": 0.6, "aux_loss": 10.0, "tokens_per_s": 1234.5, "peak_memory_mb": 4321.0}},
                *({"step": step, "kind": "eval", "values": {"eval_loss": loss, "eval_exact_match": 0.5}} for step, loss in losses),
            ])
            job_service.finish_job(session, job_id, OWNER, "succeeded", result={"warmup_steps": 1, "bf16": False})

    comparison = api.compare_jobs([inverted, lora, queued])
    assert [row["id"] for row in comparison.jobs] == [inverted, lora, queued]
    assert comparison.best_eval_loss == inverted and comparison.warnings == []
    assert comparison.jobs[0]["best_eval"] == {"step": 4, "eval_loss": 0.7, "eval_exact_match": 0.5, "eval_answer_accuracy": None}
    with pytest.raises(TypeError):
        api.compare_jobs(inverted)

    code, out, _ = mola(capsys, live, key, "jobs", "compare", inverted, lora, queued)
    lines = out.splitlines()
    assert code == 0
    assert lines[0].split() == ["job", "status", "trained", "params", "steps", "lm_loss", "eval_loss", "best", "eval_loss", "exact", "tokens/s", "peak", "MB", "time"]
    assert lines[1].split()[:-1] == [inverted, "succeeded", "8642", "top-2", "174,080", "6/6", "0.6000", "0.8000", "0.7000", "@4", "*", "50.0%", "1,234", "4,321"]
    assert lines[2].split()[:-1] == [lora, "succeeded", "LoRA", "r16", lines[2].split()[4], "6/6", "0.6000", "0.7200", "0.7200", "@6", "50.0%", "1,234", "4,321"]
    assert lines[3].split() == [queued, "queued", "2,2,4,4", "top-k", "[1,", "1,", "2,", "2]", lines[3].split()[8], "0", "-", "-", "-", "-", "-", "-", "-"]
    assert lines[4].startswith("(* the lowest eval_loss")
    assert lines[5:] == [
        "differs:",
        '  method: "mola" | "lora" | "mola"',
        "  allocation: [8, 6, 4, 2] | - | [2, 2, 4, 4]",
        "  top_k: [2, 2, 2, 2] | - | [1, 1, 2, 2]",
        "  hyperparameters.bf16: false | false | -",
        "  hyperparameters.rank: 8 | 16 | 8",
        "  hyperparameters.warmup_steps: 1 | 1 | -",
    ]
    code, out, _ = mola(capsys, live, key, "jobs", "compare", inverted, lora, "--json")
    assert code == 0 and json.loads(out) == api.compare_jobs([inverted, lora]).raw
    code, _, err = mola(capsys, live, key, "jobs", "compare", inverted)
    assert code == 1 and err == "error (422): query.ids: give 2 to 20 job ids to compare, got 1\n"
    # --dataset: the newest jobs training on it, newest first.
    code, out, _ = mola(capsys, live, key, "jobs", "compare", "--dataset", dataset_id, "--json")
    assert code == 0 and [row["id"] for row in json.loads(out)["jobs"]] == [queued, lora, inverted]
    code, _, err = mola(capsys, live, key, "jobs", "compare", "--dataset", validation)
    assert code == 1 and err == f"error: {validation} has 0 jobs training on it: nothing to compare\n"
    code, _, err = mola(capsys, live, key, "jobs", "compare", inverted, "--dataset", dataset_id)
    assert code == 2 and "not both" in err


def test_one_job_per_allocation_is_a_sweep_created_once(capsys, live, key, api, dataset_id):
    args = ("jobs", "create", "--model", "tiny-llama", "--dataset", dataset_id, "--allocation", "2468", "--allocation", "8642", "--allocation", "[4, 4, 4, 4]")
    code, out, _ = mola(capsys, live, key, *args, "--idempotency-key", "sweep-1")
    *lines, hint = out.splitlines()
    ids = [line.split()[1].rstrip(":") for line in lines]
    assert code == 0 and len(ids) == 3 and all(line.startswith("created job_") for line in lines)
    assert [api.get_job(job_id).allocation for job_id in ids] == [[2, 4, 6, 8], [8, 6, 4, 2], [4, 4, 4, 4]]
    assert hint == f"compare them: mola jobs compare {' '.join(ids)}"

    # The same command again: the same jobs (keys sweep-1/1, /2, /3), none created twice.
    code, out, _ = mola(capsys, live, key, *args, "--idempotency-key", "sweep-1")
    assert code == 0 and [line.split()[0] for line in out.splitlines()[:3]] == ids and "was created earlier" in out
    code, out, _ = mola(capsys, live, key, *args, "--json")
    assert code == 0 and [job["allocation"] for job in json.loads(out)] == [[2, 4, 6, 8], [8, 6, 4, 2], [4, 4, 4, 4]]
    code, out, _ = mola(capsys, live, key, *args, "--dry-run")
    assert code == 0 and out.count("nothing was created") == 3 and "experts per layer [8, 6, 4, 2]" in out
    assert len(api.list_jobs(limit=100)) == 6


def test_jobs_list_narrowed_by_dataset_and_method(capsys, live, key, api, dataset_id, tmp_path):
    (tmp_path / "other.jsonl").write_bytes(jsonl(ALPACA_ROWS))
    other = api.upload_dataset(tmp_path / "other.jsonl").id
    mola_job, lora_job = api.create_job("tiny-llama", dataset_id).id, api.create_job("tiny-llama", dataset_id, method="lora").id
    elsewhere = api.create_job("tiny-llama", other).id
    assert [job.id for job in api.list_jobs(dataset_id=dataset_id)] == [lora_job, mola_job]
    assert [job.id for job in api.list_jobs(method="mola", base_model="tiny-llama")] == [elsewhere, mola_job]
    code, out, _ = mola(capsys, live, key, "jobs", "list", "--dataset", other)
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == [elsewhere]
    code, out, _ = mola(capsys, live, key, "jobs", "list", "--dataset", dataset_id, "--method", "lora")
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == [lora_job]
    code, _, err = mola(capsys, live, key, "jobs", "list", "--dataset", "ds_nope")
    assert code == 1 and err == "error (422): query.dataset_id: no dataset 'ds_nope': pass one of your dataset ids (`GET /datasets`)\n"


def test_a_sweep_with_one_bad_allocation_creates_no_job(capsys, live, key, api, dataset_id):
    code, out, err = mola(capsys, live, key, "jobs", "create", "--model", "tiny-llama", "--dataset", dataset_id, "--allocation", "2468", "--allocation", "[2, 2]")
    assert code == 1 and out == "" and err.startswith("error (422): body.allocation: ")
    assert len(api.list_jobs()) == 0
    many = [arg for n in range(21) for arg in ("--allocation", str(n % 8 + 1) * 4)]
    code, _, err = mola(capsys, live, key, "jobs", "create", "--model", "tiny-llama", "--dataset", dataset_id, *many)
    assert code == 2 and "at most 20 --allocation values" in err and len(api.list_jobs()) == 0


def test_a_followed_sweep_ends_with_its_comparison(capsys, live, key, api, dataset_id, queue, sessions):
    def work() -> None:  # the worker's writes for each job the API enqueues: the second one fails
        for number in range(2):
            deadline = time.monotonic() + 30
            while len(queue.enqueued) <= number and time.monotonic() < deadline:
                time.sleep(0.05)
            job_id = queue.enqueued[number]
            start_job(sessions, job_id)
            with session_scope(sessions) as session:
                job_service.record_metrics(session, job_id, [{"step": 1, "kind": "eval", "values": {"eval_loss": 0.5 + number}}])
                status, error = ("succeeded", None) if number == 0 else ("failed", "out of memory")
                job_service.finish_job(session, job_id, OWNER, status, error=error)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    code, out, err = mola(capsys, live, key, "jobs", "create", "--model", "tiny-llama", "--dataset", dataset_id, "--allocation", "2468", "--allocation", "8642", "--follow")
    worker.join()
    first, second = queue.enqueued
    assert code == 1  # one of them failed
    lines = out.splitlines()
    assert lines[2:5] == [f"{first}: succeeded", f"{second}: failed: out of memory", ""]
    table = lines[5:]
    assert table[0].startswith("job ") and table[1].split()[:3] == [first, "succeeded", "2468"] and table[2].split()[:3] == [second, "failed", "8642"]
    assert "  allocation: [2, 4, 6, 8] | [8, 6, 4, 2]" in table


def test_jobs_metrics_as_csv_has_every_step_in_columns(capsys, live, key, api, dataset_id, sessions):
    import csv
    import io

    job_id = api.create_job("tiny-llama", dataset_id).id
    start_job(sessions, job_id)
    rows = [{"step": s, "kind": "train", "values": {"loss": 1.0 / s, "lm_loss": 0.9 / s, "lr": 1e-4, "epoch": s / 4, "custom": s}} for s in range(1, 1201)]
    rows += [{"step": s, "kind": "eval", "values": {"eval_loss": 2.0 / s, "epoch": s / 4}} for s in (600, 1200)]
    with session_scope(sessions) as session:
        job_service.record_metrics(session, job_id, rows)

    code, out, _ = mola(capsys, live, key, "jobs", "metrics", job_id, "--csv")
    table = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and out.splitlines()[0] == "step,kind,epoch,loss,lm_loss,lr,eval_loss,custom"
    assert len(table) == 1202  # every page: more than one page of 1000 steps
    assert table[0] == {"step": "1", "kind": "train", "epoch": "0.25", "loss": "1.0", "lm_loss": "0.9", "lr": "0.0001", "eval_loss": "", "custom": "1"}
    assert [r for r in table if r["kind"] == "eval"][0] == {
        "step": "600", "kind": "eval", "epoch": "150.0", "loss": "", "lm_loss": "", "lr": "", "eval_loss": str(2.0 / 600), "custom": ""
    }  # fmt: skip
    code, out, _ = mola(capsys, live, key, "jobs", "metrics", job_id, "--csv", "--kind", "eval", "--after-step", "600")
    assert code == 0 and out.splitlines() == ["step,kind,epoch,eval_loss", f"1200,eval,300.0,{2.0 / 1200}"]
    code, _, err = mola(capsys, live, key, "jobs", "metrics", job_id, "--csv", "--json")
    assert code == 2 and "two formats" in err


# ---- webhooks --------------------------------------------------------------------------------
def test_webhooks_in_the_client_and_the_cli(capsys, live, key, api, dataset_id, settings, sessions):
    from mola.webhooks import verify
    from service import webhooks
    from tests.service.test_webhooks import Receiver

    hooks = Receiver([500, 204])
    try:
        code, out, _ = mola(capsys, live, key, "jobs", "create", "--model", "tiny-llama", "--dataset", dataset_id, "--webhook-url", hooks.url, "--json")
        job_id = json.loads(out)["id"]
        assert code == 0 and api.get_job(job_id).webhook_url == hooks.url
        code, out, _ = mola(capsys, live, key, "jobs", "show", job_id)
        assert f"webhook:     {hooks.url} (deliveries: `mola jobs webhooks {job_id}`)" in out.splitlines()
        code, out, _ = mola(capsys, live, key, "jobs", "webhooks", job_id)
        assert code == 0 and out.startswith("no webhook deliveries")

        api.cancel_job(job_id)
        webhooks.send_due(settings, sessions)  # the receiver answers 500: a retry is due in 30 s
        (delivery,) = api.webhook_deliveries(job_id)
        assert (delivery.event, delivery.status, delivery.attempts, delivery.response_status) == ("job.cancelled", "pending", 1, 500)
        code, out, _ = mola(capsys, live, key, "jobs", "webhooks", job_id)
        assert re.fullmatch(
            rf"{delivery.id}  job\.cancelled  pending, next attempt \S+ \S+ UTC \(1 attempt; the last: the receiver answered 500\)  -> {re.escape(hooks.url)}\n", out
        ), out

        code, out, err = mola(capsys, live, key, "webhooks", "secret")
        secret = out.strip()
        assert code == 0 and secret == api.webhook_secret() and "mola.webhooks.verify" in err
        verify(secret, hooks.requests[0]["headers"], hooks.requests[0]["body"])
        code, out, _ = mola(capsys, live, key, "webhooks", "secret", "--rotate", "--json")
        assert code == 0 and json.loads(out)["secret"] == api.webhook_secret() != secret

        with session_scope(sessions) as session:  # the retry's time has come
            session.execute(update(WebhookDelivery).values(next_attempt_at=job_service.utcnow()))
        webhooks.send_due(settings, sessions)
        code, out, _ = mola(capsys, live, key, "jobs", "webhooks", job_id)
        assert re.fullmatch(rf"{delivery.id}  job\.cancelled  delivered \S+ \S+ UTC \(2 attempts, answered 204\)  -> \S+\n", out), out
        code, out, _ = mola(capsys, live, key, "jobs", "webhooks", job_id, "--json")
        assert json.loads(out)["data"][0]["status"] == "delivered"

        code, out, _ = mola(capsys, live, key, "webhooks", "test", hooks.url)  # the receiver now answers 204
        assert code == 0 and re.fullmatch(rf"delivered: {re.escape(hooks.url)} answered 204 to ping whd_\w+\n", out), out
        assert json.loads(hooks.requests[-1]["body"])["type"] == "ping"
        code, out, _ = mola(capsys, live, key, "webhooks", "test", hooks.url.rsplit(":", 1)[0] + ":9/", "--json")
        assert code == 1 and json.loads(out)["delivered"] is False
        code, _, err = mola(capsys, live, key, "webhooks", "test", "ftp://example.com/")
        assert code == 1 and err.startswith("error (422): body.url: ")
    finally:
        hooks.close()


# ---- planning a job -------------------------------------------------------------------------
def test_plan_job_creates_nothing_and_says_what_the_job_would_be(api, dataset_id, queue):
    plan = api.plan_job("tiny-llama", dataset_id, allocation="2468", hyperparameters={"epochs": 2, "batch_size": 8})
    assert plan["allocation"] == [2, 4, 6, 8] and plan["hyperparameters"]["batch_size"] == 8
    # The upload's token counts are still pending (no quick worker here): the row count stands in.
    assert plan["data"]["train"]["examples"] == 24 and not plan["data"]["train"]["exact"]
    assert plan["schedule"]["total_steps"] == 6 and plan["schedule"]["steps_per_epoch"] == 3
    assert api.list_jobs() == [] and queue.enqueued == []
    with pytest.raises(MolaAPIError) as refused:
        api.plan_job("tiny-llama", dataset_id, allocation=[2, 4])
    assert refused.value.status_code == 422 and "allocation" in refused.value.detail


def test_create_dry_run_prints_the_plan(capsys, live, key, api, dataset_id, queue):
    code, out, err = mola(capsys, live, key, "jobs", "create", "--model", "tiny-llama", "--dataset", dataset_id, "--dry-run",
                          "--epochs", "2", "--batch-size", "8", "--hp", "warmup_steps=1")  # fmt: skip
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("plan: mola on tiny-llama, experts per layer [2, 4, 6, 8], top-k [2, 2, 2, 2]; ")
    assert lines[0].endswith(" adapter parameters")
    assert lines[1] == f"train:      {dataset_id}: 24 rows, at most 24 examples"
    assert lines[2] == "steps:      at most 6 (3 per epoch, 2 epochs), warm-up 1, 2 micro-batches per step"
    plan = api.plan_job("tiny-llama", dataset_id)
    lora = plan["equal_size_lora"]
    assert lines[3] == f"baseline:   a plain LoRA of about this size: --method lora --rank {lora['rank']} ({lora['adapter_parameters']:,} adapter parameters)"
    assert lines[4].startswith("warning:    dataset_id: the plan counts all 24 rows as examples (its token counts for tiny-llama are pending)")
    assert lines[-1] == "nothing was created: run it again without --dry-run to create the job"
    assert queue.enqueued == []

    code, out, err = mola(capsys, live, key, "jobs", "create", "--model", "tiny-llama", "--dataset", dataset_id, "--dry-run", "--json")
    assert code == 0 and json.loads(out)["schedule"]["micro_batches_per_step"] == 4
    code, out, err = mola(capsys, live, key, "jobs", "create", "--model", "tiny-llama", "--dataset", dataset_id, "--dry-run", "--follow")
    assert code == 2 and err == "error: --dry-run creates nothing: it takes neither --follow nor --idempotency-key\n"
    code, out, err = mola(capsys, live, key, "jobs", "create", "--model", "tiny-llama", "--dataset", dataset_id, "--dry-run", "--allocation", "[2, 4]")
    assert code == 1 and err.startswith("error (422): body.allocation: ")
    assert queue.enqueued == []


def test_the_plan_text_says_only_what_the_plan_knows():
    from mola.client_cli import _plan_text

    exact = {"rows": 24, "exact": True, "basis": "the upload's token counts"}
    plan = {
        "method": "lora", "base_model": "tiny-llama", "allocation": None, "top_k": None, "adapter_parameters": None,
        "hyperparameters": {"cutoff_len": 64, "rank": 8},
        "data": {"train": {**exact, "dataset_id": "ds_1", "examples": 24, "over_cutoff": None, "dropped_at_cutoff": 0},  # train_on_inputs
                 "validation": {**exact, "dataset_id": "ds_2", "examples": 22, "over_cutoff": 5, "dropped_at_cutoff": 2}},
        "schedule": {"epochs": 1.333, "steps_per_epoch": 6, "total_steps": 8, "warmup_steps": 0, "micro_batches_per_step": 2, "exact": True},
        "warnings": [],
    }  # fmt: skip
    assert _plan_text(plan).splitlines() == [
        "plan: lora on tiny-llama, LoRA rank 8",
        "train:      ds_1: 24 rows, 24 examples (0 dropped at cutoff_len 64)",
        "validation: ds_2: 24 rows, 22 examples (5 cut, 2 dropped at cutoff_len 64)",
        "steps:      8 (6 per epoch, 1.333 epochs), warm-up 0, 2 micro-batches per step",
        "nothing was created: run it again without --dry-run to create the job",
    ]
