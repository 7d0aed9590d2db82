"""Boundaries between packages: the API process never loads torch (requests are validated with
the torch-free `mola.allocation`/`mola.config`, uploads with `mola.data`'s torch-free reader)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json, sys, tempfile
    from pathlib import Path

    import api.main
    heavy = sorted(m for m in ("torch", "transformers", "peft", "mola.model", "mola.train") if m in sys.modules)
    assert not heavy, f"importing api.main loaded {heavy}"

    from fastapi.testclient import TestClient
    from service import catalogue, security
    from service.db import make_engine, make_sessionmaker, migrate, session_scope
    from service.settings import Settings

    settings = Settings(data_dir=Path(tempfile.mkdtemp()))
    migrate(settings)
    sessions = make_sessionmaker(make_engine(settings))
    with session_scope(sessions) as s:
        catalogue.upsert(s, "tiny-llama", dict(model_type="llama", num_layers=4, hidden_size=64,
                         target_modules=["q_proj"], linear_modules=["q_proj"]))
        _, key = security.create_api_key(s, "t")

    class Queue:
        def enqueue_training(self, job_id): pass
        def enqueue_token_count(self, dataset_id): pass

    with TestClient(api.main.create_app(settings, queue=Queue())) as client:
        h = {"Authorization": f"Bearer {key}"}
        rows = "\\n".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) for i in range(3))
        ds = client.post("/datasets", headers=h, files={"file": ("d.jsonl", rows.encode())})
        assert ds.status_code == 201, ds.text
        bad = client.post("/datasets", headers=h, files={"file": ("d.jsonl", b"{oops")})
        assert bad.status_code == 422, bad.text
        job = client.post("/jobs", headers=h, json={"base_model": "tiny-llama", "dataset_id": ds.json()["id"],
                                                   "allocation": {"preset": "triangle", "average": 3}})
        assert job.status_code == 201, job.text
        assert client.get("/models", headers=h).status_code == 200
    heavy = sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules)
    assert not heavy, f"serving requests loaded {heavy}"
    print("torch-free")
    """
)


def test_api_process_stays_torch_free():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch-free" in result.stdout


def test_client_and_cli_import_without_torch():
    code = "import sys, mola.client, mola.client_cli, service.cli; service.cli.build_parser(); assert 'torch' not in sys.modules, 'torch'"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]


def test_api_sources_do_not_import_the_library():
    import re

    pattern = re.compile(r"^\s*(import|from)\s+(torch|transformers|peft|mola)\b", re.MULTILINE)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "api").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
