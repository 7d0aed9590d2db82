"""bench/step_bench.py end to end on the CPU with a tiny shape: issue 5's GPU numbers come from
one device session with no second chance, so the bench that produces them must not rot here.
Checks what the report says (every variant, matched parameter counts, ratios, the FLOP count),
never how fast anything is; and that bench/README.md's tables are bench/table.py's rendering of
the committed results."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--hidden", "64", "--layers", "4", "--intermediate", "128", "--heads", "4", "--kv-heads", "2",
    "--vocab", "256", "--seq-len", "16", "--micro-batch", "2",
    "--warmup", "1", "--steps", "2", "--rounds", "2", "--repeats", "2", "--threads", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def step_bench():
    spec = importlib.util.spec_from_file_location("step_bench", ROOT / "bench" / "step_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _table():
    spec = importlib.util.spec_from_file_location("bench_table", ROOT / "bench" / "table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_variant_is_timed_and_compared(step_bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = step_bench.main([*TINY, "--allocations", "8642,2468", "--output", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["preset"] == "cpu-small-custom" and report["shape"]["layers"] == 4
    assert report["precision"] == "fp32" and report["tokens_per_step"] == 32

    names = {f"{kind}[{a}]" for kind in ("mola", "loop", "lora-matched") for a in ("8642", "2468")} | {"lora-r8"}
    assert set(report["variants"]) == names
    for name, variant in report["variants"].items():
        assert len(variant["repeats"]) == 2 and variant["pooled"]["median_s"] > 0, name
        assert variant["peak_step_bytes"] > 0 and variant["resident_bytes"] > 0
        assert variant["last_loss"] is not None and variant["last_loss"] == variant["last_loss"], name  # not NaN
        assert variant["pooled"]["mfu"] is None  # no bf16 peak to divide by on a CPU
    for allocation in ("8642", "2468"):
        variants = report["variants"]
        # The loop oracle is the same adapter; matched LoRA has the same trainable parameters.
        assert variants[f"loop[{allocation}]"]["trainable_params"] == variants[f"mola[{allocation}]"]["trainable_params"]
        counts = report["parameter_counts"][allocation]
        assert counts["mola"] == variants[f"mola[{allocation}]"]["trainable_params"]
        assert counts["lora_matched"] == variants[f"lora-matched[{allocation}]"]["trainable_params"]
        assert abs(counts["relative_difference"]) < 0.05
        ratios = report["ratios"][allocation]
        assert set(ratios) == {"mola/lora-matched", "loop/mola", "mola/lora-r8", "lora-matched/lora-r8"}
        assert all(len(r["per_repeat"]) == 2 and r["pooled"] > 0 and "cpu_time_pooled" in r for r in ratios.values())
    # 8642 puts more experts in the low layers than 2468, the same total: equal sizes.
    assert report["parameter_counts"]["8642"]["mola"] == report["parameter_counts"]["2468"]["mola"]
    # The base model's matmul FLOPs (6 per weight per token) plus attention's, for 32 tokens of 16.
    assert report["linear_weights"] > 0
    assert report["flops_per_step"] == 32 * (6 * report["linear_weights"] + 12 * 4 * 64 * 16)

    table = capsys.readouterr().out
    assert "[8642] loop/mola" in table and "[2468] mola/lora-matched" in table and "wrote " in table

    assert _table().main([str(out)]) == 0
    markdown = capsys.readouterr().out.splitlines()
    rows = {line.split(" | ")[0].strip("| `"): line for line in markdown if line.startswith("| `")}
    assert set(rows) == names
    mola = report["variants"]["mola[8642]"]
    assert rows["mola[8642]"].startswith(f"| `mola[8642]` | {mola['trainable_params']:,} | ")
    loop_row = next(line for line in markdown if line.startswith("| loop / MoLA |"))  # columns: 8642, 2468
    assert loop_row.split(" | ")[2].startswith(f"**{report['ratios']['2468']['loop/mola']['pooled']:.3f}** (")


def test_the_readme_tables_are_the_committed_results():
    table, readme = _table(), (ROOT / "bench" / "README.md").read_text()
    results = sorted((ROOT / "bench" / "results").glob("*.json"))
    assert results
    for path in results:
        result = json.loads(path.read_text())
        if result.get("benchmark") != "step_bench":
            continue
        assert f"`bench/results/{path.name}`" in readme, f"bench/README.md does not show {path.name}"
        for rendered in ("\n".join(table.variant_table(result)), "\n".join(table.ratio_table(result))):
            assert rendered in readme, f"bench/README.md differs from `python bench/table.py {path.relative_to(ROOT)}`"


def test_compiled_variants_train(step_bench, tmp_path):
    # The `compiled` part of bench/gpu_session.sh: torch.compile of the whole model, as training does.
    # About two minutes on 2 CPU cores, nearly all of it compiling (forward, backward, the profiled step).
    flags = [*TINY, "--layers", "2", "--repeats", "1", "--rounds", "1", "--allocations", "42", "--variants", "mola,lora-matched", "--compile"]
    report = step_bench.main([*flags, "--output", str(tmp_path / "compiled.json")])
    assert set(report["variants"]) == {"mola[42]", "lora-matched[42]", "mola-compiled[42]", "lora-matched-compiled[42]"}
    assert report["run"]["compile_scope"] == "model"
    assert {"mola-compiled/lora-matched-compiled", "mola/mola-compiled"} <= set(report["ratios"]["42"])
    eager, compiled = report["variants"]["mola[42]"], report["variants"]["mola-compiled[42]"]
    assert compiled["trainable_params"] == eager["trainable_params"] and compiled["last_loss"] == compiled["last_loss"]


def test_gradient_checkpointing_recomputes_every_variants_layers(step_bench, tmp_path):
    common = [*TINY, "--allocations", "42", "--gradient-checkpointing"]
    args = step_bench.parse_args([*common, "--variants", "mola,loop,lora-matched,lora-r8"])
    assert args.label == "cpu-small-custom-checkpointing"  # never the same file as the run without it
    base = step_bench.build_base(args.shape, torch.device("cpu"), torch.float32, 0)
    ids = torch.randint(0, args.shape["vocab"], (2, args.shape["seq_len"]))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    variants = step_bench.build_variants(args, base, batch, torch.device("cpu"), None)
    assert [v.kind for v in variants] == ["mola", "loop", "lora-matched", "lora-r8"]
    for v in variants:
        # The outermost module at that path: MolaLinear, the loop oracle, or peft's LoRA layer.
        adapted = next(m for name, m in v.model.named_modules() if name.endswith("layers.0.self_attn.q_proj"))
        calls = []
        handle = adapted.register_forward_hook(lambda *_: calls.append(1))
        try:
            v.step()
        finally:
            handle.remove()
        assert len(calls) == 2, v.name  # the forward, and its recomputation in the backward pass

    flags = ["--variants", "mola,lora-matched", "--repeats", "1", "--rounds", "1", "--output", str(tmp_path / "ckpt.json")]
    report = step_bench.main([*common, *flags])
    assert report["preset"] == "cpu-small-custom-checkpointing" and report["run"]["gradient_checkpointing"] is True
    assert "--gradient-checkpointing" in report["command"] and "mola/lora-matched" in report["ratios"]["42"]
