"""What a user walking through the README's client and CLI sections met, against a live API:
an idempotent retry told apart from a new job, `| head` without an error line, a failed job's
adapter not promised, dropped rows shown, page sizes checked before sending, a missing key
explained."""

from __future__ import annotations

import io
import json

import pytest

from mola.client import MolaAPIError, MolaClient
from service import cli
from service import datasets as dataset_service
from service import jobs as job_service
from service.db import session_scope
from tests.service.test_client import OWNER, api, dataset_id, live, mola, start_job  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(120)


def test_a_replayed_idempotency_key_is_not_reported_as_a_new_job(capsys, live, key, api, dataset_id):
    first = api.create_job("tiny-llama", dataset_id, idempotency_key="run-1")
    again = api.create_job("tiny-llama", dataset_id, idempotency_key="run-1")
    assert (first.replayed, again.replayed, again.id) == (False, True, first.id)

    args = ("jobs", "create", "--model", "tiny-llama", "--dataset", dataset_id, "--idempotency-key", "run-1")
    code, out, err = mola(capsys, live, key, *args)
    assert code == 0, err
    assert out.startswith(f"{first.id} was created earlier with this --idempotency-key (now queued); no new job: mola on tiny-llama")
    code, out, _ = mola(capsys, live, key, *args[:-1], "run-2")
    assert code == 0 and out.startswith("created job_")


class ClosedPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_reader_that_stops_early_gets_no_error_line(capsys, live, key, api, dataset_id, monkeypatch):
    api.create_job("tiny-llama", dataset_id)
    monkeypatch.setattr("sys.stdout", ClosedPipe())  # `mola jobs list | head -0`
    code = cli.main(["jobs", "list", "--url", live.url, "--api-key", key])
    monkeypatch.undo()
    assert code == 141 and capsys.readouterr().err == ""


def test_a_failed_job_has_no_adapter_rather_than_not_yet_one(capsys, live, key, api, dataset_id, sessions):
    queued = api.create_job("tiny-llama", dataset_id).id
    failed = api.create_job("tiny-llama", dataset_id).id
    start_job(sessions, failed)
    with session_scope(sessions) as session:
        assert job_service.finish_job(session, failed, OWNER, "failed", error="ValueError: no example", result={"train": {"loss": 2.123456789}})
    code, out, _ = mola(capsys, live, key, "jobs", "show", failed)
    assert code == 0 and "adapter:     none\n" in out and "final loss:  2.1235\n" in out
    code, out, _ = mola(capsys, live, key, "jobs", "show", queued)
    assert code == 0 and "adapter:     not yet\n" in out


def test_datasets_show_says_how_many_rows_the_cutoff_drops(capsys, live, key, dataset_id, sessions):
    stats = {"total_tokens": 8660, "mean_tokens": 433.0, "max_tokens": 662, "cutoff_len": 256,
             "over_cutoff": 20, "dropped_at_cutoff": 18, "valid_rows": 24}
    with session_scope(sessions) as session:
        dataset_service.record_token_counts(session, dataset_id, {"tiny-llama": stats}, "ready")
    code, out, _ = mola(capsys, live, key, "datasets", "show", dataset_id)
    assert code == 0
    assert ("  tiny-llama: 8660 tokens, mean 433.0, max 662; 20 rows over cutoff_len 256, "
            "18 of them with no trainable token left (a job at that cutoff skips them)\n") in out


@pytest.mark.parametrize(
    "args, flag",
    [
        (["jobs", "list", "--limit", "0"], "--limit"),
        (["jobs", "list", "--limit", "101"], "--limit"),
        (["datasets", "list", "--limit", "0"], "--limit"),
        (["jobs", "metrics", "job_1", "--limit", "1001"], "--limit"),
        (["jobs", "metrics", "job_1", "--after-step", "-1"], "--after-step"),
    ],
)
def test_a_page_size_the_api_refuses_is_a_usage_error(capsys, args, flag):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*args, "--url", "http://127.0.0.1:9", "--api-key", "k"])
    assert exit_.value.code == 2 and f"error: argument {flag}: must be" in capsys.readouterr().err


def test_no_api_key_is_explained_in_the_cli_s_terms(capsys, live, monkeypatch):
    monkeypatch.delenv("MOLA_API_KEY", raising=False)
    code = cli.main(["jobs", "list", "--url", live.url])
    err = capsys.readouterr().err
    assert code == 1 and err == (
        "error (401): no API key: set MOLA_API_KEY or pass --api-key (keys come from `mola keys create --tenant NAME`)\n"
    )
    code = cli.main(["jobs", "list", "--url", live.url, "--api-key", "mola_wrong"])
    assert code == 1 and capsys.readouterr().err == "error (401): invalid API key\n"


def test_json_output_of_a_replay_is_the_api_answer(capsys, live, key, api, dataset_id):
    first = api.create_job("tiny-llama", dataset_id, idempotency_key="run-j")
    code, out, _ = mola(capsys, live, key, "jobs", "create", "--model", "tiny-llama", "--dataset", dataset_id, "--idempotency-key", "run-j", "--json")
    assert code == 0 and json.loads(out) == {**first.raw, "progress": json.loads(out)["progress"]}


def test_a_checkpoint_s_adapter_downloads_through_the_client_and_the_cli(capsys, live, key, api, dataset_id, sessions, storage, tmp_path):
    from tests.service.test_client import adapter_archive

    job_id = api.create_job("tiny-llama", dataset_id).id
    start_job(sessions, job_id)
    prefix = f"jobs/{job_id}/checkpoints/checkpoint-2"
    archive = adapter_archive(tmp_path)
    storage.put_file(job_service.checkpoint_adapter_key(prefix), archive)
    with session_scope(sessions) as session:
        job_service.record_checkpoint(session, job_id, 2, prefix, 10, {"epoch": 0.5, "loss": 1.25, "eval_loss": 1.5})

    folder = api.download_adapter(job_id, tmp_path / "step2", extract=True, step=2)
    assert (folder / "adapter_config.json").is_file()
    assert api.download_adapter(job_id, tmp_path, step=2) == tmp_path / f"{job_id}-step2-adapter.tar.gz"
    with pytest.raises(MolaAPIError) as missing:
        api.download_adapter(job_id, tmp_path / "step3", extract=True, step=3)
    assert missing.value.status_code == 404 and not (tmp_path / "step3").exists()

    code, out, err = mola(capsys, live, key, "jobs", "checkpoints", job_id)
    assert code == 0 and out.splitlines()[0].endswith("  loss=1.2500  eval_loss=1.5000  (best eval_loss)"), out
    code, out, err = mola(capsys, live, key, "jobs", "download", job_id, "--step", "2", "--extract", str(tmp_path / "cli"))
    assert code == 0 and (tmp_path / "cli" / "adapter_config.json").is_file(), err
    out = io.BytesIO()  # what `-o -` writes to stdout
    assert api.write_adapter(job_id, out, step=2) == archive.stat().st_size and out.getvalue() == archive.read_bytes()


def test_a_url_without_a_scheme_means_http(capsys, live, key, monkeypatch):
    host_port = live.url.removeprefix("http://")
    with MolaClient(host_port, key) as client:  # MOLA_URL=127.0.0.1:8000, as people write it
        assert client.base_url == live.url and client.health()
    monkeypatch.setenv("MOLA_URL", f" {host_port}/ ")
    code = cli.main(["jobs", "list", "--api-key", key])
    assert code == 0, capsys.readouterr().err


def test_jobs_show_and_list_write_times_in_utc_and_the_label_and_losses(capsys, live, key, api, dataset_id, sessions):
    job = api.create_job("tiny-llama", dataset_id, suffix="first-try")
    start_job(sessions, job.id)
    with session_scope(sessions) as session:
        evaluation = {"eval_loss": 0.75, "eval_exact_match": 0.5, "eval_generated": 4, "eval_answer_accuracy": 0.25}
        result = {"train": {"loss": 0.5}, "eval": evaluation}
        assert job_service.finish_job(session, job.id, OWNER, "succeeded", result=result)
    done = api.get_job(job.id)
    code, out, _ = mola(capsys, live, key, "jobs", "show", job.id)
    assert code == 0
    assert "label:       first-try\n" in out and "eval loss:   0.7500\n" in out
    assert "generated:   50.0% exact on 4 validation rows, answers right 25.0%\n" in out
    assert done.adapter_parameters and f"trainable:   {done.adapter_parameters:,} adapter parameters\n" in out
    assert f"created:     {done.created_at:%Y-%m-%d %H:%M:%S} UTC\n" in out
    assert f"finished:    {done.finished_at:%Y-%m-%d %H:%M:%S} UTC\n" in out and "+00:00" not in out
    code, out, _ = mola(capsys, live, key, "jobs", "list")
    assert code == 0 and out.rstrip("\n").endswith("  first-try")


def test_token_stats_from_jobs_are_rounded(capsys, live, key, dataset_id, sessions):
    from service.models import Dataset

    with session_scope(sessions) as session:
        session.get(Dataset, dataset_id).token_stats = {"tiny-llama": {"examples": 24, "mean_tokens": 424.5315789473684}}
    code, out, _ = mola(capsys, live, key, "datasets", "show", dataset_id)
    assert code == 0 and "  tiny-llama (from a job): examples 24, mean_tokens 424.5\n" in out


def test_a_destination_ending_in_a_slash_is_a_folder_to_create(capsys, live, key, api, dataset_id, sessions, storage, tmp_path):
    from tests.service.test_client import adapter_archive, finish_job

    job_id = api.create_job("tiny-llama", dataset_id).id
    storage.put_file(f"jobs/{job_id}/adapter.tar.gz", adapter_archive(tmp_path))
    start_job(sessions, job_id)
    finish_job(sessions, job_id, adapter_key=f"jobs/{job_id}/adapter.tar.gz")
    saved = api.download_adapter(job_id, f"{tmp_path}/adapters/")
    assert saved == tmp_path / "adapters" / f"{job_id}-adapter.tar.gz" and saved.is_file()
    code, out, err = mola(capsys, live, key, "jobs", "download", job_id, "-o", f"{tmp_path}/cli/")
    archive = tmp_path / "cli" / f"{job_id}-adapter.tar.gz"
    assert code == 0 and out == f"saved {archive}\ntry it: mola generate {archive} --prompt '...'\n", err


def test_what_a_run_tokenized_is_on_the_job_and_in_jobs_show(capsys, live, key, api, dataset_id, sessions):
    job_id = api.create_job("tiny-llama", dataset_id).id
    start_job(sessions, job_id)
    train = {"records": 24, "examples": 20, "over_cutoff": 6, "dropped_at_cutoff": 4, "cutoff_len": 64}
    validation = {"records": 3, "examples": 3, "over_cutoff": 0, "dropped_at_cutoff": 0, "cutoff_len": 64}
    with session_scope(sessions) as session:
        from service.models import Job

        session.get(Job, job_id).data_stats = {"train": train, "validation": validation}
    assert api.get_job(job_id).data == {"train": train, "validation": validation}
    code, out, _ = mola(capsys, live, key, "jobs", "show", job_id)
    assert code == 0
    assert ("data:        train: 24 records, 20 examples; 6 cut and 4 dropped (no trainable token left) at cutoff_len 64\n"
            "             validation: 3 records, 3 examples at cutoff_len 64\n") in out
