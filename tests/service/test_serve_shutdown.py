"""Ctrl-C of the real `mola serve` while a client follows a job over Server-Sent Events: the
server stops promptly (uvicorn used to wait for the stream, which lasts as long as the job),
and the running job checkpoints and goes back to the queue, as the README promises."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import httpx
import pytest
from sqlalchemy import select

from mola.client import MolaClient
from service.db import make_engine, make_sessionmaker
from service.models import Checkpoint, Job
from service.settings import Settings
from tests.service.conftest import jsonl
from tests.service.test_e2e import FAST, ROWS, Server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# A guard against a hang, not a timing claim: the job needs one more step and a checkpoint.
STOP_BOUND_SECONDS = 30


def _follow(url: str, key: str, job_id: str, lines: list[str], ended: threading.Event) -> None:
    """Read the job's event stream until the server closes it (plain HTTP: `MolaClient.events`
    would reconnect, which is right for a client, but this test is about the server's side)."""
    try:
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.stream("GET", f"{url}/jobs/{job_id}/events", headers=headers, timeout=httpx.Timeout(10, read=None)) as response:
            for line in response.iter_lines():
                lines.append(line)
    except httpx.HTTPError as exc:
        lines.append(f"error: {exc!r}")
    finally:
        ended.set()


def _steps_seen(lines: list[str]) -> list[int]:
    return [json.loads(line[5:])["step"] for line in list(lines) if line.startswith("data:") and '"kind"' in line]


def test_ctrl_c_with_a_follower_stops_the_server_and_checkpoints_the_job(tmp_path):
    server = Server(tmp_path)
    try:
        key = server.wait_ready()
        path = tmp_path / "numbers.jsonl"
        path.write_bytes(jsonl(ROWS))
        with MolaClient(server.url, key) as client:
            dataset = client.upload_dataset(path)
            job = client.create_job("tiny-llama", dataset.id, hyperparameters={**FAST, "max_steps": 5000})
            lines: list[str] = []
            ended = threading.Event()
            threading.Thread(target=_follow, args=(server.url, key, job.id, lines, ended), daemon=True).start()
            deadline = time.monotonic() + 120
            while not any(step >= 2 for step in _steps_seen(lines)):
                assert time.monotonic() < deadline and not ended.is_set(), (lines[-5:], server.log())
                time.sleep(0.1)

            server.proc.send_signal(signal.SIGINT)
            try:
                server.proc.wait(STOP_BOUND_SECONDS)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"mola serve still running {STOP_BOUND_SECONDS} s after Ctrl-C:\n{server.log()}") from None
            assert ended.wait(10), f"the event stream did not end: {lines[-3:]}"
            assert any("shutting down" in line for line in lines), lines[-3:]
    finally:
        server.stop()

    sessions = make_sessionmaker(make_engine(Settings(data_dir=tmp_path)))
    with sessions() as session:
        stopped = session.get(Job, job.id)
        newest = session.scalar(select(Checkpoint.step).where(Checkpoint.job_id == job.id).order_by(Checkpoint.step.desc()))
    # Handed back at the shutdown, to resume from its checkpoint when the server starts again.
    assert stopped.status == "queued", server.log()
    assert newest is not None and 2 <= newest == stopped.step < 5000, server.log()
