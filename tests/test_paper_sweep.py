"""bench/paper: the smoke preset of the allocation sweep end to end (tiny-llama, real CoLA rows),
resuming, and the report's tables and plots."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

pytestmark = pytest.mark.skipif(not (DATA / "glue" / "CoLA").is_dir(), reason=f"shared data not found at {DATA}")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"paper_{name}", ROOT / "bench" / "paper" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    sweep = _load("sweep")
    out = tmp_path_factory.mktemp("paper")
    assert sweep.main(["--preset", "smoke", "--data-root", str(DATA), "--out", str(out)]) == 0
    return sweep, out


def test_every_run_writes_its_json(smoke):
    sweep, out = smoke
    runs = sweep.plan(sweep.PRESETS["smoke"], list(sweep.CONFIGS))
    assert {(t, c) for t, c, _ in runs} == {("cola", c) for c in sweep.CONFIGS}
    for task, config, seed in runs:
        record = json.loads((out / task / config / f"seed{seed}.json").read_text())
        assert {"task", "config", "seed", "spec", "train", "eval", "time", "device", "versions"} <= set(record)
        assert (record["task"], record["config"], record["seed"]) == (task, config, seed)
        assert {"multiple_choice", "generation"} <= set(record["eval"])
        for metric in ("multiple_choice", "generation"):
            assert 0.0 <= record["eval"][metric]["accuracy"] <= 1.0
            assert record["eval"][metric]["n"] == 2
        trained = sweep.CONFIGS[config]["method"] != "base"
        assert bool(record["train"]["loss_curve"]) == trained
        assert record["train"]["steps"] == (2 if trained else 0)  # 4 rows, batch 2, 1 epoch
        if config.startswith("mola-"):
            layers = record["analysis"]["redundancy"]["layers"]
            assert len(layers) == 4 and all(row["mean_distance"] is not None for row in layers)
            assert record["analysis"]["routing"]["layers"]
    assert (out / "cola" / "mola-5555" / "adapter-seed0" / "adapter_config.json").is_file()
    # Equal total experts; LoRA matched to □ within a few parameters per layer.
    spec = {c: json.loads((out / "cola" / c / "seed0.json").read_text())["spec"] for c in sweep.CONFIGS}
    assert {sum(spec[c]["experts_per_layer"]) for c in ("mola-2468", "mola-5555", "mola-8642", "mola-8228")} == {20}
    assert abs(spec["lora-matched"]["trainable_parameters"] - spec["mola-5555"]["trainable_parameters"]) / spec["mola-5555"]["trainable_parameters"] < 0.01


def test_rerun_skips_finished_runs(smoke, caplog):
    sweep, out = smoke
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/*/seed*.json")}
    with caplog.at_level("INFO", logger="paper.sweep"):
        assert sweep.main(["--preset", "smoke", "--data-root", str(DATA), "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*/seed*.json")} == before
    assert "0 runs done, 7 skipped" in caplog.text
    assert not list(out.rglob("*.tmp"))


def test_report_builds_tables_and_plots(smoke):
    _, out = smoke
    report = _load("report").build_report(out)
    rows = report["tables"]["cola"]
    assert list(rows) == ["zero-shot", "lora-r8", "lora-matched", "mola-2468", "mola-5555", "mola-8642", "mola-8228"]
    assert rows["mola-5555"]["multiple_choice"]["n"] == 1
    text = (out / "report.md").read_text()
    assert "MoLA-□ (5555)" in text and "±" in text
    assert json.loads((out / "report.json").read_text())["tables"]["cola"]
    for name in ("cola-redundancy.png", "cola-routing.png", "cola-loss.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(report["analysis"]["cola"]["redundancy"]["mola-5555"]["layers"]) == 4


def test_report_tests_the_claims_on_paired_questions(smoke):
    _, out = smoke
    report = _load("report").build_report(out, DATA)
    claims = report["analysis"]["cola"]["claims"]
    pairs = {(c["better"], c["worse"], c["metric"]) for c in claims["comparisons"]}
    assert ("mola-2468", "mola-5555", "multiple_choice") in pairs and ("mola-8228", "lora-matched", "generation") in pairs
    assert len(pairs) == (3 + 4 * 2) * 2
    for row in claims["comparisons"]:
        assert row["questions"] == 2 and row["seeds"] == [0]
        assert row["ci95"][0] <= row["difference"] <= row["ci95"][1]
    assert claims["redundancy_trend"]["verdict"] in {"supported", "contradicted", "not resolved"}
    assert claims["relative_redundancy_trend"]["verdict"] in {"supported", "contradicted", "not resolved"}
    assert "relative" in report["analysis"]["cola"]["redundancy"]["mola-5555"]
    assert "the paper's claims, tested" in (out / "report.md").read_text()


def test_paired_difference_and_trend_verdicts():
    claims = _load("claims")
    right = {s: [1] * 150 + [0] * 50 for s in range(3)}
    wrong = {s: [0] * 100 + [1] * 50 + [0] * 50 for s in range(3)}
    clear = claims.paired_difference(right, wrong)
    assert clear["difference"] == pytest.approx(50.0) and clear["verdict"] == "supported"
    assert claims.paired_difference(wrong, right)["verdict"] == "contradicted"
    # The same accuracy reached on different questions: no resolved difference.
    other = {s: [0] * 50 + [1] * 150 for s in range(3)}
    tie = claims.paired_difference(right, other)
    assert tie["difference"] == 0 and tie["ci95"][0] < 0 < tie["ci95"][1] and tie["verdict"] == "not resolved"
    layers = list(range(30))
    assert claims.spearman(layers, [2 * x + 1 for x in layers]) == pytest.approx(1.0)
    assert claims.spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # ties share ranks
    rising = claims.redundancy_trend(layers, [0.1 + 0.01 * x for x in layers])
    assert rising["verdict"] == "supported" and rising["p_value"] < 0.01 and rising["top_over_bottom"] > 1
    assert claims.redundancy_trend(layers, [1.0 - 0.01 * x for x in layers])["verdict"] == "contradicted"


@pytest.mark.parametrize("layers", [4, 22, 30, 32])
def test_allocations_have_equal_total_experts(layers):
    sweep = _load("sweep")
    from mola.allocation import expand_allocation

    for digits in ("2468", "5555", "8642", "8228"):
        experts = sweep.equal_total_allocation(digits, layers)
        assert len(experts) == layers and sum(experts) == 5 * layers, digits
        blocks = [e for i, e in enumerate(experts) if i == 0 or experts[i - 1] != e]
        assert blocks == [int(d) for i, d in enumerate(digits) if i == 0 or digits[i - 1] != d]  # contiguous groups, in order
    # 30 layers: the default split (8, 8, 7, 7) would give ▽ 146 and △ 154; (8, 7, 7, 8) gives 150.
    if layers == 30:
        assert sum(expand_allocation("2468", 30)) == 146
        assert sweep.equal_total_allocation("2468", 30) == [2] * 8 + [4] * 7 + [6] * 7 + [8] * 8
