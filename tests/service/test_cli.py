"""The `mola` command's service side, in-process: migrate, keys, the catalogue, the library
commands it carries, and the client commands' parsing."""

from __future__ import annotations

import json

import pytest

from mola import client_cli
from service import cli
from service.db import make_engine, make_sessionmaker
from service.security import authenticate
from service.settings import get_settings
from tests.service.conftest import TINY_GPT2, TINY_LLAMA


@pytest.fixture(autouse=True)
def _fresh_settings(monkeypatch):
    # The CLI applies --data-dir through the environment: record the variables' state so that
    # it is restored after each test (set-then-delete registers the undo even when unset).
    for name in ("MOLA_DATA_DIR", "MOLA_DATABASE_URL", "MOLA_MODELS"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    yield
    get_settings.cache_clear()


def test_migrate_and_create_a_key(tmp_path, capsys, monkeypatch):
    assert cli.main(["migrate", "--data-dir", str(tmp_path)]) == 0
    assert cli.main(["keys", "create", "--tenant", "team-a", "--data-dir", str(tmp_path)]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    sessions = make_sessionmaker(make_engine(get_settings()))
    with sessions() as session:
        assert authenticate(session, token).name == "team-a"
    assert cli.main(["keys", "create", "--tenant", "no spaces!", "--data-dir", str(tmp_path)]) == 2


def test_models_sync_describes_the_configured_models(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setenv("MOLA_MODELS", "tiny-llama,tiny-gpt2,no-such-model")
    assert cli.main(["models", "sync", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "synced tiny-llama" in out.out and "synced tiny-gpt2" in out.out and "skipped no-such-model" in out.err
    assert cli.main(["models", "sync", "--missing-only", "--data-dir", str(tmp_path)]) == 0  # still missing one: syncs again


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_the_route_tests_catalogue_is_what_sync_describes(name):
    pytest.importorskip("torch")
    from mola.models import describe_base_model

    expected = {"tiny-llama": TINY_LLAMA, "tiny-gpt2": TINY_GPT2}[name]
    described = describe_base_model(name)
    assert {field: described[field] for field in expected} == expected


def test_library_commands_run_through_the_same_entry_point(tmp_path):
    pytest.importorskip("torch")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"p{i} ", "completion": f"c{i}"}) for i in range(4)) + "\n")
    code = cli.main(["train", "--model", "tiny-llama", "--data", str(data), "--output", str(tmp_path / "out"), "--max-steps", "1", "--batch-size", "2"])
    assert code == 0 and (tmp_path / "out" / "adapter_config.json").is_file()
    assert cli.main(["train", "--model", "tiny-llama", "--data", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "x")]) == 2


def test_client_command_arguments():
    parser = cli.build_parser()
    args = parser.parse_args(
        ["jobs", "create", "--model", "tiny-llama", "--dataset", "ds_1", "--allocation", "[2, 2, 4, 4]", "--max-steps", "5",
         "--target-modules", "q_proj, v_proj", "--hp", "warmup_steps=0", "--hp", "bf16=false"]
    )
    assert args.allocation == [[2, 2, 4, 4]]  # one per --allocation, parsed by the flag's type: a bad value is a usage error
    assert client_cli._allocation_arg("2468") == "2468"
    assert client_cli._allocation_arg('{"preset": "triangle", "average": 3}') == {"preset": "triangle", "average": 3}
    assert client_cli._hyperparameters(args) == {"warmup_steps": 0, "bf16": False, "max_steps": 5, "target_modules": ["q_proj", "v_proj"]}


def test_client_commands_report_unreachable_servers(capsys):
    code = cli.main(["jobs", "list", "--url", "http://127.0.0.1:9", "--api-key", "k"])
    assert code == 1 and "cannot reach" in capsys.readouterr().err


def test_missing_only_describes_rows_synced_before_module_shapes_again(tmp_path, capsys, monkeypatch):
    # After an upgrade, `mola serve`'s start-up sync fills module_shapes in, so POST /jobs can
    # count adapters (and refuse ones over MOLA_MAX_ADAPTER_PARAMS) without a manual sync.
    pytest.importorskip("torch")
    from service import catalogue
    from service.db import session_scope

    monkeypatch.setenv("MOLA_MODELS", "tiny-llama")
    assert cli.main(["models", "sync", "--data-dir", str(tmp_path)]) == 0
    assert cli.main(["models", "sync", "--missing-only", "--data-dir", str(tmp_path)]) == 0
    assert "model catalogue up to date (1 models)" in capsys.readouterr().out
    sessions = make_sessionmaker(make_engine(get_settings()))
    with session_scope(sessions) as session:
        catalogue.upsert(session, "tiny-llama", {k: v for k, v in TINY_LLAMA.items() if k != "module_shapes"})
    assert cli.main(["models", "sync", "--missing-only", "--data-dir", str(tmp_path)]) == 0
    assert "synced tiny-llama" in capsys.readouterr().out
    with sessions() as session:
        assert catalogue.list_models(session)[0].module_shapes == TINY_LLAMA["module_shapes"]
