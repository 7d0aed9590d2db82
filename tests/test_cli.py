"""`python -m mola train` and `analyze` end to end on a tiny model."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from mola import load_mola_model
from mola.models import load_base_model

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, "-m", "mola", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_train_then_analyze(tmp_path):
    data = tmp_path / "data.jsonl"
    rows = [{"instruction": "Repeat the word.", "input": w, "output": w} for w in ["cat", "dog", "sun", "sky"]]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "adapter"
    done = run("train", "--model", "tiny-qwen2", "--data", str(data), "--output", str(out), "--experts", "1,2", "--top-k", "1", "--max-steps", "3", "--batch-size", "4", "--micro-batch-size", "2")
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 3
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["experts_per_layer"] == [1, 1, 2, 2] and config["top_k_per_layer"] == [1, 1, 1, 1]
    base, tokenizer = load_base_model("tiny-qwen2")
    model = load_mola_model(base, out)
    generated = model.generate(torch.tensor([tokenizer("cat").input_ids]), max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == 6

    report = tmp_path / "analysis.json"
    analyzed = run("analyze", str(out), "--data", str(data), "--json", str(report))
    assert analyzed.returncode == 0, analyzed.stderr
    assert "mean ||dW_i - dW_j||_F" in analyzed.stdout and "distance / norm" in analyzed.stdout
    analysis = json.loads(report.read_text())
    assert len(analysis["redundancy"]["layers"]) == 4 and len(analysis["routing"]["layers"]) == 4
    assert "layer  busiest  idlest  selection share per expert" in analyzed.stdout
    top = analysis["routing"]["layers"][3]
    assert top["num_experts"] == 2 and top["top_k"] == 1 and top["max_load"] >= 1 >= top["min_load"]


def test_bad_allocation_is_a_clear_error(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hello"}\n')
    done = run("train", "--model", "tiny-llama", "--data", str(data), "--output", str(tmp_path / "o"), "--experts", "2,0,2,2")
    assert done.returncode == 2
    assert "entry 1 has 0" in done.stderr
