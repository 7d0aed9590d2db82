"""Training-step benchmark: MoLA vs the per-expert loop vs peft LoRA, side by side in one process.

For a LLaMA-shaped model with random weights (built from a config, nothing downloaded) it times
forward + backward + AdamW step of:

    mola[A]          our vectorised MolaLinear, allocation A, top-k, rank r
    loop[A]          the same adapter computed by the per-expert loop oracle (tests/oracle.py)
    lora-matched[A]  peft LoRA with the same trainable parameters per layer (rank_pattern)
    lora-r8          peft LoRA of rank r on every module
    mola-compiled[A], lora-matched-compiled[A]   with --compile: torch.compile of the whole model
                     (mola.compile.compile_for_training, as training with torch_compile does)
    mola-compiled-layers[A], ...   with --compile-scope model,layers: each decoder layer compiled
                     on its own instead (nn.Module.compile), the alternative we measured against

Variants run round-robin (the order rotated every round) so that drift hits all of them alike;
``--repeats`` runs the whole measurement again to show the spread between runs. Prints a table
and writes JSON to bench/results/<device>-<preset>-<date>.json.

    PYTHONPATH=. python bench/step_bench.py --preset cpu-small
    PYTHONPATH=. python bench/step_bench.py --preset tinyllama-1b --allocations 8642,2468 --repeats 2

Needs only torch, transformers and peft.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import platform
import statistics
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `mola`, `tests.oracle` and `bench.benchlib` from the checkout

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

import mola  # noqa: E402
from bench import benchlib  # noqa: E402
from mola.config import MolaConfig  # noqa: E402
from mola.lora import get_lora_model, matched_alpha_pattern, matched_rank_pattern, parameter_counts  # noqa: E402
from mola.model import get_mola_model  # noqa: E402
from mola.architectures import set_submodule  # noqa: E402
from mola.architectures import find_decoder_layers  # noqa: E402
from mola.compile import compile_for_training  # noqa: E402
from mola.train import enable_activation_checkpointing  # noqa: E402
from tests.oracle import LoopMolaLinear  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes

SEVEN = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

# Model shape and measurement defaults per preset; flags override any of them.
PRESETS: dict[str, dict] = {
    # Small enough for 2 CPU cores in a few minutes, with the LLaMA proportions
    # (intermediate ~ 2.7 x hidden, grouped-query attention). One torch thread: on a shared
    # machine a 2-thread OpenMP team stalls whenever another process holds one core, and with
    # one thread the process CPU time is a contention-free cross-check of the wall time.
    "cpu-small": dict(hidden=256, layers=8, intermediate=688, heads=8, kv_heads=2, vocab=8192,
                      seq_len=128, micro_batch=4, warmup=2, steps=3, rounds=6, threads=1),
    "smollm2-135m": dict(hidden=576, layers=30, intermediate=1536, heads=9, kv_heads=3, vocab=49152,
                         seq_len=256, micro_batch=8, warmup=5, steps=10, rounds=5, tie=True),
    "tinyllama-1b": dict(hidden=2048, layers=22, intermediate=5632, heads=32, kv_heads=4, vocab=32000,
                         seq_len=256, micro_batch=8, warmup=5, steps=10, rounds=5),
}  # fmt: skip
SHAPE_KEYS = ("hidden", "layers", "intermediate", "heads", "kv_heads", "vocab", "seq_len", "micro_batch")
RUN_KEYS = ("warmup", "steps", "rounds")


@dataclass
class Variant:
    name: str
    kind: str  # mola | loop | lora-matched | lora-r8, then "-compiled" or "-compiled-layers"
    allocation: str | None
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[], None] = None  # type: ignore[assignment]
    trainable: int = 0
    times: list[list[float]] = field(default_factory=list)  # wall seconds per step, per repeat
    cpu_times: list[list[float]] = field(default_factory=list)  # process CPU seconds (CPU only)
    peak_step_bytes: int | None = None
    last_loss: list = field(default_factory=lambda: [None])


# ---- models ---------------------------------------------------------------------------------
def build_base(shape: dict, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """A LLaMA-shaped causal LM with random weights, built directly on ``device``."""
    config = LlamaConfig(
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        vocab_size=shape["vocab"],
        max_position_embeddings=max(2048, shape["seq_len"]),
        tie_word_embeddings=shape.get("tie", False),
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def make_step(model: nn.Module, optimizer, batch: dict, autocast: torch.dtype | None, device, sink: list) -> Callable[[], None]:
    """One training step: forward (under bf16 autocast on CUDA), backward, AdamW.

    The loss stays on the device (no .item()): a host sync per step would hide launch costs.
    """

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = model(**batch, use_cache=False).loss  # as training runs: no key-value cache
        loss.backward()
        optimizer.step()
        sink[0] = loss.detach()

    return step


def compiled_suffixes(args) -> list[str]:
    """Variant name suffixes of the compiled variants asked for: "-compiled" (whole model),
    "-compiled-layers" (each decoder layer)."""
    if not args.compile:
        return []
    return [{"model": "-compiled", "layers": "-compiled-layers"}[s] for s in args.compile_scope.split(",")]


def compile_layers(model: nn.Module, mode: str | None) -> None:
    """Compile each decoder layer in place. Layers with the same experts share a graph; the
    recompile limit (graphs cached per code object, shared by every layer of every model in the
    process) is raised so that no layer falls back to eager."""
    _, layers = find_decoder_layers(model)
    torch._dynamo.config.recompile_limit += 8 * len(layers)
    for layer in layers:
        layer.compile(mode=mode, dynamic=True)


def build_variants(args, base: nn.Module, batch: dict, device, autocast) -> list[Variant]:
    targets = args.targets.split(",")
    variants: list[Variant] = []

    def add(name: str, kind: str, allocation: str | None, model: nn.Module) -> None:
        model.train()
        if args.gradient_checkpointing:
            enable_activation_checkpointing(model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=3e-4)
        runner = model
        if kind.endswith("-compiled"):  # as `TrainConfig(torch_compile=True)` does
            runner = compile_for_training(model, mode=args.compile_mode)
        elif kind.endswith("-compiled-layers"):
            compile_layers(model, args.compile_mode)
        v = Variant(name, kind, allocation, model, optimizer, trainable=sum(p.numel() for p in params))
        v.step = make_step(runner, optimizer, batch, autocast, device, v.last_loss)
        variants.append(v)

    wanted = set(args.variants.split(","))
    for allocation in args.allocations.split(","):

        def config(allocation: str = allocation) -> MolaConfig:
            """A fresh config per model: get_mola_model records the base model's name in it."""
            return MolaConfig(
                experts=allocation, top_k=args.top_k, rank=args.rank, alpha=args.alpha,
                dropout=args.dropout, target_modules=targets,
            )  # fmt: skip

        ranks = matched_rank_pattern(base, config())
        alphas = matched_alpha_pattern(ranks, config().scaling)
        if "mola" in wanted:
            add(f"mola[{allocation}]", "mola", allocation, get_mola_model(copy.deepcopy(base), config()))
        if "loop" in wanted:
            looped = get_mola_model(copy.deepcopy(base), config())
            for name, layer in looped.mola_modules():
                set_submodule(looped.base_model, name, LoopMolaLinear(layer))
            add(f"loop[{allocation}]", "loop", allocation, looped)
        if "lora-matched" in wanted:
            lora = get_lora_model(copy.deepcopy(base), args.rank, args.alpha, args.dropout, targets, ranks, alphas)
            add(f"lora-matched[{allocation}]", "lora-matched", allocation, lora)
        for suffix in compiled_suffixes(args):
            add(f"mola{suffix}[{allocation}]", f"mola{suffix}", allocation, get_mola_model(copy.deepcopy(base), config()))
            lora = get_lora_model(copy.deepcopy(base), args.rank, args.alpha, args.dropout, targets, ranks, alphas)
            add(f"lora-matched{suffix}[{allocation}]", f"lora-matched{suffix}", allocation, lora)
    if "lora-r8" in wanted:
        lora = get_lora_model(copy.deepcopy(base), args.rank, args.alpha, args.dropout, targets)
        add(f"lora-r{args.rank}", "lora-r8", None, lora)
    return variants


# ---- measurement ----------------------------------------------------------------------------
def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_block(v: Variant, steps: int, device, timer: benchlib.StepTimer) -> None:
    """``steps`` timed steps of one variant; on CUDA also its peak memory above resident."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        timer.run(v.step)
    if device.type == "cuda":
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        v.peak_step_bytes = max(v.peak_step_bytes or 0, peak)


def measure(variants: list[Variant], args, device) -> None:
    for repeat in range(args.repeats):
        for v in variants:  # warm-up: kernels chosen, allocator caches and optimizer state built
            for _ in range(args.warmup):
                v.step()
            sync(device)
        timers = {v.name: benchlib.StepTimer(device) for v in variants}
        # As timeit does: no garbage-collector pause lands inside a timed step (a gen-2
        # collection once cost one step 5x its median here).
        gc.collect()
        gc.disable()
        try:
            for round_index in range(args.rounds):
                shift = round_index % len(variants)
                for v in variants[shift:] + variants[:shift]:
                    run_block(v, args.steps, device, timers[v.name])
                print(f"  repeat {repeat + 1}/{args.repeats}: round {round_index + 1}/{args.rounds} done", flush=True)
        finally:
            gc.enable()
        for v in variants:
            v.times.append(timers[v.name].collect())
            v.cpu_times.append(timers[v.name].cpu_times)
    if device.type == "cpu":  # after the timing: the profiler it uses must not disturb it
        for v in variants:
            v.peak_step_bytes = benchlib.cpu_step_peak_bytes(v.step)


# ---- report ---------------------------------------------------------------------------------
def variant_report(v: Variant, tokens: int, flops: dict, peak: float | None, resident: int) -> dict:
    def rates(median: float) -> dict:
        return {
            "tokens_per_s": tokens / median,
            "mfu": flops["model"] / median / peak if peak else None,
            "mfu_frozen": flops["frozen"] / median / peak if peak else None,
        }

    repeats = [{**benchlib.summarise(t), **rates(statistics.median(t))} for t in v.times]
    pooled = [x for t in v.times for x in t]
    cpu = {}
    if any(v.cpu_times):
        cpu = {"cpu_time": {
            "repeats": [benchlib.summarise(t) for t in v.cpu_times],
            "pooled": benchlib.summarise([x for t in v.cpu_times for x in t]),
        }}  # fmt: skip
    return {
        "kind": v.kind,
        "allocation": v.allocation,
        "trainable_params": v.trainable,
        "repeats": repeats,
        "pooled": {**benchlib.summarise(pooled), **rates(statistics.median(pooled))},
        "peak_step_bytes": v.peak_step_bytes,
        "resident_bytes": resident,
        "last_loss": float(v.last_loss[0]) if v.last_loss[0] is not None else None,
        **cpu,
    }


def ratios(report: dict, allocations: list[str], rank: int) -> dict:
    """Step-time ratios of medians, per repeat and pooled over repeats (wall time; on the CPU
    also of process CPU time, ``cpu_time_*``)."""

    def of(ra: dict, rb: dict) -> tuple[list[float], float]:
        per = [x["median_s"] / y["median_s"] for x, y in zip(ra["repeats"], rb["repeats"])]
        return per, ra["pooled"]["median_s"] / rb["pooled"]["median_s"]

    def ratio(a: str, b: str) -> dict | None:
        if a not in report or b not in report:
            return None
        per, pooled = of(report[a], report[b])
        out = {"per_repeat": per, "pooled": pooled}
        if "cpu_time" in report[a]:
            out["cpu_time_per_repeat"], out["cpu_time_pooled"] = of(report[a]["cpu_time"], report[b]["cpu_time"])
        return out

    out = {}
    for a in allocations:
        pairs = {
            "mola/lora-matched": (f"mola[{a}]", f"lora-matched[{a}]"),
            "loop/mola": (f"loop[{a}]", f"mola[{a}]"),
            "mola/lora-r8": (f"mola[{a}]", f"lora-r{rank}"),
            "lora-matched/lora-r8": (f"lora-matched[{a}]", f"lora-r{rank}"),
            "mola-compiled/lora-matched-compiled": (f"mola-compiled[{a}]", f"lora-matched-compiled[{a}]"),
            "mola-compiled/lora-matched": (f"mola-compiled[{a}]", f"lora-matched[{a}]"),
            "mola/mola-compiled": (f"mola[{a}]", f"mola-compiled[{a}]"),
            "mola-compiled-layers/lora-matched-compiled-layers": (f"mola-compiled-layers[{a}]", f"lora-matched-compiled-layers[{a}]"),
            "mola/mola-compiled-layers": (f"mola[{a}]", f"mola-compiled-layers[{a}]"),
            "mola-compiled-layers/mola-compiled": (f"mola-compiled-layers[{a}]", f"mola-compiled[{a}]"),
        }
        out[a] = {k: r for k, (x, y) in pairs.items() if (r := ratio(x, y)) is not None}
    return out


def print_table(report: dict, ratio_table: dict, device_name: str) -> None:
    print(f"\n{device_name}")
    header = (
        f"{'variant':<36} {'trainable':>11} {'median ms (per repeat)':>26} {'p10-p90 ms':>17} {'cpu ms':>8} "
        f"{'tokens/s':>10} {'MFU':>6} {'peak step MB':>13}"
    )
    print(header)
    print("-" * len(header))
    for name, r in report.items():
        medians = " / ".join(f"{x['median_s'] * 1e3:.1f}" for x in r["repeats"])
        spread = f"{r['pooled']['p10_s'] * 1e3:.1f}-{r['pooled']['p90_s'] * 1e3:.1f}"
        mfu = f"{r['pooled']['mfu'] * 100:.1f}%" if r["pooled"]["mfu"] else "-"
        mem = f"{r['peak_step_bytes'] / 2**20:.0f}" if r["peak_step_bytes"] is not None else "-"
        cpu = f"{r['cpu_time']['pooled']['median_s'] * 1e3:.1f}" if "cpu_time" in r else "-"
        rate = r["pooled"]["tokens_per_s"]
        print(f"{name:<36} {r['trainable_params']:>11,} {medians:>26} {spread:>17} {cpu:>8} {rate:>10.0f} {mfu:>6} {mem:>13}")
    for allocation, table in ratio_table.items():
        for key, value in table.items():
            per = ", ".join(f"{x:.3f}" for x in value["per_repeat"])
            cpu = f"; process CPU time {value['cpu_time_pooled']:.3f}" if "cpu_time_pooled" in value else ""
            print(f"  [{allocation}] {key:<50} {value['pooled']:.3f}  (per repeat: {per}{cpu})")


# ---- main -----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    for key in SHAPE_KEYS + RUN_KEYS:
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help="overrides the preset")
    p.add_argument("--allocations", default="8642", help="comma-separated allocation specs (paper notation)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--targets", default=SEVEN)
    p.add_argument("--variants", default="mola,loop,lora-matched,lora-r8")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of MoLA and matched LoRA")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    p.add_argument("--compile-scope", default="model", help="with --compile: model, layers or model,layers (what is compiled)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="activation checkpointing of every decoder layer in every variant, as training's gradient_checkpointing")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="base weights; bfloat16 also turns on bf16 autocast (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the preset's, else torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="JSON path (default bench/results/<device>-<preset>-<date>.json)")
    args = p.parse_args(argv)
    if not set(args.compile_scope.split(",")) <= {"model", "layers"}:
        p.error(f"--compile-scope: choose model, layers or model,layers, not {args.compile_scope!r}")
    preset = PRESETS[args.preset]
    # A run whose shape differs from its preset's is labelled so (results file, JSON "preset").
    args.label = args.preset if all(getattr(args, k) is None for k in SHAPE_KEYS) else f"{args.preset}-custom"
    if args.gradient_checkpointing:
        args.label += "-checkpointing"
    args.shape = {k: getattr(args, k) if getattr(args, k) is not None else preset[k] for k in SHAPE_KEYS}
    args.shape["tie"] = preset.get("tie", False)
    for key in RUN_KEYS:
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.threads is None:
        args.threads = preset.get("threads")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and cuda)
    dtype, autocast = (torch.bfloat16, torch.bfloat16) if bf16 else (torch.float32, None)
    shape = args.shape
    device_info = benchlib.describe_device(device)
    print(f"device: {device_info['name']}; shape {shape}; allocations {args.allocations}", flush=True)

    base = build_base(shape, device, dtype, args.seed)
    n_linear = benchlib.linear_weight_count(base)
    tokens = shape["micro_batch"] * shape["seq_len"]
    flops = {
        w: benchlib.flops_per_step(n_linear, shape["layers"], shape["hidden"], shape["seq_len"], tokens, f)
        for w, f in (("model", 6), ("frozen", 4))
    }
    generator = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, shape["vocab"], (shape["micro_batch"], shape["seq_len"]), generator=generator).to(device)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}

    variants = build_variants(args, base, batch, device, autocast)
    counts = {}
    for a in args.allocations.split(","):
        config = MolaConfig(experts=a, top_k=args.top_k, rank=args.rank, target_modules=args.targets.split(","))
        c = parameter_counts(base, config)
        counts[a] = {"mola": c["mola"], "lora_matched": c["lora"], "relative_difference": c["relative_difference"]}
    del base
    print("variants: " + ", ".join(f"{v.name} ({v.trainable:,} trainable)" for v in variants), flush=True)

    measure(variants, args, device)

    peak = device_info.get("peak_bf16_flops") if cuda and bf16 else None  # a bf16 peak: MFU only for bf16 runs
    report = {
        v.name: variant_report(v, tokens, flops, peak, benchlib.resident_bytes(v.model, v.optimizer))
        for v in variants
    }
    ratio_table = ratios(report, args.allocations.split(","), args.rank)
    print_table(report, ratio_table, device_info["name"])

    now = dt.datetime.now(dt.timezone.utc)
    result = {
        "benchmark": "step_bench",
        "date": now.isoformat(timespec="seconds"),
        "command": "PYTHONPATH=. python bench/step_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": device_info,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "mola": mola.__version__,
        },
        "preset": args.label,
        "shape": shape,
        "adapter": {"allocations": args.allocations.split(","), "rank": args.rank, "alpha": args.alpha,
                    "top_k": args.top_k, "dropout": args.dropout, "targets": args.targets.split(",")},
        "run": {"warmup": args.warmup, "steps_per_round": args.steps, "rounds": args.rounds,
                "repeats": args.repeats, "order": "round-robin, rotated every round", "seed": args.seed,
                "compile_mode": args.compile_mode if args.compile else None,
                "compile_scope": args.compile_scope if args.compile else None,
                "gradient_checkpointing": args.gradient_checkpointing},
        "precision": "bf16 base weights, bf16 autocast, fp32 adapter weights" if bf16 else "fp32",
        "attention": getattr(variants[0].model.config, "_attn_implementation", None) if variants else None,
        "tokens_per_step": tokens,
        "linear_weights": n_linear,
        "flops_per_step": flops["model"],
        "flop_formula": benchlib.FLOP_FORMULA,
        "memory_method": benchlib.MEMORY_METHOD[device.type],
        "parameter_counts": counts,
        "variants": report,
        "ratios": ratio_table,
    }  # fmt: skip
    out = Path(args.output) if args.output else (
        ROOT / "bench" / "results" / f"{benchlib.slug(device_info['name'])}-{args.label}-{now:%Y-%m-%d}.json"
    )
    benchlib.write_result(result, out)
    return result


if __name__ == "__main__":
    main()
