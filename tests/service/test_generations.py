"""POST /jobs/{id}/generations: a finished job's adapter completing prompts on the server. The
worker's run is in-process on the tiny LLaMA (real SQLite and folder storage) and checked
against `mola.generate` on the downloaded adapter; the reconciler's part on SQLite."""

from __future__ import annotations

import io
import json
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import delete as sql_delete
from sqlalchemy import select, update

from service import generations as generation_service
from service.db import session_scope
from service.models import Checkpoint, Dataset, Generation, Job, utcnow
from service.reconcile import reconcile
from tests.service.conftest import auth, job_body, make_dataset
from tests.service.test_client import live, mola  # noqa: F401 - live is a fixture
from tests.service.test_reconcile import Broker

PROMPTS = ["Say the number 3: ", "Say the number 7: "]


def _post(client, key, job_id: str, **body):
    return client.post(f"/jobs/{job_id}/generations", headers=auth(key), json={"prompts": PROMPTS, **body})


def _finished_job(sessions, client, key) -> str:
    """A job marked succeeded with an adapter key, for the routes (no worker runs here)."""
    job_id = client.post("/jobs", headers=auth(key), json=job_body(make_dataset(client, key))).json()["id"]
    with session_scope(sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="succeeded", adapter_key=f"jobs/{job_id}/adapter.tar.gz"))
    return job_id


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"prompts": []}, "prompts", "at least 1 item"),
        ({"prompts": ["x"] * 17}, "prompts", "at most 16 items"),
        ({"prompts": [""]}, "prompts.0", "at least 1 character"),
        ({"prompts": ["a\x00b"]}, "prompts.0", "NUL"),
        ({"prompts": ["x"], "template": "jinja"}, "template", "'alpaca', 'chat' or 'raw'"),
        ({"prompts": ["x"], "template": "chat", "input": "y"}, "input", "an input goes with the alpaca template, not chat"),
        ({"prompts": ["x"], "max_new_tokens": 0}, "max_new_tokens", "greater than or equal to 1"),
        ({"prompts": ["x"], "max_new_tokens": 4096}, "max_new_tokens", "less than or equal to 2048"),
        ({"prompts": ["x"], "temperature": -1}, "temperature", "greater than or equal to 0"),
        ({"prompts": ["x"], "top_p": 0}, "top_p", "greater than 0"),
        ({"prompts": ["x"], "seed": -1}, "seed", "greater than or equal to 0"),
        ({"prompts": ["x"], "max_tokens": 5}, "max_tokens", "Extra inputs are not permitted"),
    ],
)
def test_bad_requests_name_the_field(client, key, sessions, queue, body, field, message):
    job_id = _finished_job(sessions, client, key)
    response = client.post(f"/jobs/{job_id}/generations", headers=auth(key), json=body)
    assert response.status_code == 422, response.text
    errors = response.json()["errors"]
    assert [e["field"] for e in errors] == [f"body.{field}"] and message in errors[0]["msg"], errors
    assert queue.generations == []


def test_a_job_without_an_adapter_has_nothing_to_try(client, key, other_key, sessions, queue):
    job_id = client.post("/jobs", headers=auth(key), json=job_body(make_dataset(client, key))).json()["id"]
    response = _post(client, key, job_id)
    assert response.status_code == 409 and response.json()["detail"] == f"job {job_id} is queued: its adapter can be tried once it finishes"
    with session_scope(sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="failed"))
    assert _post(client, key, job_id).json()["detail"] == f"job {job_id} failed without an adapter: there is nothing to generate with"
    finished = _finished_job(sessions, client, key)
    assert _post(client, other_key, finished).status_code == 404  # another tenant's job
    assert client.get(f"/jobs/{finished}/generations/gen_nope", headers=auth(key)).status_code == 404
    assert _post(client, key, "job_nope").status_code == 404
    assert queue.generations == []


def test_a_tenant_has_at_most_16_generations_waiting(client, key, sessions, queue):
    job_id = _finished_job(sessions, client, key)
    for _ in range(generation_service.MAX_WAITING_PER_TENANT):
        assert _post(client, key, job_id).status_code == 202
    refused = _post(client, key, job_id)
    assert refused.status_code == 429 and "16 generations are already waiting" in refused.json()["detail"]
    with session_scope(sessions) as session:
        session.execute(update(Generation).where(Generation.id == queue.generations[0]).values(status="succeeded"))
    assert _post(client, key, job_id).status_code == 202
    listed = client.get(f"/jobs/{job_id}/generations?limit=10", headers=auth(key)).json()
    assert [g["id"] for g in listed["data"]] == queue.generations[::-1][:10] and listed["has_more"]
    rest = client.get(f"/jobs/{job_id}/generations?after={listed['last_id']}", headers=auth(key)).json()
    assert [g["id"] for g in rest["data"]] == queue.generations[::-1][10:] and not rest["has_more"]


def test_a_generation_can_be_deleted_whatever_its_state(client, key, other_key, settings, sessions, queue, monkeypatch):
    from worker import generation as worker_generation

    job_id = _finished_job(sessions, client, key)
    ids = [_post(client, key, job_id).json()["id"] for _ in range(generation_service.MAX_WAITING_PER_TENANT)]
    assert _post(client, key, job_id).status_code == 429
    url = f"/jobs/{job_id}/generations/{ids[0]}"
    assert client.delete(url, headers=auth(other_key)).status_code == 404  # another tenant's
    assert client.delete(f"/jobs/{job_id}/generations/gen_nope", headers=auth(key)).status_code == 404
    response = client.delete(url, headers=auth(key))
    assert (response.status_code, response.content) == (204, b"")
    assert client.get(url, headers=auth(key)).status_code == 404
    assert client.delete(url, headers=auth(key)).status_code == 404
    assert _post(client, key, job_id).status_code == 202  # its place among the waiting is free
    # Its message is still on the queue: the worker finds no row and does nothing.
    monkeypatch.setattr(worker_generation, "_generate", lambda *a: pytest.fail("a deleted generation ran"))
    assert worker_generation.run_generation(ids[0], settings) == "skipped"

    # Deleted while running: the worker's answer, completions or error, is dropped.
    def deleted_meanwhile(outcome):
        def generate(job, upload_format, request, work, res, settings, progress):
            assert client.delete(f"/jobs/{job_id}/generations/{running}", headers=auth(key)).status_code == 204
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

        return generate

    for outcome in ({"template": "raw", "completions": [], "seconds": 0.1}, RuntimeError("the GPU fell over")):
        running = ids.pop()
        monkeypatch.setattr(worker_generation, "_generate", deleted_meanwhile(outcome))
        assert worker_generation.run_generation(running, settings) == "skipped"
        with sessions() as session:
            assert session.get(Generation, running) is None


def test_deleting_a_job_deletes_its_generations(client, key, sessions, queue):
    job_id = _finished_job(sessions, client, key)
    other_job = _finished_job(sessions, client, key)
    for _ in range(generation_service.MAX_WAITING_PER_TENANT):
        assert _post(client, key, job_id).status_code == 202
    assert _post(client, key, other_job).status_code == 429
    assert client.delete(f"/jobs/{job_id}", headers=auth(key)).status_code == 204
    with sessions() as session:
        assert session.scalars(select(Generation).where(Generation.job_id == job_id)).all() == []
    assert _post(client, key, other_job).status_code == 202  # the deleted job's no longer wait


def test_a_lost_message_is_sent_again_and_an_abandoned_run_fails(client, key, settings, sessions, queue):
    settings = settings.model_copy(update={"requeue_after_seconds": 60})
    job_id = _finished_job(sessions, client, key)
    lost, running = _post(client, key, job_id).json()["id"], _post(client, key, job_id).json()["id"]
    with session_scope(sessions) as session:
        session.execute(update(Generation).where(Generation.id == lost).values(requested_at=utcnow() - timedelta(seconds=120)))
        assert generation_service.claim(session, running) is not None
        assert generation_service.claim(session, running) is None  # a duplicate message does nothing
    broker = Broker(waiting=1)  # its message is there: waiting behind a job, not lost
    assert not reconcile(settings, sessions, broker)
    broker.messages = 0  # the broker restarted without persistence
    assert reconcile(settings, sessions, broker).generations == [lost] and broker.generations == [lost]
    broker.messages = 0
    assert reconcile(settings, sessions, broker).generations == []  # not again before another 60 s

    with session_scope(sessions) as session:
        session.execute(update(Generation).where(Generation.id == running).values(started_at=utcnow() - timedelta(hours=2)))
    broker.messages = 1
    assert reconcile(settings, sessions, broker).abandoned_generations == [running]
    failed = client.get(f"/jobs/{job_id}/generations/{running}", headers=auth(key)).json()
    assert (failed["status"], failed["error"]) == ("failed", "the worker stopped while generating; ask again")
    with session_scope(sessions) as session:
        assert not generation_service.finish(session, running, result={})  # the late worker's answer is not recorded


def test_the_cli_lists_generations_and_says_how_to_cancel_one_it_stopped_waiting_for(client, key, sessions, queue, capsys, live):
    job_id = _finished_job(sessions, client, key)
    first = _post(client, key, job_id).json()["id"]
    second = _post(client, key, job_id, prompts=["a\nlong " + "x" * 60]).json()["id"]
    code, out, err = mola(capsys, live, key, "jobs", "generations", job_id)
    lines = out.splitlines()
    assert (code, err, [line.split()[:2] for line in lines]) == (0, "", [[second, "queued"], [first, "queued"]])
    assert lines[0].endswith(" UTC  'a long " + "x" * 32 + "…'") and lines[1].endswith(" UTC  'Say the number 3: ' (+1 more)")
    code, out, _ = mola(capsys, live, key, "jobs", "generations", job_id, "--limit", "1")
    assert out.splitlines() == [lines[0], f"(more: --after {second})"]
    assert mola(capsys, live, key, "jobs", "generations", job_id, "--after", second)[1].splitlines() == [lines[1]]

    # Stopped waiting (no worker runs here): the generation stays queued, and the error says so,
    # after the warning, given before the wait, that no worker consumes its queue.
    code, out, err = mola(capsys, live, key, "jobs", "generate", job_id, "--prompt", "x", "--timeout", "0")
    third = queue.generations[-1]
    command = f"mola jobs generation {job_id} {third}"
    assert (code, out) == (1, "") and err == (
        "warning: no worker consumes queue mola.train: the generation waits until one starts (`mola queues`)\n"
        f"error: generation {third} is still queued after 0.0 s; see it with `{command}`, or cancel it with `{command} --delete`\n"
    )
    assert mola(capsys, live, key, *command.split()[1:], "--delete")[:2] == (0, f"deleted {third}\n")
    page = json.loads(mola(capsys, live, key, "jobs", "generations", job_id, "--json")[1])
    assert [g["id"] for g in page["data"]] == [second, first] and page["has_more"] is False


def test_generations_on_a_queue_of_their_own_are_counted_apart(client, key, settings, sessions, queue):
    """With MOLA_GENERATION_QUEUE, a lost generation message is found by that queue's count and
    a lost job's by the training queue's: a message waiting on one says nothing of the other."""
    from service.queue import GENERATE_TASK, CeleryQueue

    settings = settings.model_copy(update={"requeue_after_seconds": 60, "generation_queue": "mola.generate"})
    assert CeleryQueue(settings).app.conf.task_routes[GENERATE_TASK] == {"queue": "mola.generate"}
    finished = _finished_job(sessions, client, key)
    waiting_job = client.post("/jobs", headers=auth(key), json=job_body(make_dataset(client, key))).json()["id"]
    lost = _post(client, key, finished).json()["id"]
    long_ago = utcnow() - timedelta(seconds=120)
    with session_scope(sessions) as session:
        session.execute(update(Generation).values(requested_at=long_ago))
        session.execute(update(Job).where(Job.id == waiting_job).values(updated_at=long_ago))
    broker = Broker(waiting=1, generation_queue="mola.generate")  # the job's message waits; none for the generation
    report = reconcile(settings, sessions, broker)
    assert (report.generations, report.enqueued) == ([lost], [])
    assert broker.generation_messages == 1

    with session_scope(sessions) as session:
        session.execute(update(Generation).values(requested_at=long_ago))
        session.execute(update(Job).where(Job.id == waiting_job).values(updated_at=long_ago))
    broker.messages = 0  # now the job's message is the lost one; the generation's waits
    report = reconcile(settings, sessions, broker)
    assert (report.generations, report.enqueued) == ([], [waiting_job])


@pytest.mark.slow
def test_a_finished_job_completes_prompts_as_its_downloaded_adapter_does(client, key, settings, sessions, storage, queue, tmp_path):
    pytest.importorskip("torch")
    from mola.generate import generate, open_adapter, prompt
    from tests.service.test_runner import _create, runner
    from worker.generation import run_generation

    job_id = _create(client, key, hyperparameters={"max_steps": 3})  # prompt/completion rows: the raw template
    assert runner.run_job(job_id, settings) == "succeeded"
    response = _post(client, key, job_id, max_new_tokens=8)
    assert response.status_code == 202, response.text
    queued = response.json()
    assert (queued["status"], queued["completions"], queued["request"]["template"], queued["request"]["temperature"]) == ("queued", None, None, 0.0)
    assert queue.generations == [queued["id"]]

    assert run_generation(queued["id"], settings) == "succeeded"
    assert run_generation(queued["id"], settings) == "skipped"  # a duplicate message
    done = client.get(f"/jobs/{job_id}/generations/{queued['id']}", headers=auth(key)).json()
    assert (done["status"], done["template"], done["error"]) == ("succeeded", "raw", None)
    assert done["seconds"] > 0 and done["started_at"] and done["finished_at"]

    archive = tmp_path / "adapter.tar.gz"
    archive.write_bytes(client.get(f"/jobs/{job_id}/adapter", headers=auth(key)).content)
    with open_adapter(archive) as adapter:
        asks = [prompt(text, adapter.tokenizer, "raw") for text in PROMPTS]
        expected = generate(adapter.model, adapter.tokenizer, asks, max_new_tokens=8)
        chat = prompt(PROMPTS[0], adapter.tokenizer, "chat")[0]
    assert done["completions"] == [{"prompt": text, "text": out, "row": None, "reference": None} for (text, _), out in zip(asks, expected)]
    assert done["scores"] is None  # prompts have no reference to score against

    # Another template on request; a prompt longer than the model's positions fails the
    # generation with the reason, not the worker.
    chat_id = _post(client, key, job_id, prompts=[PROMPTS[0]], template="chat", max_new_tokens=4).json()["id"]
    too_long = _post(client, key, job_id, prompts=["x" * 600]).json()["id"]
    assert run_generation(chat_id, settings) == "succeeded" and run_generation(too_long, settings) == "failed"
    assert client.get(f"/jobs/{job_id}/generations/{chat_id}", headers=auth(key)).json()["completions"][0]["prompt"] == chat
    failed = client.get(f"/jobs/{job_id}/generations/{too_long}", headers=auth(key)).json()
    assert failed["status"] == "failed" and "leaves no room in the model's 512 positions" in failed["error"]
    with sessions() as session:
        assert session.get(Generation, too_long).result is None


def test_a_dataset_generation_names_what_does_not_fit(client, key, other_key, sessions, queue):
    job_id = _finished_job(sessions, client, key)
    dataset_id = make_dataset(client, key)
    text_only = make_dataset(client, key, [{"text": "a story"}, {"text": "another"}])
    large = make_dataset(client, key, [{"prompt": "a", "completion": "b"}] * (generation_service.MAX_DATASET_ROWS + 1))
    theirs = make_dataset(client, other_key)
    cases = [
        ({"max_new_tokens": 4}, "prompts", "give prompts, or a dataset_id whose rows to complete"),
        ({"prompts": ["x"], "dataset_id": dataset_id}, "dataset_id", "give prompts or a dataset_id, not both"),
        ({"prompts": ["x"], "rows": 2}, "rows", "rows goes with a dataset_id (the first rows of it to complete)"),
        ({"dataset_id": dataset_id, "template": "raw"}, "template", "template goes with prompts: a dataset's rows are dressed as training dressed them"),
        ({"dataset_id": dataset_id, "input": "y"}, "input", "input goes with prompts: a dataset's rows are dressed as training dressed them"),
        ({"dataset_id": "ds_nope"}, "dataset_id", "dataset 'ds_nope' not found"),
        ({"dataset_id": theirs}, "dataset_id", f"dataset {theirs!r} not found"),
        ({"dataset_id": text_only}, "dataset_id", f"dataset {text_only} has only text rows: none has a prompt to complete"),
        ({"dataset_id": large}, "rows", f"dataset {large} has 1001 rows, more than the 1000 one generation completes: give rows (at most 1000)"),
        ({"dataset_id": large, "rows": 1001}, "rows", "less than or equal to 1000"),
        ({"dataset_id": dataset_id, "step": 3}, "step", f"job {job_id} has no checkpoint at step 3 (checkpoints: none yet)"),
    ]
    for body, field, message in cases:
        response = client.post(f"/jobs/{job_id}/generations", headers=auth(key), json=body)
        assert response.status_code == 422, (body, response.text)
        errors = response.json()["errors"]
        assert [e["field"] for e in errors] == [f"body.{field}"] and message in errors[0]["msg"], (body, errors)
    assert queue.generations == []
    accepted = client.post(f"/jobs/{job_id}/generations", headers=auth(key), json={"dataset_id": large, "rows": 1000})
    assert accepted.status_code == 202 and accepted.json()["request"]["rows"] == 1000


def test_a_dataset_cannot_be_deleted_while_a_generation_completes_its_rows(client, key, sessions, queue):
    job_id = _finished_job(sessions, client, key)
    test_set = make_dataset(client, key)
    generation_id = _post(client, key, job_id, prompts=None, dataset_id=test_set).json()["id"]
    for status in ("queued", "running"):
        with session_scope(sessions) as session:
            session.execute(update(Generation).where(Generation.id == generation_id).values(status=status))
        response = client.delete(f"/datasets/{test_set}", headers=auth(key))
        assert response.status_code == 409, (status, response.text)
        assert response.json()["detail"] == (
            f"dataset {test_set} is used by queued or running generation(s) {generation_id}: delete them or wait for them to finish, then delete it"
        )
    # A job too: both named, jobs first.
    job_on_it = client.post("/jobs", headers=auth(key), json=job_body(make_dataset(client, key), validation_dataset_id=test_set)).json()["id"]
    assert client.delete(f"/datasets/{test_set}", headers=auth(key)).json()["detail"] == (
        f"dataset {test_set} is used by queued or running job(s) {job_on_it} and generation(s) {generation_id}: cancel them or wait for them to finish, then delete it"
    )
    client.post(f"/jobs/{job_on_it}/cancel", headers=auth(key))
    with session_scope(sessions) as session:
        generation_service.finish(session, generation_id, error="done with it")
    assert client.delete(f"/datasets/{test_set}", headers=auth(key)).status_code == 200


def test_a_running_generation_records_its_progress_a_few_times(client, key, sessions, settings, queue, capsys, live):
    """The worker writes each batch's progress at most once per interval, the first and the
    last always, and only while the generation runs; `mola jobs generation` prints it."""
    from worker.generation import _progress_writer
    from worker.runner import Resources

    job_id = _finished_job(sessions, client, key)
    generation_id = _post(client, key, job_id).json()["id"]
    with session_scope(sessions) as session:
        generation_service.claim(session, generation_id)
    clock = iter([100.0, 101.0, 106.0, 106.5, 107.0])
    write = _progress_writer(generation_id, Resources.of(settings), every_seconds=5.0, clock=lambda: next(clock))

    def progress() -> dict | None:
        return client.get(f"/jobs/{job_id}/generations/{generation_id}", headers=auth(key)).json()["progress"]

    seen = []
    for done in (0, 8, 16, 24, 30):  # at 100 s, 101 s (too soon), 106 s, 106.5 s (too soon), 107 s (the last)
        write(done, 30)
        seen.append(progress())
    assert seen == [{"done": 0, "total": 30}] * 2 + [{"done": 16, "total": 30}] * 2 + [{"done": 30, "total": 30}]
    assert mola(capsys, live, key, "jobs", "generation", job_id, generation_id)[:2] == (0, f"{generation_id} is running: 30 of 30 completed\n")
    with session_scope(sessions) as session:
        generation_service.finish(session, generation_id, error="stopped")
    write = _progress_writer(generation_id, Resources.of(settings), every_seconds=5.0, clock=lambda: 200.0)
    write(0, 30)  # no longer running: nothing written
    assert progress() == {"done": 30, "total": 30}


def test_waiting_for_a_generation_shows_its_progress(client, key, sessions, settings, queue, capsys, live, monkeypatch):
    """`wait_for_generation(on_update=)` sees each state polled before the last, and the
    blocking `mola jobs generate` prints the progress on stderr each time it moves. The
    generation's row is moved on after each poll (no worker: the states are the test's)."""
    from mola.client import MolaClient
    from service import workers

    job_id = _finished_job(sessions, client, key)
    test_set = make_dataset(client, key)
    with session_scope(sessions) as session:
        workers.beat(session, "test-worker:1", [settings.generations_queue])  # else the CLI warns
    result = {"template": None, "completions": [], "scores": {"n": 3, "exact_match": 1.0, "answers_expected": 0, "answer_accuracy": None}, "seconds": 1.0}

    def states(generation_id: str):
        """Each call moves the generation to its next state: running, 0, 2, 2 (no move) and
        3 of 3 rows, then succeeded."""
        with session_scope(sessions) as session:
            generation_service.claim(session, generation_id)
        for done in (0, 2, 2, 3):
            with session_scope(sessions) as session:
                generation_service.record_progress(session, generation_id, done, 3)
            yield
        with session_scope(sessions) as session:
            generation_service.finish(session, generation_id, result=result)
        yield

    with MolaClient(live.url, key) as api:
        pending = api.generate(job_id, dataset_id=test_set, wait=False)
        advance = states(pending.id)
        next(advance)
        seen = []
        done = api.wait_for_generation(job_id, pending, poll=0.01, on_update=lambda g: (seen.append((g.status, g.progress)), next(advance)))
    progress = [{"done": n, "total": 3} for n in (0, 2, 2, 3)]
    assert seen == [("running", p) for p in progress] and done.status == "succeeded"

    # The CLI polls once a second; a spy on the client moves the row on after each poll.
    real_get = MolaClient.get_generation
    moves: dict = {}

    def get_then_advance(self, job_id: str, generation_id: str):
        generation = real_get(self, job_id, generation_id)
        if not generation.done:
            next(moves.setdefault(generation_id, states(generation_id)))
        return generation

    monkeypatch.setattr(MolaClient, "get_generation", get_then_advance)
    code, out, err = mola(capsys, live, key, "jobs", "generate", job_id, "--dataset", test_set)
    generation_id = json.loads(mola(capsys, live, key, "jobs", "generations", job_id, "--json")[1])["data"][0]["id"]
    assert code == 0 and "exact match 100.0% of 3 rows" in out
    assert err == "".join(f"{generation_id}: {n} of 3 completed\n" for n in (0, 2, 3))


@pytest.mark.slow
def test_a_dataset_generation_scores_its_rows_as_mola_generate_does(client, key, settings, sessions, storage, queue, tmp_path):
    """The rows of an upload (a test set) completed on the server by the final adapter or a
    checkpoint's: the same completions and scores as the library's generation on the
    downloaded adapter; text rows left out and counted; a deleted dataset or a pruned
    checkpoint fails the generation, saying so."""
    pytest.importorskip("torch")
    from mola.data import read_records
    from mola.evaluate import records_loss, score_generations
    from mola.generate import generate, open_adapter, reference_rows
    from tests.service.conftest import jsonl
    from tests.service.test_runner import _create, runner
    from worker.generation import run_generation

    job_id = _create(client, key, hyperparameters={"max_steps": 4, "checkpoint_every": 2})
    assert runner.run_job(job_id, settings) == "succeeded"
    test_rows = [
        {"prompt": "Say the number 30: ", "completion": "30, and 31 after it."},
        {"text": "no prompt here"},
        {"instruction": "Say the number 5.", "input": "", "output": "The answer is 5"},
        {"prompt": "Say the number 41: ", "completion": "41, and 42 after it."},
        {"prompt": "Say the number 7: ", "completion": "left out by rows"},
    ]
    test_set = make_dataset(client, key, test_rows)
    (tmp_path / "test.jsonl").write_bytes(jsonl(test_rows))
    records = read_records(tmp_path / "test.jsonl")[:4]
    hp = client.get(f"/jobs/{job_id}", headers=auth(key)).json()["hyperparameters"]

    def expected(download: str) -> tuple[list[dict], dict]:
        archive = tmp_path / "adapter.tar.gz"
        archive.write_bytes(client.get(download, headers=auth(key)).content)
        with open_adapter(archive) as adapter:
            rows = reference_rows(records, adapter.tokenizer)
            texts = generate(adapter.model, adapter.tokenizer, [(r.prompt, r.special) for r in rows], max_new_tokens=12)
            # All four rows (the text row too), tokenized as the job tokenized its rows.
            loss = records_loss(adapter.model, adapter.tokenizer, records, cutoff_len=hp["cutoff_len"], train_on_inputs=hp["train_on_inputs"])
        completions = [{"prompt": r.prompt, "text": t, "row": r.row, "reference": r.reference} for r, t in zip(rows, texts)]
        return completions, {**score_generations(texts, [r.reference for r in rows]), "without_prompt": 1, **loss}

    final = _post(client, key, job_id, prompts=None, dataset_id=test_set, rows=4, max_new_tokens=12).json()
    at_step_2 = _post(client, key, job_id, prompts=None, dataset_id=test_set, rows=4, max_new_tokens=12, step=2).json()
    assert (final["request"]["dataset_id"], final["request"]["rows"], at_step_2["request"]["step"]) == (test_set, 4, 2)
    assert [run_generation(g["id"], settings) for g in (final, at_step_2)] == ["succeeded"] * 2
    for generation, download in ((final, f"/jobs/{job_id}/adapter"), (at_step_2, f"/jobs/{job_id}/checkpoints/2/adapter")):
        done = client.get(f"/jobs/{job_id}/generations/{generation['id']}", headers=auth(key)).json()
        completions, scores = expected(download)
        assert (done["status"], done["template"], [c["row"] for c in done["completions"]]) == ("succeeded", None, [1, 3, 4])
        assert done["completions"] == completions and done["scores"] == scores
        assert done["progress"] == {"done": 3, "total": 3}
        assert done["scores"]["n"] == 3 and done["scores"]["answers_expected"] == 1 and done["scores"]["loss_tokens"] > 0

    # What was there when it was asked for may be gone when it runs.
    deleted = _post(client, key, job_id, prompts=None, dataset_id=test_set, rows=1).json()["id"]
    pruned = _post(client, key, job_id, prompts=None, dataset_id=make_dataset(client, key, test_rows), step=2).json()["id"]
    with session_scope(sessions) as session:
        # DELETE /datasets refuses while a generation waits for it: gone all the same (by hand).
        session.execute(update(Dataset).where(Dataset.id == test_set).values(deleted_at=utcnow()))
        session.execute(sql_delete(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step == 2))
    assert [run_generation(g, settings) for g in (deleted, pruned)] == ["failed"] * 2
    errors = [client.get(f"/jobs/{job_id}/generations/{g}", headers=auth(key)).json()["error"] for g in (deleted, pruned)]
    assert errors == [
        f"RuntimeError: dataset {test_set} was deleted before its rows were completed",
        f"RuntimeError: job {job_id} no longer has its checkpoint at step 2 (only the newest and the best are kept)",
    ]


@pytest.mark.slow
def test_generations_share_a_loaded_base_model_until_training_needs_the_memory(client, key, settings, storage, queue, monkeypatch):
    pytest.importorskip("torch")
    import mola.models
    from tests.service.test_runner import _create, runner
    from worker.base_models import BASE_MODELS
    from worker.generation import run_generation

    first, second, third = (_create(client, key, hyperparameters={"max_steps": 2}) for _ in range(3))
    for job_id in (first, second):
        assert runner.run_job(job_id, settings) == "succeeded"
    loads, real_load = [], mola.models.load_base_model
    monkeypatch.setattr(mola.models, "load_base_model", lambda name, **kw: loads.append(name) or real_load(name, **kw))
    BASE_MODELS.release()
    try:
        asked = [_post(client, key, job_id, max_new_tokens=4).json()["id"] for job_id in (first, second, first)]
        assert [run_generation(g, settings) for g in asked] == ["succeeded"] * 3
        assert loads == ["tiny-llama"] and BASE_MODELS.idle == "tiny-llama"  # one load for two jobs' adapters
        texts = [client.get(f"/jobs/{j}/generations/{g}", headers=auth(key)).json()["completions"] for j, g in zip((first, second, first), asked)]
        assert texts[0] == texts[2]  # the same job's adapter answers the same on the shared model

        monkeypatch.setattr(settings, "generation_keep_base_seconds", 0)
        assert run_generation(_post(client, key, second, max_new_tokens=4).json()["id"], settings) == "succeeded"
        assert loads == ["tiny-llama"] and BASE_MODELS.idle is None  # used the kept one, and kept nothing

        monkeypatch.setattr(settings, "generation_keep_base_seconds", 300)
        run_generation(_post(client, key, second, max_new_tokens=4).json()["id"], settings)
        assert BASE_MODELS.idle == "tiny-llama"
        assert runner.run_job(third, settings) == "succeeded"
        assert BASE_MODELS.idle is None  # the training run let it go
    finally:
        BASE_MODELS.release()


def _worker(queue, settings, sessions) -> threading.Thread:
    """Runs each generation the API enqueues, as a training worker would, until stopped; it
    reports itself on the queue as a worker's reconciler does (`service.workers.beat`)."""
    from service import workers
    from worker.generation import run_generation

    with session_scope(sessions) as session:
        workers.beat(session, "test-worker:1", [settings.generations_queue])

    def work() -> None:
        done = 0
        while not stop.is_set():
            while done < len(queue.generations):
                run_generation(queue.generations[done], settings)
                done += 1
            time.sleep(0.05)

    stop = threading.Event()
    thread = threading.Thread(target=work, daemon=True)
    thread.stop = stop  # type: ignore[attr-defined]
    thread.start()
    return thread


@pytest.mark.slow
def test_the_client_and_cli_wait_for_the_completions(client, key, settings, sessions, queue, capsys, live, monkeypatch):
    pytest.importorskip("torch")
    from mola.client import MolaClient
    from tests.service.test_runner import _create, runner

    job_id = _create(client, key, hyperparameters={"max_steps": 2})
    assert runner.run_job(job_id, settings) == "succeeded"
    worker = _worker(queue, settings, sessions)
    try:
        with MolaClient(live.url, key) as api:
            generation = api.generate(job_id, PROMPTS, max_new_tokens=6, poll=0.05, timeout=120)
            assert generation.status == "succeeded" and generation.template == "raw" and len(generation.texts) == 2
            assert api.get_generation(job_id, generation.id).texts == generation.texts
            assert [g.id for g in api.generations(job_id)] == [generation.id]
            pending = api.generate(job_id, PROMPTS[:1], max_new_tokens=6, wait=False)  # returns at once
            assert api.wait_for_generation(job_id, pending, timeout=120, poll=0.05).texts == generation.texts[:1]

        code, out, err = mola(capsys, live, key, "jobs", "generate", job_id, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max-new-tokens", "6")
        assert (code, err) == (0, "") and out == "".join(f"### {i + 1}\n{text}\n" for i, text in enumerate(generation.texts))
        monkeypatch.setattr("sys.stdin", io.StringIO(PROMPTS[0] + "\n"))
        code, out, _ = mola(capsys, live, key, "jobs", "generate", job_id, "--prompt", "-", "--max-new-tokens", "6")
        assert (code, out) == (0, generation.texts[0] + "\n")
        code, out, _ = mola(capsys, live, key, "jobs", "generate", job_id, "--prompt", "x" * 600, "--no-wait")
        assert code == 0 and out.startswith("gen_") and f"mola jobs generation {job_id} gen_" in out
        generation_id = out.split()[0]
        with MolaClient(live.url, key) as api:  # the CLI returned at once; the worker fails it (too long)
            deadline = time.monotonic() + 60
            while not api.get_generation(job_id, generation_id).done and time.monotonic() < deadline:
                time.sleep(0.05)
        code, out, err = mola(capsys, live, key, "jobs", "generation", job_id, generation_id)
        assert code == 1 and "leaves no room in the model's 512 positions" in err
        code, out, err = mola(capsys, live, key, "jobs", "generation", job_id, generation_id, "--delete")
        assert (code, out, err) == (0, f"deleted {generation_id}\n", "")
        with MolaClient(live.url, key) as api:
            listed = [g.id for g in api.generations(job_id)]
            assert len(listed) == 4 and generation_id not in listed and generation.id in listed
            api.delete_generation(job_id, generation.id)
            assert [g.id for g in api.generations(job_id)] == [g for g in listed if g != generation.id]
        code, out, err = mola(capsys, live, key, "jobs", "generate", job_id, "--prompt", "x", "--template", "chat", "--input", "y")
        assert code != 0 and "input" in err and "an input goes with the alpaca template, not chat" in err
    finally:
        worker.stop.set()
        worker.join(10)


@pytest.mark.slow
def test_the_client_and_cli_score_a_datasets_rows(client, key, settings, sessions, queue, capsys, live):
    pytest.importorskip("torch")
    from mola.cli import scored_row, scores_line
    from mola.client import MolaAPIError, MolaClient
    from tests.service.test_runner import _create, runner

    job_id = _create(client, key, hyperparameters={"max_steps": 2, "checkpoint_every": 1})
    assert runner.run_job(job_id, settings) == "succeeded"
    test_set = make_dataset(client, key, [{"text": "no prompt"}, {"prompt": "Say the number 30: ", "completion": "30, and 31 after it."}])
    worker = _worker(queue, settings, sessions)
    try:
        with MolaClient(live.url, key) as api:
            scored = api.generate(job_id, dataset_id=test_set, step=1, max_new_tokens=6, poll=0.05, timeout=120)
            assert (scored.status, scored.request["step"], scored.scores["n"], scored.scores["without_prompt"]) == ("succeeded", 1, 1, 1)
            [completion] = scored.completions
            assert (completion["row"], completion["reference"], scored.texts) == (2, "30, and 31 after it.", [completion["text"]])
            with pytest.raises(MolaAPIError) as refused:
                api.generate(job_id, ["x"], dataset_id=test_set)
            assert refused.value.status_code == 422 and "give prompts or a dataset_id, not both" in refused.value.detail

        code, out, err = mola(capsys, live, key, "jobs", "generate", job_id, "--dataset", test_set, "--rows", "2", "--step", "1", "--max-new-tokens", "6")
        row = scored_row(completion["prompt"], completion["reference"], completion["text"])
        assert (code, err) == (0, "") and out == f"### row 2\n{row}\n\n{scores_line(scored.scores)} (1 without a prompt left out)\n"
        code, out, _ = mola(capsys, live, key, "jobs", "generations", job_id)
        listed = f"rows of {test_set} (checkpoint 1): {scored.scores['exact_match']:.1%} exact, loss {scored.scores['loss']:.4f}"
        assert code == 0 and f"first 2 {listed}" in out and f"  {listed}" in out
        with pytest.raises(SystemExit) as usage:  # argparse: prompts or a dataset, not both
            mola(capsys, live, key, "jobs", "generate", job_id, "--prompt", "x", "--dataset", test_set)
        assert usage.value.code == 2 and "argument --dataset: not allowed with argument --prompt" in capsys.readouterr().err
    finally:
        worker.stop.set()
        worker.join(10)
