"""The paper's three claims, tested on the sweep's runs with uncertainty.

Accuracy differences are paired: every configuration is scored on the same questions with the
same seeds, so "A beats B" is judged on per-question correctness, with a 95% interval from a
hierarchical bootstrap that resamples seeds and then questions (seed-to-seed and test-set
variation both count). A claim is "supported" when the whole interval is above zero,
"contradicted" when it is below, and "not resolved" otherwise: at 200 questions a difference of a
few points cannot be told from noise, and the report says so rather than ranking by the means.

The redundancy claim (lower layers' experts are more alike) is tested on MoLA-□'s per-layer mean
pairwise distance: Spearman's rank correlation between layer index and distance, with a
permutation p-value, and the ratio of the top quarter's mean distance to the bottom quarter's.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# (better, worse, what the paper says)
ALLOCATION_CLAIMS = [
    ("mola-2468", "mola-5555", "▽ beats □"),
    ("mola-5555", "mola-8642", "□ beats △"),
    ("mola-2468", "mola-8642", "▽ beats △"),
]
MOLA = ["mola-2468", "mola-5555", "mola-8642", "mola-8228"]
LORA = ["lora-r8", "lora-matched"]
RECTANGLE = "mola-5555"
DRAWS = 4000


def per_question(records: Sequence[dict[str, Any]], is_correct: Callable[[dict[str, Any]], list[bool]]) -> dict[int, list[int]]:
    """{seed: [0/1 per question]} for one configuration."""
    return {r["seed"]: [int(c) for c in is_correct(r)] for r in records}


def paired_difference(a: dict[int, list[int]], b: dict[int, list[int]], seed: int = 0, draws: int = DRAWS) -> dict[str, Any] | None:
    """Accuracy of a minus accuracy of b on the seeds both have (points of %), with a 95%
    hierarchical-bootstrap interval: resample seeds, then questions, keeping the pairing."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = np.array([a[s] for s in seeds]) - np.array([b[s] for s in seeds])  # (S, Q) in {-1, 0, 1}
    rng = np.random.default_rng(seed)
    drawn_seeds = rng.integers(len(seeds), size=(draws, len(seeds)))  # (D, S)
    drawn_questions = rng.integers(diffs.shape[1], size=(draws, 1, diffs.shape[1]))  # (D, 1, Q)
    samples = np.take_along_axis(diffs[drawn_seeds], drawn_questions, axis=2).mean(axis=(1, 2))  # (D,)
    low, high = np.quantile(samples, [0.025, 0.975])
    return {
        "difference": 100 * float(diffs.mean()), "ci95": [100 * float(low), 100 * float(high)],
        "seeds": seeds, "questions": int(diffs.shape[1]), "verdict": verdict(float(low), float(high)),
    }


def verdict(low: float, high: float) -> str:
    if low > 0:
        return "supported"
    if high < 0:
        return "contradicted"
    return "not resolved"


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):  # ties share their mean rank
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    rx, ry = _ranks(x), _ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    norm = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / norm if norm else 0.0


def redundancy_trend(layers: Sequence[int], distances: Sequence[float], seed: int = 0, draws: int = DRAWS) -> dict[str, Any] | None:
    """Does the distance between experts grow with depth? Spearman rho (layer, distance), the
    one-sided permutation p-value of a rho at least as large by chance (``p_value``; the paper's
    direction), and the top-quarter / bottom-quarter mean distances. Contradicted when distance
    falls with depth at p < 0.05."""
    if len(layers) < 4:
        return None
    rho = spearman(layers, distances)
    rng = random.Random(seed)
    shuffled = list(distances)
    at_least = at_most = 0
    for _ in range(draws):
        rng.shuffle(shuffled)
        r = spearman(layers, shuffled)
        at_least += r >= rho
        at_most += r <= rho
    p_rising, p_falling = (at_least + 1) / (draws + 1), (at_most + 1) / (draws + 1)
    quarter = max(1, len(layers) // 4)
    by_layer = [d for _, d in sorted(zip(layers, distances))]
    bottom, top = statistics.fmean(by_layer[:quarter]), statistics.fmean(by_layer[-quarter:])
    return {
        "spearman_rho": rho, "p_value": p_rising, "bottom_quarter_mean": bottom, "top_quarter_mean": top,
        "top_over_bottom": top / bottom if bottom else None,
        "verdict": "supported" if p_rising < 0.05 else ("contradicted" if p_falling < 0.05 else "not resolved"),
    }


def check_claims(configs: dict[str, list[dict[str, Any]]], scorers: dict[str, Callable[[dict[str, Any]], list[bool]]], redundancy: dict[str, Any] | None) -> dict[str, Any]:
    """Every comparison of the three claims for one task. ``scorers``: metric name -> function
    giving a run's per-question correctness. ``redundancy``: report.py's per-layer numbers."""
    comparisons: list[dict[str, Any]] = []

    def compare(better: str, worse: str, claim: str, group: str) -> None:
        if better not in configs or worse not in configs:
            return
        for metric, is_correct in scorers.items():
            result = paired_difference(per_question(configs[better], is_correct), per_question(configs[worse], is_correct))
            if result is not None:
                comparisons.append({"group": group, "claim": claim, "better": better, "worse": worse, "metric": metric, **result})

    for better, worse, claim in ALLOCATION_CLAIMS:
        compare(better, worse, claim, "allocation")
    for mola in MOLA:
        for lora in LORA:
            compare(mola, lora, f"{mola} beats {lora}", "mola-vs-lora")
    trend = relative = None
    if redundancy and RECTANGLE in redundancy:
        numbers = redundancy[RECTANGLE]
        trend = redundancy_trend(numbers["layers"], numbers["mean"])
        if "relative" in numbers:
            relative = redundancy_trend(numbers["relative"]["layers"], numbers["relative"]["mean"])
    return {"comparisons": comparisons, "redundancy_trend": trend, "relative_redundancy_trend": relative}
