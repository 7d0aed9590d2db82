"""Aggregate the sweep's JSONs into tables (markdown + JSON) and plots (PNG).

    python bench/paper/report.py [--results bench/paper/results]

Writes into the results folder:

* ``report.md`` / ``report.json``: per task and configuration, mean ± sample std over seeds of
  the multiple-choice accuracy (option log-likelihood) and the generate-and-extract accuracy,
  with the number of seeds, trainable parameters and the final training loss;
* ``<task>-redundancy.png``: mean pairwise Frobenius distance between experts per layer (the
  paper's Figure 3), for MoLA-□ (bold) and the other allocations, mean over seeds;
* ``<task>-routing.png``: MoLA-□'s routing, share of tokens selecting each expert per layer
  (first seed), and the per-layer imbalance (largest share / top_k / N uniform share);
* ``<task>-loss.png``: training loss curves, mean over seeds;
* the claims (`claims.py`): each comparison of the paper's claims as a paired difference with a
  95% bootstrap interval and a verdict, and the redundancy trend of MoLA-□. Pairing needs the
  questions' answers, read from ``--data-root`` (the shared data); without it, no claims section.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(HERE)]

from claims import check_claims  # noqa: E402
ORDER = ["zero-shot", "lora-r8", "lora-matched", "mola-2468", "mola-5555", "mola-8642", "mola-8228"]
LABELS = {
    "zero-shot": "zero-shot base",
    "lora-r8": "LoRA r=8",
    "lora-matched": "LoRA, params of □",
    "mola-2468": "MoLA-▽ (2468)",
    "mola-5555": "MoLA-□ (5555)",
    "mola-8642": "MoLA-△ (8642)",
    "mola-8228": "MoLA-▷◁ (8228)",
}
RECTANGLE = "mola-5555"


def load_runs(results: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{task: {config: [run, ...] sorted by seed}} from ``results/<task>/<config>/seed<k>.json``."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for path in sorted(results.glob("*/*/seed*.json")):
        record = json.loads(path.read_text())
        runs.setdefault(record["task"], {}).setdefault(record["config"], []).append(record)
    for configs in runs.values():
        for records in configs.values():
            records.sort(key=lambda r: r["seed"])
    return runs


def mean_std(values: list[float]) -> dict[str, Any]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def summarise(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    tables: dict[str, Any] = {}
    for task, configs in sorted(runs.items()):
        rows = {}
        for name in sorted(configs, key=lambda c: ORDER.index(c) if c in ORDER else len(ORDER)):
            records = configs[name]
            first = records[0]
            rows[name] = {
                "label": LABELS.get(name, name),
                "seeds": [r["seed"] for r in records],
                "multiple_choice": mean_std([r["eval"]["multiple_choice"]["accuracy"] for r in records]),
                "generation": mean_std([r["eval"]["generation"]["accuracy"] for r in records]),
                "generation_failed": mean_std([r["eval"]["generation"]["failed"] / max(1, r["eval"]["generation"]["n"]) for r in records]),
                "final_train_loss": mean_std([r["train"]["final_loss"] for r in records]),
                "trainable_parameters": first["spec"].get("trainable_parameters"),
                "steps": first["train"]["steps"],
                "eval_split": first["eval"]["split"],
                "eval_n": first["eval"]["n"],
                "train_rows": first["data"]["train_rows"],
                "model": first["model"],
                "preset": first["preset"],
            }
        tables[task] = rows
    return tables


def _cell(stat: dict[str, Any], percent: bool = True) -> str:
    if stat["mean"] is None:
        return "n/a"
    scale = 100 if percent else 1
    digits = 1 if percent else 3
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def markdown(tables: dict[str, Any]) -> str:
    lines = ["# MoLA allocation sweep: results", ""]
    if not tables:
        return "\n".join(lines + ["No finished runs yet.", ""])
    for task, rows in tables.items():
        any_row = next((r for r in rows.values() if r["steps"]), next(iter(rows.values())))
        lines += [
            f"## {task}",
            "",
            f"Model `{any_row['model']}`, preset `{any_row['preset']}`, {any_row['train_rows']} training rows, "
            f"{any_row['steps']} steps, evaluated on {any_row['eval_n']} rows of `{any_row['eval_split']}`. "
            "Accuracy in %, mean ± sample std over seeds.",
            "",
            "| configuration | seeds | multiple choice (log-lik.) | generate + extract | no answer found | final train loss | trainable params |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in rows.values():
            params = f"{row['trainable_parameters']:,}" if row["trainable_parameters"] else "0"
            lines.append(
                f"| {row['label']} | {len(row['seeds'])} | {_cell(row['multiple_choice'])} | {_cell(row['generation'])} | "
                f"{_cell(row['generation_failed'])} | {_cell(row['final_train_loss'], percent=False)} | {params} |"
            )
        lines.append("")
    return "\n".join(lines)


# ---- analysis --------------------------------------------------------------------------------


def redundancy_by_layer(records: list[dict[str, Any]], key: str = "mean_distance") -> tuple[list[int], list[float], list[float]]:
    """Layers, mean and std over seeds of a per-layer redundancy number: the mean pairwise
    expert distance, or (``key="relative_distance"``, in runs made since mola.analysis reports
    it) that distance over the experts' mean norm."""
    per_layer: dict[int, list[float]] = {}
    for record in records:
        for row in record.get("analysis", {}).get("redundancy", {}).get("layers", []):
            if row.get(key) is not None:
                per_layer.setdefault(row["layer"], []).append(row[key])
    layers = sorted(per_layer)
    means = [statistics.fmean(per_layer[j]) for j in layers]
    stds = [statistics.stdev(per_layer[j]) if len(per_layer[j]) > 1 else 0.0 for j in layers]
    return layers, means, stds


def plot_redundancy(task: str, configs: dict[str, list[dict[str, Any]]], path: Path) -> dict[str, Any]:
    """The distance per layer; beside it, where the runs have it, the distance over the experts'
    mean norm (a layer whose experts moved less looks more alike by distance alone)."""
    relative = any(redundancy_by_layer(configs[n], "relative_distance")[0] for n in configs if n.startswith("mola-"))
    fig, axes = plt.subplots(1, 2 if relative else 1, figsize=(12 if relative else 7, 4), squeeze=False)
    numbers: dict[str, Any] = {}
    panels = [("mean_distance", "mean pairwise ‖ΔW_i − ΔW_j‖_F")] + ([("relative_distance", "distance / mean ‖ΔW_e‖_F")] if relative else [])
    for ax, (key, ylabel) in zip(axes[0], panels):
        for name in ORDER:
            if not name.startswith("mola-") or name not in configs:
                continue
            layers, means, stds = redundancy_by_layer(configs[name], key)
            if not layers:
                continue
            entry = numbers.setdefault(name, {})
            if key == "mean_distance":
                entry.update(layers=layers, mean=means, std=stds)
            else:
                entry["relative"] = {"layers": layers, "mean": means, "std": stds}
            bold = name == RECTANGLE
            ax.plot(layers, means, marker="o" if bold else None, linewidth=2.5 if bold else 1, alpha=1 if bold else 0.6, label=LABELS[name])
            if bold and any(stds):
                ax.fill_between(layers, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.2)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("decoder layer")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{task}: expert redundancy per layer (lower = experts more alike)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return numbers


def plot_routing(task: str, records: list[dict[str, Any]], path: Path) -> dict[str, Any] | None:
    record = next((r for r in records if r.get("analysis", {}).get("routing", {}).get("layers")), None)
    if record is None:
        return None
    layers = record["analysis"]["routing"]["layers"]
    top_k = record["spec"]["top_k_per_layer"]
    width = max(len(row["selection_share"]) for row in layers)
    grid = [row["selection_share"] + [float("nan")] * (width - len(row["selection_share"])) for row in layers]
    # Imbalance: the busiest expert's share over the uniform share k/N (1 = perfectly balanced).
    imbalance = [max(row["selection_share"]) / (top_k[row["layer"]] / len(row["selection_share"])) for row in layers]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5), gridspec_kw={"width_ratios": [1.3, 1]})
    image = left.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.yaxis.set_major_locator(MaxNLocator(integer=True))
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_xlabel("expert")
    left.set_ylabel("decoder layer")
    left.set_title("share of tokens selecting each expert")
    fig.colorbar(image, ax=left)
    right.plot([row["layer"] for row in layers], imbalance, marker="o")
    right.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    right.set_xlabel("decoder layer")
    right.set_ylabel("max share / uniform share")
    right.set_title("routing imbalance")
    right.grid(alpha=0.3)
    fig.suptitle(f"{task}: MoLA-□ routing (seed {record['seed']}, {record['analysis']['routing']['examples']} eval prompts)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {"seed": record["seed"], "layers": layers, "imbalance": imbalance}


def plot_loss(task: str, configs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in ORDER:
        records = [r for r in configs.get(name, []) if r["train"]["loss_curve"]]
        if not records:
            continue
        steps = [p["step"] for p in records[0]["train"]["loss_curve"]]
        curves = [[p["lm_loss"] for p in r["train"]["loss_curve"]] for r in records]
        mean = [statistics.fmean(values) for values in zip(*curves)]
        ax.plot(steps, mean, label=LABELS[name])
    ax.set_xlabel("step")
    ax.set_ylabel("training LM loss (mean over seeds)")
    ax.set_title(f"{task}: training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- claims ----------------------------------------------------------------------------------


def scorers_for(task: str, configs: dict[str, list[dict[str, Any]]], data_root: Path | None) -> dict[str, Any] | None:
    """Per-question correctness functions for both metrics, from the evaluation split's answers
    (the first ``eval_rows`` rows, as the sweep took them); None without the data."""
    if data_root is None or not data_root.is_dir():
        return None
    from mola.evaluate import answers_match
    from mola.tasks import load_task

    first = next(iter(configs.values()))[0]
    eval_task = load_task(task, data_root, first["data"]["eval_split"], first["data"]["eval_rows"])
    choice = [it["answer"] for it in eval_task.choice_items()]
    expected = [it["answer"] for it in eval_task.generation_items()]

    def multiple_choice(record: dict[str, Any]) -> list[bool]:
        return [p == a for p, a in zip(record["eval"]["multiple_choice"]["predictions"], choice, strict=True)]

    def generation(record: dict[str, Any]) -> list[bool]:
        return [answers_match(p, a) for p, a in zip(record["eval"]["generation"]["predictions"], expected, strict=True)]

    return {"multiple_choice": multiple_choice, "generation": generation}


def claims_markdown(task: str, claims: dict[str, Any]) -> list[str]:
    if not claims["comparisons"] and not claims["redundancy_trend"]:
        return []
    lines = [
        f"### {task}: the paper's claims, tested",
        "",
        "Paired differences in accuracy points (better − worse as the paper orders them), mean over "
        "seeds and questions, with a 95% hierarchical bootstrap interval (seeds, then questions). "
        "Supported: the interval is above 0; contradicted: below 0; not resolved: it spans 0.",
        "",
        "| claim | metric | difference | 95% interval | verdict |",
        "|---|---|---:|---:|---|",
    ]
    for row in claims["comparisons"]:
        low, high = row["ci95"]
        lines.append(f"| {row['claim']} | {row['metric'].replace('_', ' ')} | {row['difference']:+.1f} | [{low:+.1f}, {high:+.1f}] | {row['verdict']} |")
    trend = claims["redundancy_trend"]
    if trend:
        lines += [
            "",
            f"Redundancy (MoLA-□): Spearman ρ(layer, mean pairwise distance) = {trend['spearman_rho']:+.2f}, "
            f"one-sided permutation p = {trend['p_value']:.3g}; top-quarter / bottom-quarter mean distance = "
            f"{trend['top_over_bottom']:.2f}. Lower layers' experts more alike: **{trend['verdict']}**.",
        ]
    relative = claims.get("relative_redundancy_trend")
    if relative:
        lines += [
            "",
            f"The same on distance / mean expert norm: ρ = {relative['spearman_rho']:+.2f}, p = {relative['p_value']:.3g}, "
            f"top / bottom quarter = {relative['top_over_bottom']:.2f}: **{relative['verdict']}**.",
        ]
    return lines + [""]


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_report(results: str | os.PathLike, data_root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Tables, plots and claims for every task with finished runs under ``results``; returns the
    JSON. ``data_root``: the shared data, for the claims' per-question pairing."""
    results = Path(results)
    data_root = Path(data_root) if data_root is not None else None
    runs = load_runs(results)
    tables = summarise(runs)
    analysis: dict[str, Any] = {}
    plots: list[str] = []
    for task, configs in runs.items():
        entry: dict[str, Any] = {}
        if any(name.startswith("mola-") for name in configs):
            entry["redundancy"] = plot_redundancy(task, configs, results / f"{task}-redundancy.png")
            plots.append(f"{task}-redundancy.png")
        if RECTANGLE in configs:
            routing = plot_routing(task, configs[RECTANGLE], results / f"{task}-routing.png")
            if routing is not None:
                entry["routing_rectangle"] = routing
                plots.append(f"{task}-routing.png")
        if any(r["train"]["loss_curve"] for records in configs.values() for r in records):
            plot_loss(task, configs, results / f"{task}-loss.png")
            plots.append(f"{task}-loss.png")
        scorers = scorers_for(task, configs, data_root)
        if scorers is not None:
            entry["claims"] = check_claims(configs, scorers, entry.get("redundancy"))
        analysis[task] = entry
    report = {"tables": tables, "analysis": analysis, "plots": plots}
    write_atomic(results / "report.json", json.dumps(report, indent=1) + "\n")
    write_atomic(results / "report.md", full_markdown(report))
    return report


def full_markdown(report: dict[str, Any]) -> str:
    lines = [markdown(report["tables"])]
    for task, entry in report["analysis"].items():
        if "claims" in entry:
            lines += claims_markdown(task, entry["claims"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Tables and plots from the MoLA allocation sweep's JSONs")
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"), help="the shared data, for pairing questions in the claims (default ../shared/data)")
    args = p.parse_args(argv)
    if not Path(args.results).is_dir():
        raise SystemExit(f"no results folder {args.results}: run bench/paper/sweep.py first")
    report = build_report(args.results, args.data_root)
    sys.stdout.write(full_markdown(report) + "\n")
    print(f"plots: {', '.join(report['plots']) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
