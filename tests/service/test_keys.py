"""`mola keys list` and `mola keys revoke` on the database the real app serves from: a revoked
key gets 401 on its next request, and no listing shows a secret."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from service import cli
from service.settings import get_settings
from tests.service.conftest import auth, new_key


@pytest.fixture(autouse=True)
def _fresh_settings(monkeypatch):
    # The CLI applies --data-dir through the environment: undo it after each test.
    for name in ("MOLA_DATA_DIR", "MOLA_DATABASE_URL"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    yield
    get_settings.cache_clear()


def _mola(capsys, settings, *args: str) -> tuple[int, str]:
    code = cli.main(["keys", *args, "--data-dir", str(settings.data_dir)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _prefix(token: str) -> str:
    return token.split("_")[1]


def _secret(token: str) -> str:
    return token.split("_", 2)[2]


def test_list_shows_keys_without_their_secrets(client, settings, sessions, capsys):
    acme, globex = new_key(sessions, "acme"), new_key(sessions, "globex")
    assert client.get("/jobs", headers=auth(acme)).status_code == 200  # acme's key is used once

    code, out = _mola(capsys, settings, "list")
    assert code == 0 and _prefix(acme) in out and _prefix(globex) in out
    assert _secret(acme) not in out and _secret(globex) not in out
    assert out.splitlines()[0].split() == ["ID", "PREFIX", "TENANT", "NAME", "CREATED", "(UTC)", "LAST", "USED", "REVOKED"]

    code, out = _mola(capsys, settings, "list", "--tenant", "acme", "--json")
    (listed,) = json.loads(out)
    assert code == 0 and listed["tenant"] == "acme" and listed["prefix"] == f"mola_{_prefix(acme)}_..."
    assert listed["last_used_at"] is not None and listed["revoked_at"] is None
    assert _secret(acme) not in out

    code, out = _mola(capsys, settings, "list", "--tenant", "nobody")
    assert code == 2 and "no tenant named 'nobody'" in out


@pytest.mark.parametrize("name_it", [_prefix, lambda token: f"mola_{_prefix(token)}_...", "id"], ids=["prefix", "public part", "id"])
def test_a_revoked_key_gets_401_at_once(client, settings, sessions, capsys, name_it):
    token, other = new_key(sessions, "acme"), new_key(sessions, "acme")
    assert client.get("/jobs", headers=auth(token)).status_code == 200
    if name_it == "id":
        _, out = _mola(capsys, settings, "list", "--json")
        name = next(k["id"] for k in json.loads(out) if k["prefix"] == f"mola_{_prefix(token)}_...")
    else:
        name = name_it(token)

    code, out = _mola(capsys, settings, "revoke", name)
    assert code == 0 and "revoked" in out and _secret(token) not in out
    response = client.get("/jobs", headers=auth(token))
    assert response.status_code == 401 and response.json() == {"detail": "invalid API key"}
    assert client.get("/jobs", headers=auth(other)).status_code == 200  # only that key

    code, out = _mola(capsys, settings, "revoke", name)
    assert code == 0 and "already revoked" in out
    _, out = _mola(capsys, settings, "list", "--json")
    revoked = {k["prefix"]: k["revoked_at"] for k in json.loads(out)}
    assert revoked[f"mola_{_prefix(token)}_..."] is not None and revoked[f"mola_{_prefix(other)}_..."] is None


def test_revoking_an_unknown_key_says_so(settings, sessions, capsys):
    new_key(sessions, "acme")
    code, out = _mola(capsys, settings, "revoke", "0123456789ab")
    assert code == 2 and "no API key with id or prefix '0123456789ab'" in out


def test_key_commands_answer_without_the_migration_log(tmp_path):
    # A fresh data folder: the command migrates it first, and says nothing about that.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOLA_")}
    run = subprocess.run(
        [sys.executable, "-m", "service.cli", "keys", "create", "--tenant", "acme", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("mola_") and "alembic" not in run.stderr


def test_migrate_logs_the_migrations_and_not_alembics_plugins(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOLA_")}
    run = subprocess.run(
        [sys.executable, "-m", "service.cli", "migrate", "--data-dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert "Running upgrade 0007 -> 0008" in run.stderr and "setup plugin" not in run.stderr
