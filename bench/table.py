"""Markdown tables of a step_bench result, as bench/README.md shows them: the device and command,
one row per variant, one row per ratio. Copying numbers from JSON by hand is where a results
table goes wrong; this prints them instead. Standard library only (runs without torch).

    python bench/table.py bench/results/nvidia-h100-80gb-hbm3-tinyllama-1b-2026-11-24.json [...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RATIO_LABELS = {
    "mola/lora-matched": "MoLA / LoRA-matched",
    "loop/mola": "loop / MoLA",
    "mola/lora-r8": "MoLA / LoRA r=8",
    "lora-matched/lora-r8": "LoRA-matched / LoRA r=8",
    "mola-compiled/lora-matched-compiled": "MoLA compiled / LoRA-matched compiled",
    "mola-compiled/lora-matched": "MoLA compiled / LoRA-matched eager",
    "mola/mola-compiled": "MoLA eager / MoLA compiled (whole model)",
    "mola-compiled-layers/lora-matched-compiled-layers": "MoLA / LoRA-matched, each compiled per layer",
    "mola/mola-compiled-layers": "MoLA eager / MoLA compiled per layer",
    "mola-compiled-layers/mola-compiled": "MoLA compiled per layer / whole model",
}


def ms(seconds: float) -> str:
    """Milliseconds to three significant figures or so: 446, 62.3, 1.84."""
    value = seconds * 1e3
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def device_line(device: dict) -> str:
    if device.get("type") == "cuda":
        memory = f", {device['memory_bytes'] / 2**30:.0f} GiB" if device.get("memory_bytes") else ""
        return f"{device['name']}{memory}, driver {device.get('driver') or '?'}, CUDA {device.get('cuda') or '?'}"
    isa = ", ".join(device.get("isa") or []) or "no AVX-512"
    return (
        f"{device['name']} (family {device.get('cpu_family')}, model {device.get('cpu_model_number')}; {isa}), "
        f"{device.get('cores')} cores, {device.get('torch_threads')} torch thread{'s' * (device.get('torch_threads') != 1)}"
    )


def header(result: dict, path: str) -> list[str]:
    versions = result["versions"]
    return [
        f"### {result['device']['name']}: `{result['preset']}` (`{path}`)",
        "",
        f"{device_line(result['device'])}. torch {versions['torch']}, transformers {versions['transformers']}, "
        f"peft {versions['peft']}, {result['precision']}, {result.get('attention') or '?'} attention. "
        f"Run on {result['date'][:10]} with `{result['command']}`. {result['tokens_per_step']} tokens per step; "
        f"{result['flops_per_step'] / 1e9:.1f} GFLOP of model FLOPs per step.",
    ]


def variant_table(result: dict) -> list[str]:
    variants = result["variants"]
    repeats = max(len(v["repeats"]) for v in variants.values())
    with_cpu = any("cpu_time" in v for v in variants.values())
    with_mfu = any(v["pooled"].get("mfu") for v in variants.values())
    columns = ["variant", "trainable", f"median ms (repeat {' / '.join(str(i + 1) for i in range(repeats))})", "p10–p90 ms"]
    columns += ["CPU ms"] * with_cpu + ["tokens/s"] + ["MFU"] * with_mfu + ["peak step MiB"]
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    for name, v in variants.items():
        pooled = v["pooled"]
        cells = [
            f"`{name}`",
            f"{v['trainable_params']:,}",
            " / ".join(ms(r["median_s"]) for r in v["repeats"]),
            f"{ms(pooled['p10_s'])}–{ms(pooled['p90_s'])}",
        ]
        if with_cpu:
            cells.append(ms(v["cpu_time"]["pooled"]["median_s"]) if "cpu_time" in v else "-")
        cells.append(f"{pooled['tokens_per_s']:.0f}")
        if with_mfu:
            cells.append(f"{pooled['mfu']:.1%}" if pooled.get("mfu") else "-")
        cells.append(f"{v['peak_step_bytes'] / 2**20:.0f}" if v.get("peak_step_bytes") is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def ratio_table(result: dict) -> list[str]:
    allocations = list(result["ratios"])
    keys = list(dict.fromkeys(k for table in result["ratios"].values() for k in table))
    with_cpu = any("cpu_time_pooled" in r for table in result["ratios"].values() for r in table.values())
    what = "pooled (per repeat; CPU time)" if with_cpu else "pooled (per repeat)"
    lines = ["| ratio (step time) | " + " | ".join(f"{a}: {what}" for a in allocations) + " |", "|---|" + "---|" * len(allocations)]
    for key in keys:
        cells = []
        for allocation in allocations:
            r = result["ratios"][allocation].get(key)
            if r is None:
                cells.append("-")
                continue
            detail = ", ".join(f"{x:.3f}" for x in r["per_repeat"])
            if "cpu_time_pooled" in r:
                detail += f"; {r['cpu_time_pooled']:.3f}"
            cells.append(f"**{r['pooled']:.3f}** ({detail})")
        lines.append(f"| {RATIO_LABELS.get(key, key)} | " + " | ".join(cells) + " |")
    return lines


def render(result: dict, path: str) -> str:
    return "\n".join([*header(result, path), "", *variant_table(result), "", *ratio_table(result)]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="JSON files written by bench/step_bench.py")
    args = parser.parse_args(argv)
    for i, name in enumerate(args.results):
        path = Path(name)
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"error: {name}: {exc}", file=sys.stderr)
            return 1
        if result.get("benchmark") != "step_bench":
            print(f"error: {name}: not a step_bench result", file=sys.stderr)
            return 1
        print(("\n" if i else "") + render(result, path.as_posix()), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
