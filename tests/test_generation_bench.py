"""bench/generation_bench.py runs end to end on the CPU, and bench/README.md shows its committed
results as the bench prints them."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def generation_bench():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("generation_bench", ROOT / "bench" / "generation_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_ways_answer_alike_and_are_timed(generation_bench, tmp_path):
    out = tmp_path / "generation.json"
    result = generation_bench.main(["--model", "tiny-llama", "--rounds", "2", "--max-new-tokens", "4", "--output", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["benchmark"] == "generation_bench" and result["model"] == "tiny-llama"
    for name in ("fresh-load", "kept-base"):
        variant = result["variants"][name]
        assert variant["steps"] == 2 and len(variant["times_s"]) == 2 and variant["median_s"] > 0
    assert result["ratio_fresh_over_kept"] == result["variants"]["fresh-load"]["median_s"] / result["variants"]["kept-base"]["median_s"]


def test_the_readme_shows_the_committed_results(generation_bench):
    readme = (ROOT / "bench" / "README.md").read_text()
    results = [path for path in sorted((ROOT / "bench" / "results").glob("*.json")) if json.loads(path.read_text()).get("benchmark") == "generation_bench"]
    assert results
    for path in results:
        assert f"`bench/results/{path.name}`" in readme, f"bench/README.md does not show {path.name}"
        assert "\n".join(generation_bench.table(json.loads(path.read_text()))) in readme
