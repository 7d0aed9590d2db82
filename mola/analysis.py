"""What did the experts learn? Redundancy between experts and routing statistics.

* Redundancy (the paper's Figure 3): for each MoLA module, the mean pairwise Frobenius norm
  ``||dW_i - dW_j||_F`` over expert pairs, with ``dW_e = s * B_e A_e``. Small values mean the
  experts of that module learned similar updates. Also the experts' mean norm ``||dW_e||_F`` and
  the ratio of the two (``relative_distance``): distances grow with the size of the updates, so
  a layer whose experts simply moved less looks "more redundant"; the ratio separates the two.
* Routing: per module and expert, the share of tokens that selected it and its mean routing
  weight, gathered over a dataset.
* `expert_report` puts the two side by side per layer and module, with how unevenly the
  experts are used (what the service stores for a finished job).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from mola.evaluate import eval_mode, maybe_autocast
from mola.layer import MolaLinear
from mola.model import MolaModel


def pairwise_expert_distances(module: MolaLinear) -> Tensor:
    """(N, N) Frobenius distances between the experts' updates dW_e = s * B_e A_e.

    Uses ||B_i A_i - B_j A_j||^2 = g_ii + g_jj - 2 g_ij with g_ij = <B_i A_i, B_j A_j>
    = sum((B_i^T B_j) * (A_i A_j^T)), so no (out, in) matrix is ever formed: the cost is
    O(N^2 r^2 (in + out)) instead of O(N out in).
    """
    a = module.lora_A.detach().double()  # (N, r, in)
    b = module.lora_B.detach().double()  # (N, out, r)
    gram_b = torch.einsum("ior,jos->ijrs", b, b)  # (N, N, r, r): B_i^T B_j
    gram_a = torch.einsum("irk,jsk->ijrs", a, a)  # (N, N, r, r): A_i A_j^T
    inner = (gram_b * gram_a).sum((-2, -1)) * module.scaling**2  # (N, N)
    diag = inner.diagonal()
    squared = (diag.unsqueeze(0) + diag.unsqueeze(1) - 2 * inner).clamp_min(0)
    return squared.sqrt().float()


def expert_norms(module: MolaLinear) -> Tensor:
    """(N,) Frobenius norms ||s * B_e A_e||_F, from r x r Gram matrices as above."""
    a = module.lora_A.detach().double()  # (N, r, in)
    b = module.lora_B.detach().double()  # (N, out, r)
    gram_b = torch.einsum("eor,eos->ers", b, b)  # (N, r, r): B_e^T B_e
    gram_a = torch.einsum("erk,esk->ers", a, a)  # (N, r, r): A_e A_e^T
    return ((gram_b * gram_a).sum((-2, -1)).clamp_min(0).sqrt() * abs(module.scaling)).float()


def _require_mola_model(model: Any, what: str) -> None:
    """A clear TypeError for a plain or peft LoRA model, which would otherwise fail with an
    AttributeError deep inside (`mola_modules`, `recorder`)."""
    if not isinstance(model, MolaModel):
        raise TypeError(f"{what}: {type(model).__name__} is not a MoLA model: use get_mola_model or load_mola_model")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def expert_redundancy(model: Any) -> dict[str, Any]:
    """Mean pairwise expert distance, mean expert norm and their ratio, per module and per
    decoder layer (layer values are means over the layer's modules).

    Returns ``{"modules": {name: {"layer", "num_experts", "mean_distance", "mean_norm",
    "relative_distance"}}, "layers": [{the same, by layer}]}``. Modules with a single expert have
    no pairs and report ``None`` distances; the relative distance is ``None`` where the experts
    are all zero (B at init).
    """
    _require_mola_model(model, "expert_redundancy")
    modules: dict[str, dict[str, Any]] = {}
    per_layer: dict[int, dict[str, list[float]]] = {}
    experts_in_layer: dict[int, int] = {}
    for name, module in model.mola_modules():
        n = module.num_experts
        experts_in_layer[module.layer_index] = n
        row: dict[str, Any] = {"layer": module.layer_index, "num_experts": n, "mean_norm": float(expert_norms(module).mean())}
        row["mean_distance"] = row["relative_distance"] = None
        if n > 1:
            distances = pairwise_expert_distances(module)
            pairs = [distances[i, j] for i, j in itertools.combinations(range(n), 2)]
            row["mean_distance"] = float(torch.stack(pairs).mean())
            if row["mean_norm"] > 0:
                row["relative_distance"] = row["mean_distance"] / row["mean_norm"]
        modules[name] = row
        sums = per_layer.setdefault(module.layer_index, {"mean_distance": [], "mean_norm": [], "relative_distance": []})
        for key in sums:
            if row[key] is not None:
                sums[key].append(row[key])
    layers = [{"layer": j, "num_experts": experts_in_layer[j], **{key: _mean(values) for key, values in per_layer[j].items()}} for j in sorted(experts_in_layer)]
    return {"modules": modules, "layers": layers}


@torch.no_grad()
def routing_statistics(
    model: Any, batches: Iterable[dict[str, Tensor]], autocast_dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Per-module and per-layer routing statistics over ``batches`` of
    ``{"input_ids", "attention_mask"}`` tensors (padding excluded; a batch without an
    attention mask counts every token).

    Returns ``{"modules": {name: row}, "layers": [row, by layer]}``. For each expert, a row has
    ``selection_share`` (fraction of tokens whose top-k includes it; sums to top_k),
    ``mean_weight`` (average routing weight it received over all tokens; sums to 1) and
    ``mean_prob`` (average router probability before top-k; sums to 1), with ``layer``,
    ``num_experts``, ``top_k`` and ``tokens`` (tokens routed). A layer's row pools the routing
    decisions of its modules, as the balance loss does: its values are the means of its modules'
    rows (every module of a layer routes the same tokens), ``tokens`` is the tokens routed by
    each of them and ``modules`` their number. ``autocast_dtype`` (e.g. ``torch.bfloat16``)
    routes under autocast, as a run trained with bf16 did.
    """
    _require_mola_model(model, "routing_statistics")
    device = next(model.parameters()).device
    totals: dict[MolaLinear, dict[str, Tensor]] = {}
    with eval_mode(model):  # afterwards each module's own mode, not the wrapper's for all
        for batch in batches:
            mask = batch.get("attention_mask")  # without one, every token counts
            mask = mask.to(device) if mask is not None else None
            model.recorder.start(mask.reshape(-1) if mask is not None else None)
            try:
                with maybe_autocast(device, autocast_dtype):
                    model.base_model(input_ids=batch["input_ids"].to(device), attention_mask=mask)
            finally:
                records = model.recorder.stop()
            for module, stats in records:
                acc = totals.setdefault(module, {k: torch.zeros_like(v) for k, v in vars(stats).items()})
                for key, value in vars(stats).items():
                    acc[key] += value
    names = {module: name for name, module in model.mola_modules()}
    modules: dict[str, dict[str, Any]] = {}
    layers: dict[int, dict[str, Tensor]] = {}
    layer_modules: dict[int, list[MolaLinear]] = {}
    for module, acc in totals.items():
        tokens = acc["tokens"].clamp_min(1)
        modules[names[module]] = {
            "layer": module.layer_index,
            "num_experts": module.num_experts,
            "top_k": module.top_k,
            "tokens": int(acc["tokens"]),
            "selection_share": (acc["dispatch"] / tokens).tolist(),
            "mean_weight": (acc["weights"] / tokens).tolist(),
            "mean_prob": (acc["probs"] / tokens).tolist(),
        }
        layer_modules.setdefault(module.layer_index, []).append(module)
        layer = layers.setdefault(module.layer_index, {k: torch.zeros_like(v) for k, v in acc.items()})
        for key, value in acc.items():
            layer[key] += value
    layer_rows = []
    for j, acc in sorted(layers.items()):
        tokens = acc["tokens"].clamp_min(1)  # summed over the layer's modules
        first = layer_modules[j][0]
        layer_rows.append(
            {
                "layer": j,
                "num_experts": first.num_experts,
                "top_k": first.top_k,
                "modules": len(layer_modules[j]),
                "tokens": int(totals[first]["tokens"]),
                "selection_share": (acc["dispatch"] / tokens).tolist(),
                "mean_weight": (acc["weights"] / tokens).tolist(),
                "mean_prob": (acc["probs"] / tokens).tolist(),
            }
        )
    return {"modules": modules, "layers": layer_rows}


REDUNDANCY_FIELDS = ("mean_distance", "mean_norm", "relative_distance")


def load_summary(row: dict[str, Any]) -> dict[str, float]:
    """How evenly a routing row (of `routing_statistics`) uses its experts.

    ``max_load`` / ``min_load``: the busiest and the idlest expert's selection share over the
    fair share top_k / num_experts (both 1 when perfectly balanced; a ``min_load`` near 0 is an
    expert the router has stopped using). ``balance_loss``: the Switch Transformer loss of
    these decisions, ``N * sum_e (share_e / K) * prob_e`` (1 when uniform), the quantity the
    training's ``aux_loss`` sums over layers.
    """
    n, k = row["num_experts"], row["top_k"]
    share, prob = row["selection_share"], row["mean_prob"]
    fair = k / n
    return {
        "max_load": max(share) / fair,
        "min_load": min(share) / fair,
        "balance_loss": n * sum(s / k * p for s, p in zip(share, prob)),
    }


def expert_report(
    model: Any, batches: Iterable[dict[str, Tensor]], autocast_dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Routing over ``batches`` (as `routing_statistics`) and the experts' redundancy (as
    `expert_redundancy`), merged per layer and per module, each row with its `load_summary`.

    Returns ``{"tokens": tokens routed per module, "layers": [row, by layer],
    "modules": {name: row}}``; a row has ``layer``, ``num_experts``, ``top_k``,
    ``selection_share``, ``mean_weight``, ``mean_prob`` (lists over the experts),
    ``max_load``, ``min_load``, ``balance_loss``, ``mean_distance``, ``mean_norm`` and
    ``relative_distance``. A layer's ``max_load`` and ``min_load`` are the extremes over its
    modules: each module has a router of its own, so expert e of one module has nothing to do
    with expert e of another, and pooled shares would hide a module whose router left an
    expert unused. Its ``balance_loss`` pools them, as training does. ``ValueError`` when
    ``batches`` holds no token.
    """
    routing = routing_statistics(model, batches, autocast_dtype)
    if not routing["layers"] or max(row["tokens"] for row in routing["layers"]) == 0:
        raise ValueError("expert_report: the batches hold no token to route")
    redundancy = expert_redundancy(model)

    def merged(route: dict[str, Any], redundant: dict[str, Any]) -> dict[str, Any]:
        return {**route, **load_summary(route), **{key: redundant[key] for key in REDUNDANCY_FIELDS}}

    modules = {name: merged(row, redundancy["modules"][name]) for name, row in routing["modules"].items()}
    layers = []
    redundant_layers = {row["layer"]: row for row in redundancy["layers"]}
    for route in routing["layers"]:
        row = merged(route, redundant_layers[route["layer"]])
        own = [m for m in modules.values() if m["layer"] == row["layer"]]
        row["max_load"] = max(m["max_load"] for m in own)
        row["min_load"] = min(m["min_load"] for m in own)
        layers.append(row)
    return {"tokens": routing["layers"][0]["tokens"], "layers": layers, "modules": modules}
