"""The allocation sweep of issue 6: MoLA-▽/□/△/▷◁ against LoRA and the zero-shot base model.

One command runs every (task, configuration, seed) of a preset and writes one JSON per run to
``<out>/<task>/<config>/seed<k>.json``. A run whose JSON exists is skipped, so an interrupted
sweep continues where it stopped; each JSON is written to a temporary name and renamed.

    python bench/paper/sweep.py --preset smoke            # tiny-llama, seconds (the test)
    python bench/paper/sweep.py --preset cpu              # SmolLM2-135M on CPU (see README)
    python bench/paper/sweep.py --preset gpu              # all six tasks, full (GPU)
    python bench/paper/sweep.py --preset cpu --estimate   # time one step, project the preset
    python bench/paper/sweep.py --preset cpu-issue --estimate --measured results/estimate-cpu.json

Every configuration gets the same model, data, steps, learning rate and seeds; nothing is tuned
per configuration. The MoLA runs also store, computed right after training, the redundancy
between experts per layer (`mola.analysis.expert_redundancy`) and the routing statistics
(`mola.analysis.routing_statistics`) on evaluation prompts; ``bench/paper/report.py`` plots them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402

from mola.allocation import group_sizes  # noqa: E402
from mola.config import MolaConfig  # noqa: E402
from mola.data import collate, load_training_data  # noqa: E402
from mola.tasks import EVAL_SPLITS, TASKS, load_task  # noqa: E402

logger = logging.getLogger("paper.sweep")

# Configurations at equal total experts (□ has 5 per layer; ▽, △ and ▷◁ have the same total over
# 4 equal groups of layers). "lora-matched" gets, per module, the LoRA rank whose trainable
# parameters match MoLA-□'s (`mola.lora.matched_rank_pattern`), alpha scaled so alpha/rank = 2.
CONFIGS: dict[str, dict[str, Any]] = {
    "zero-shot": {"method": "base"},
    "lora-r8": {"method": "lora"},
    "lora-matched": {"method": "lora", "match_experts": "5555"},
    "mola-2468": {"method": "mola", "experts": "2468", "symbol": "▽"},
    "mola-5555": {"method": "mola", "experts": "5555", "symbol": "□"},
    "mola-8642": {"method": "mola", "experts": "8642", "symbol": "△"},
    "mola-8228": {"method": "mola", "experts": "8228", "symbol": "▷◁"},
}
# The adapter hyper-parameters of the paper, the same for every configuration.
ADAPTER = {"rank": 8, "alpha": 16.0, "dropout": 0.05, "top_k": 2, "aux_loss_coef": 0.001}
RECTANGLE = "mola-5555"  # the adapter saved (first seed) for later analysis

# Presets. train_limit / eval_limit: first rows of the split (None: all). Training length is
# given in epochs over train_limit rows; batch 16 for every preset (the paper's 128 would give
# ScienceQA's 200 rows two steps an epoch).
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "model": "tiny-llama",
        # CoLA: its prompts stay short under tiny-llama's byte-level tokenizer.
        "tasks": {"cola": {"train_limit": 4, "eval_limit": 2}},
        "epochs": 1, "batch_size": 2, "micro_batch_size": 2, "seeds": [0], "cutoff_len": 512,
        "max_new_tokens": 4, "routing_examples": 2, "eval_batch_size": 4,
    },
    # The reduced CPU sweep: the whole ScienceQA sample (200 train / 200 test), 2 epochs, every
    # configuration and seed. Sized from measured steps on 2 idle cores with bf16 (README).
    "cpu": {
        "model": "smollm2-135m-instruct",
        "tasks": {"scienceqa": {"train_limit": None, "eval_limit": None}},
        "epochs": 2, "batch_size": 16, "micro_batch_size": 8, "seeds": [0, 1, 2],
        "max_new_tokens": 10, "routing_examples": 64, "eval_batch_size": 16,
    },
    # The example of a CPU sweep (ScienceQA + 1,000 CommonsenseQA rows): projected in the
    # README; several times the hour these 2 cores give.
    "cpu-issue": {
        "model": "smollm2-135m-instruct",
        "tasks": {
            "scienceqa": {"train_limit": None, "eval_limit": None},
            "commonsenseqa": {"train_limit": 1000, "eval_limit": None},
        },
        "epochs": 2, "batch_size": 16, "micro_batch_size": 8, "seeds": [0, 1, 2],
        "max_new_tokens": 12, "routing_examples": 64, "eval_batch_size": 16,
    },
    "gpu": {
        "model": "smollm2-135m-instruct",
        "tasks": {name: {"train_limit": None, "eval_limit": None} for name in TASKS},
        "epochs": 3, "batch_size": 16, "micro_batch_size": 16, "seeds": [0, 1, 2],
        "max_new_tokens": 16, "routing_examples": 256, "eval_batch_size": 64,
    },
}
COMMON = {"learning_rate": 3e-4, "cutoff_len": 256, "warmup_ratio": 0.03, "lr_schedule": "cosine"}


# ---- building one run ------------------------------------------------------------------------


def equal_total_allocation(digits: str, num_layers: int, per_layer: int = 5) -> list[int]:
    """Experts per layer for the paper's four-group ``digits`` with exactly ``per_layer *
    num_layers`` experts in all, as MoLA-□ has.

    The paper's 32 layers split into equal quarters; 30 cannot, and the library's default split
    (8, 8, 7, 7 layers) would give ▽ 146 experts and △ 154 against □'s 150. So among the splits
    into groups of floor/ceil(num_layers / 4) layers (the default one first), take the first whose
    total is equal: (8, 7, 7, 8) for ▽ and △ and the default for ▷◁ on SmolLM2's 30 layers.
    """
    counts = [int(c) for c in digits]
    default = tuple(group_sizes(num_layers, len(counts)))
    for sizes in [default, *sorted(set(itertools.permutations(default)) - {default}, reverse=True)]:
        if sum(c * n for c, n in zip(counts, sizes)) == per_layer * num_layers:
            return [c for c, n in zip(counts, sizes) for _ in range(n)]
    raise ValueError(f"no split of {num_layers} layers gives {digits!r} {per_layer * num_layers} experts")


def precision(choice: str, device: torch.device) -> torch.dtype:
    """The base weights' dtype, also the autocast dtype of training. "auto": bf16 on CUDA and on
    CPUs with native bf16 matmuls (AVX512-BF16 or AMX), fp32 elsewhere. Adapter weights stay
    fp32 either way."""
    if choice != "auto":
        return getattr(torch, choice)
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return torch.bfloat16
    return torch.float32


def build_model(config_name: str, base: torch.nn.Module, seed: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model of ``config_name`` on ``base`` (adapter initialised from ``seed``), and its spec."""
    from mola.architectures import num_decoder_layers
    from mola.lora import get_lora_model, matched_alpha_pattern, matched_rank_pattern, parameter_counts
    from mola.model import get_mola_model

    spec = dict(CONFIGS[config_name])
    torch.manual_seed(seed)  # the adapter's initial weights
    if spec["method"] == "base":
        base.requires_grad_(False)
        return base, {**spec, "trainable_parameters": 0}
    if spec["method"] == "mola":
        experts = equal_total_allocation(spec["experts"], num_decoder_layers(base))
        model = get_mola_model(base, MolaConfig(experts=experts, **ADAPTER))
        spec.update(experts_per_layer=model.experts_per_layer, top_k_per_layer=model.top_k_per_layer)
    else:
        pattern, alphas = None, None
        if "match_experts" in spec:
            target = MolaConfig(experts=spec["match_experts"], **ADAPTER)
            pattern = matched_rank_pattern(base, target)
            alphas = matched_alpha_pattern(pattern, target.scaling)
            counts = parameter_counts(base, target, pattern)
            spec.update(matched_mola_parameters=counts["mola"], rank_pattern_summary=_summarise_ranks(pattern))
        model = get_lora_model(base, rank=ADAPTER["rank"], alpha=ADAPTER["alpha"], dropout=ADAPTER["dropout"], rank_pattern=pattern, alpha_pattern=alphas)
    spec["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, spec


def _summarise_ranks(pattern: dict[str, int]) -> dict[str, int]:
    """Rank by short module name (the same in every layer for a rectangle allocation)."""
    out: dict[str, set[int]] = {}
    for name, rank in pattern.items():
        out.setdefault(name.rsplit(".", 1)[-1], set()).add(rank)
    return {k: sorted(v)[0] if len(v) == 1 else sorted(v) for k, v in out.items()}


def evaluate(model, tokenizer, eval_task, preset: dict[str, Any]) -> dict[str, Any]:
    from mola.evaluate import generation_accuracy, multiple_choice_accuracy

    started = time.perf_counter()
    mc = multiple_choice_accuracy(model, tokenizer, eval_task.choice_items(), batch_size=preset["eval_batch_size"])
    mc_s = time.perf_counter() - started
    gen = generation_accuracy(model, tokenizer, eval_task.generation_items(), max_new_tokens=preset["max_new_tokens"], batch_size=preset["eval_batch_size"])
    gen_s = time.perf_counter() - started - mc_s
    return {
        "split": eval_task.split,
        "n": len(eval_task),
        "multiple_choice": {"accuracy": mc["accuracy"], "correct": mc["correct"], "n": mc["n"], "predictions": mc["predictions"], "time_s": mc_s},
        "generation": {
            "accuracy": gen["accuracy"], "correct": gen["correct"], "failed": gen["failed"], "n": gen["n"],
            "max_new_tokens": preset["max_new_tokens"], "predictions": gen["predictions"],
            "samples": gen["generations"][:5], "time_s": gen_s,
        },
    }


def analyse(model, tokenizer, eval_task, preset: dict[str, Any]) -> dict[str, Any]:
    """Redundancy per layer (and per module) and routing statistics on evaluation prompts."""
    from mola.analysis import expert_redundancy, routing_statistics

    redundancy = expert_redundancy(model)
    prompts = [it["prompt"] for it in eval_task.generation_items()[: preset["routing_examples"]]]
    encoded = [{"input_ids": ids} for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
    size = preset["eval_batch_size"]
    batches = [collate(encoded[i : i + size], tokenizer.pad_token_id) for i in range(0, len(encoded), size)]
    routing = routing_statistics(model, ({k: b[k] for k in ("input_ids", "attention_mask")} for b in batches))
    return {
        "redundancy": redundancy,
        "routing": {"examples": len(prompts), "layers": routing["layers"]},
    }


def run_one(task: str, config_name: str, seed: int, preset: dict[str, Any], args, data_cache: dict) -> dict[str, Any]:
    from mola.models import load_base_model
    from mola.train import TrainConfig, train

    device = torch.device(args.device)
    dtype = precision(args.dtype, device)
    started = time.perf_counter()
    base, tokenizer = load_base_model(args.model, dtype=dtype, device=device, cache_dir=args.cache_dir)
    limits = preset["tasks"][task]
    if task not in data_cache:
        train_task = load_task(task, args.data_root, "train", limits["train_limit"])
        eval_task = load_task(task, args.data_root, EVAL_SPLITS[task], limits["eval_limit"])
        data_cache[task] = (train_task, eval_task)
    train_task, eval_task = data_cache[task]
    config = TrainConfig(
        epochs=preset["epochs"], batch_size=preset["batch_size"], micro_batch_size=preset["micro_batch_size"],
        seed=seed, log_every=1, bf16=dtype == torch.bfloat16, **{**COMMON, "cutoff_len": preset.get("cutoff_len", COMMON["cutoff_len"])},
    )
    model, spec = build_model(config_name, base, seed)
    record: dict[str, Any] = {
        "task": task, "config": config_name, "seed": seed, "spec": spec, "adapter": ADAPTER if spec["method"] != "base" else None,
        "model": args.model, "preset": args.preset, "dtype": str(dtype).removeprefix("torch."), "data": {"train_rows": len(train_task), "eval_split": eval_task.split, "eval_rows": len(eval_task)},
    }
    train_s = 0.0
    if spec["method"] != "base":
        data = load_training_data(train_task.training_records(), tokenizer, cutoff_len=config.cutoff_len)
        curve: list[dict[str, Any]] = []
        keep = ("step", "epoch", "loss", "lm_loss", "aux_loss", "lr", "grad_norm", "step_time_s")

        def on_event(event: dict[str, Any]) -> None:
            if event["kind"] == "train":
                curve.append({k: event[k] for k in keep})
                logger.info("%s %s seed%d step %d/%d loss %.4f (%.1fs)", task, config_name, seed, event["step"], event["total_steps"], event["loss"], event["step_time_s"])

        t0 = time.perf_counter()
        result = train(model, tokenizer, data, config=config, callback=on_event)
        train_s = time.perf_counter() - t0
        record["train"] = {"config": config.to_dict(), "examples": len(data), "steps": result.steps, "loss_curve": curve, "final_loss": curve[-1]["loss"] if curve else None}
    else:
        record["train"] = {"config": None, "examples": 0, "steps": 0, "loss_curve": [], "final_loss": None}
    t0 = time.perf_counter()
    record["eval"] = evaluate(model, tokenizer, eval_task, preset)
    eval_s = time.perf_counter() - t0
    analysis_s = 0.0
    if spec["method"] == "mola":
        t0 = time.perf_counter()
        record["analysis"] = analyse(model, tokenizer, eval_task, preset)
        analysis_s = time.perf_counter() - t0
        if config_name == RECTANGLE and seed == preset["seeds"][0] and not args.no_save_adapter:
            model.save_pretrained(Path(args.out) / task / config_name / f"adapter-seed{seed}", metadata={"task": task, "seed": seed})
    record["time"] = {"train_s": train_s, "eval_s": eval_s, "analysis_s": analysis_s, "total_s": time.perf_counter() - started}
    record["device"] = describe(device)
    record["versions"] = versions()
    record["command"] = sys.argv
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return record


# ---- bookkeeping -----------------------------------------------------------------------------


def describe(device: torch.device) -> dict[str, Any]:
    from benchlib import describe_device

    return describe_device(device)


def versions() -> dict[str, str]:
    import peft
    import transformers

    import mola

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__, "mola": mola.__version__}


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def run_path(out: Path, task: str, config_name: str, seed: int) -> Path:
    return out / task / config_name / f"seed{seed}.json"


def plan(preset: dict[str, Any], configs: list[str]) -> list[tuple[str, str, int]]:
    """(task, config, seed) of every run; the zero-shot base is deterministic: one seed."""
    runs = []
    for seed in preset["seeds"]:  # seed-major: a partial sweep has every config at seed 0 first
        for task in preset["tasks"]:
            for name in configs:
                if CONFIGS[name]["method"] == "base" and seed != preset["seeds"][0]:
                    continue
                runs.append((task, name, seed))
    return runs


# ---- estimate --------------------------------------------------------------------------------


def measure(preset: dict[str, Any], args) -> dict[str, Any]:
    """Time one training micro-batch (forward, backward, AdamW) of MoLA-□, one multiple-choice
    batch and one generation batch, on the first ``micro_batch_size`` rows of the first task."""
    from mola.evaluate import generation_accuracy, multiple_choice_accuracy
    from mola.models import load_base_model
    from mola.train import TrainConfig, train

    device = torch.device(args.device)
    dtype = precision(args.dtype, device)
    base, tokenizer = load_base_model(args.model, dtype=dtype, device=device, cache_dir=args.cache_dir)
    task = next(iter(preset["tasks"]))
    micro = preset["micro_batch_size"]
    train_task = load_task(task, args.data_root, "train", micro)
    eval_task = load_task(task, args.data_root, EVAL_SPLITS[task], micro)
    model, _ = build_model(RECTANGLE, base, 0)
    data = load_training_data(train_task.training_records(), tokenizer, cutoff_len=COMMON["cutoff_len"])
    t0, c0 = time.perf_counter(), time.process_time()
    train(model, tokenizer, data, config=TrainConfig(max_steps=1, batch_size=micro, micro_batch_size=micro, bf16=dtype == torch.bfloat16, **COMMON))
    step_s, step_cpu = time.perf_counter() - t0, time.process_time() - c0
    items = eval_task.choice_items()
    t0 = time.perf_counter()
    multiple_choice_accuracy(model, tokenizer, items, batch_size=preset["eval_batch_size"])
    mc_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    generation_accuracy(model, tokenizer, eval_task.generation_items(), max_new_tokens=preset["max_new_tokens"], batch_size=preset["eval_batch_size"])
    gen_s = time.perf_counter() - t0
    return {
        "task": task, "model": args.model, "device": describe(device), "dtype": str(dtype).removeprefix("torch."), "torch_threads": torch.get_num_threads(),
        "micro_batch": micro, "padded_tokens": micro * max(len(d["input_ids"]) for d in data),
        "mean_tokens": sum(len(d["input_ids"]) for d in data) / len(data),
        "train_micro_step_s": step_s, "train_micro_step_cpu_s": step_cpu,
        "mc_sequences": sum(len(it["options"]) for it in items), "mc_s": mc_s,
        "gen_items": len(items), "gen_s": gen_s, "max_new_tokens": preset["max_new_tokens"],
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def project(preset: dict[str, Any], measured: dict[str, Any], args, configs: list[str]) -> dict[str, Any]:
    """The preset's duration from a measurement, scaled by token counts: training by padded
    tokens (a batch is padded to its longest row, about 1.3x the mean here), evaluation by
    sequences and mean length. Generation is scaled by items and max_new_tokens."""
    from mola.models import load_base_model

    _, tokenizer = load_base_model(args.model, cache_dir=args.cache_dir)
    per_token = measured["train_micro_step_s"] / measured["padded_tokens"]
    per_sequence = measured["mc_s"] / measured["mc_sequences"] / measured["mean_tokens"]  # per token of length
    per_item = measured["gen_s"] / measured["gen_items"]
    runs = plan(preset, configs)
    total, breakdown = 0.0, {}
    for name, limits in preset["tasks"].items():
        tr = load_task(name, args.data_root, "train", limits["train_limit"])
        ev = load_task(name, args.data_root, EVAL_SPLITS[name], limits["eval_limit"])
        mean_len = statistics.fmean(len(x) for x in tokenizer([r["prompt"] + r["completion"] for r in tr.training_records()])["input_ids"])
        step = preset["batch_size"] * mean_len * 1.3 * per_token
        steps = max(1, math.ceil(len(tr) / preset["batch_size"] * preset["epochs"]))
        options = sum(len(it["options"]) for it in ev.choice_items())
        gen = per_item * len(ev) * (mean_len / measured["mean_tokens"] + preset["max_new_tokens"] / measured["max_new_tokens"]) / 2
        eval_run = options * mean_len * per_sequence + gen
        trained = sum(1 for t, c, _ in runs if t == name and CONFIGS[c]["method"] != "base")
        evaluated = sum(1 for t, _, _ in runs if t == name)
        task_s = trained * steps * step + evaluated * eval_run
        breakdown[name] = {"train_rows": len(tr), "eval_rows": len(ev), "mean_tokens": mean_len, "steps_per_run": steps, "step_s": step,
                           "eval_run_s": eval_run, "trained_runs": trained, "evaluated_runs": evaluated, "total_s": task_s}
        total += task_s
    return {"preset": args.preset, "measured": measured, "tasks": breakdown, "projected_total_s": total, "projected_total_h": total / 3600}


# ---- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--model", help="base model (default: the preset's; smollm2-135m-instruct except for smoke)")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"), help="the shared data folder (default ../shared/data from the repo root)")
    p.add_argument("--out", help="results folder (default bench/paper/results; results-smoke for the smoke preset)")
    p.add_argument("--tasks", help="comma list, a subset of the preset's tasks")
    p.add_argument("--configs", help=f"comma list of configurations (default all: {','.join(CONFIGS)})")
    p.add_argument("--seeds", help="comma list of seeds (default the preset's, 0,1,2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto", help="base weights and training autocast (auto: bf16 on CUDA and on CPUs with native bf16)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--cache-dir", help="converted-model cache (default ~/.cache/mola/models)")
    p.add_argument("--no-save-adapter", action="store_true", help=f"do not keep the {RECTANGLE} adapter of the first seed")
    p.add_argument("--estimate", action="store_true", help="time one step and project the preset's duration; trains nothing")
    p.add_argument("--measured", help="with --estimate: reuse the measurement of an earlier estimate JSON instead of timing again")
    p.add_argument("--dry-run", action="store_true", help="list the runs and whether they are done")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = json.loads(json.dumps(PRESETS[args.preset]))
    args.model = args.model or preset["model"]
    if args.tasks:
        wanted = [t.strip() for t in args.tasks.split(",") if t.strip()]
        unknown = [t for t in wanted if t not in TASKS]
        if unknown:
            raise SystemExit(f"unknown tasks {unknown}; choose from {', '.join(TASKS)}")
        preset["tasks"] = {t: preset["tasks"].get(t, {"train_limit": None, "eval_limit": None}) for t in wanted}
    if args.seeds:
        preset["seeds"] = [int(s) for s in args.seeds.split(",")]
    configs = [c.strip() for c in args.configs.split(",")] if args.configs else list(CONFIGS)
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; choose from {', '.join(CONFIGS)}")
    out = Path(args.out or HERE / ("results-smoke" if args.preset == "smoke" else "results"))
    args.out = str(out)

    if args.estimate:
        measured = json.loads(Path(args.measured).read_text())["measured"] if args.measured else measure(preset, args)
        result = project(preset, measured, args, configs)
        print(json.dumps(result, indent=1, default=str))
        write_json_atomic(out / f"estimate-{args.preset}.json", result)
        return 0

    runs = plan(preset, configs)
    if args.dry_run:
        for task, name, seed in runs:
            print(f"{'done' if run_path(out, task, name, seed).exists() else 'todo'}  {task}/{name}/seed{seed}")
        return 0
    write_json_atomic(out / "sweep.json", {"preset": args.preset, "settings": preset, "model": args.model, "configs": {c: CONFIGS[c] for c in configs}, "adapter": ADAPTER, "common": COMMON})
    data_cache: dict = {}
    done = skipped = 0
    for i, (task, name, seed) in enumerate(runs, 1):
        path = run_path(out, task, name, seed)
        if path.exists():
            skipped += 1
            logger.info("[%d/%d] %s exists, skipped", i, len(runs), path.relative_to(out))
            continue
        logger.info("[%d/%d] %s/%s seed %d", i, len(runs), task, name, seed)
        record = run_one(task, name, seed, preset, args, data_cache)
        write_json_atomic(path, record)
        done += 1
        ev = record["eval"]
        logger.info("%s/%s seed%d: mc %.3f gen %.3f (%.0fs)", task, name, seed, ev["multiple_choice"]["accuracy"], ev["generation"]["accuracy"], record["time"]["total_s"])
    logger.info("%d runs done, %d skipped (already there)", done, skipped)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    logger.setLevel(logging.INFO)
    sys.exit(main())
