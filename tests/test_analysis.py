import itertools

import pytest
import torch
from torch import nn

from mola import MolaConfig, byte_tokenizer, get_mola_model, tiny_model
from mola.analysis import (
    expert_norms,
    expert_redundancy,
    expert_report,
    load_summary,
    pairwise_expert_distances,
    routing_statistics,
)
from mola.data import collate, load_training_data


def model_with_random_experts():
    torch.manual_seed(0)
    model = get_mola_model(tiny_model("llama"), MolaConfig(experts=[1, 2, 3, 4], top_k=2)).eval()
    for _, module in model.mola_modules():
        nn.init.normal_(module.lora_B, std=0.1)
    return model


def test_pairwise_distances_equal_the_dense_computation():
    model = model_with_random_experts()
    _, module = model.mola_modules()[-1]
    dense = module.delta_weights().double()  # (N, out, in)
    expected = torch.stack([torch.stack([(dense[i] - dense[j]).norm() for j in range(4)]) for i in range(4)])
    torch.testing.assert_close(pairwise_expert_distances(module).double(), expected, rtol=1e-5, atol=1e-6)


def test_redundancy_per_layer_and_identical_experts():
    model = model_with_random_experts()
    report = expert_redundancy(model)
    assert [row["num_experts"] for row in report["layers"]] == [1, 2, 3, 4]
    assert report["layers"][0]["mean_distance"] is None  # one expert: no pairs
    assert all(row["mean_distance"] > 0 for row in report["layers"][1:])
    name, module = model.mola_modules()[-1]
    with torch.no_grad():
        module.lora_A.copy_(module.lora_A[:1].expand_as(module.lora_A))
        module.lora_B.copy_(module.lora_B[:1].expand_as(module.lora_B))
    same = expert_redundancy(model)["modules"][name]
    assert same["mean_distance"] < 1e-6 and same["relative_distance"] < 1e-6 and same["mean_norm"] > 0
    pairs = list(itertools.combinations(range(4), 2))
    assert len(pairs) == 6


def two_texts() -> dict:
    """A padded batch of two texts of different lengths."""
    tokenizer = byte_tokenizer()
    data = load_training_data([{"text": "a short one"}, {"text": "and a somewhat longer text"}], tokenizer)
    return collate(data, tokenizer.pad_token_id)


def test_routing_statistics_count_real_tokens():
    model, batch = model_with_random_experts(), two_texts()
    stats = routing_statistics(model, [batch])
    real_tokens = int(batch["attention_mask"].sum())
    for name, row in stats["modules"].items():
        assert row["tokens"] == real_tokens
        assert abs(sum(row["selection_share"]) - row["top_k"]) < 1e-5  # each token picks top_k
        assert abs(sum(row["mean_weight"]) - 1) < 1e-5  # weights of a token sum to one
    assert len(stats["layers"]) == 4
    assert model.training is False


def test_routing_statistics_layer_rows_pool_their_modules_rows():
    model, batch = model_with_random_experts(), two_texts()
    stats = routing_statistics(model, [batch])
    real_tokens = int(batch["attention_mask"].sum())
    for row in stats["layers"]:
        rows = [r for r in stats["modules"].values() if r["layer"] == row["layer"]]
        assert set(row) == set(rows[0]) | {"modules"}  # every key a module row has, and the count
        assert row["modules"] == len(rows) == 7 and row["tokens"] == real_tokens
        assert (row["num_experts"], row["top_k"]) == (rows[0]["num_experts"], rows[0]["top_k"])
        for key in ("selection_share", "mean_weight", "mean_prob"):
            mean = torch.tensor([r[key] for r in rows]).mean(0)
            torch.testing.assert_close(torch.tensor(row[key]), mean)
        assert abs(sum(row["mean_prob"]) - 1) < 1e-5 and abs(sum(row["selection_share"]) - row["top_k"]) < 1e-5


def test_routing_statistics_without_an_attention_mask_count_every_token():
    model = model_with_random_experts()
    tokenizer = byte_tokenizer()
    batch = collate(load_training_data([{"text": "a short one"}, {"text": "and a longer one"}], tokenizer), tokenizer.pad_token_id)
    unpadded = {"input_ids": batch["input_ids"]}
    stats = routing_statistics(model, [unpadded])
    assert stats["layers"][0]["tokens"] == batch["input_ids"].numel()
    masked = routing_statistics(model, [{**unpadded, "attention_mask": torch.ones_like(batch["input_ids"])}])
    for row, same in zip(stats["layers"], masked["layers"]):
        assert row["tokens"] == same["tokens"]
        for key in ("selection_share", "mean_weight", "mean_prob"):
            assert row[key] == pytest.approx(same[key], rel=1e-5)


def test_routing_statistics_leave_every_module_in_its_mode():
    # A training model with a part in eval mode on purpose: afterwards each module is in its
    # own mode again, not the wrapper's (model.train(True) would turn that part's dropout on).
    model = model_with_random_experts().train()
    model.base_model.model.layers[0].eval()
    modes = {name: module.training for name, module in model.named_modules()}
    tokenizer = byte_tokenizer()
    batch = collate(load_training_data([{"text": "a short one"}], tokenizer), tokenizer.pad_token_id)
    routing_statistics(model, [batch])
    assert {name: module.training for name, module in model.named_modules()} == modes


def test_expert_norms_and_relative_distance():
    model = model_with_random_experts()
    name, module = model.mola_modules()[-1]
    dense = module.delta_weights().double()  # (N, out, in)
    torch.testing.assert_close(expert_norms(module).double(), dense.flatten(1).norm(dim=1), rtol=1e-5, atol=1e-7)
    before = expert_redundancy(model)["modules"][name]
    with torch.no_grad():
        module.lora_B.mul_(3.0)  # bigger updates, the same directions
    after = expert_redundancy(model)["modules"][name]
    assert after["mean_distance"] == pytest.approx(3 * before["mean_distance"], rel=1e-5)
    assert after["mean_norm"] == pytest.approx(3 * before["mean_norm"], rel=1e-5)
    assert after["relative_distance"] == pytest.approx(before["relative_distance"], rel=1e-5)
    layer = expert_redundancy(model)["layers"][module.layer_index]
    assert set(layer) == {"layer", "num_experts", "mean_distance", "mean_norm", "relative_distance"}
    with torch.no_grad():
        module.lora_B.zero_()  # B at init: no update, no ratio
    zero = expert_redundancy(model)["modules"][name]
    assert zero["mean_norm"] == 0 and zero["relative_distance"] is None


def test_a_model_without_mola_layers_is_a_clear_error():
    from mola.lora import get_lora_model

    tokenizer = byte_tokenizer()
    batch = collate(load_training_data([{"text": "a short one"}], tokenizer), tokenizer.pad_token_id)
    for model in (tiny_model("llama"), get_lora_model(tiny_model("llama"), rank=4, alpha=8, dropout=0.0)):
        name = type(model).__name__
        with pytest.raises(TypeError, match=f"expert_redundancy: {name} is not a MoLA model: use get_mola_model or load_mola_model"):
            expert_redundancy(model)
        with pytest.raises(TypeError, match=f"routing_statistics: {name} is not a MoLA model"):
            routing_statistics(model, [batch])


def test_expert_report_merges_routing_and_redundancy_per_layer_and_module():
    model, batch = model_with_random_experts(), two_texts()
    report = expert_report(model, [batch])
    routing, redundancy = routing_statistics(model, [batch]), expert_redundancy(model)
    assert report["tokens"] == int(batch["attention_mask"].sum())
    assert [row["layer"] for row in report["layers"]] == [0, 1, 2, 3]
    assert set(report["modules"]) == set(routing["modules"]) == set(redundancy["modules"])
    for name, row in report["modules"].items():
        route, redundant = routing["modules"][name], redundancy["modules"][name]
        assert row == {**route, **load_summary(route), **{k: redundant[k] for k in ("mean_distance", "mean_norm", "relative_distance")}}
    for row, route, redundant in zip(report["layers"], routing["layers"], redundancy["layers"]):
        own = [m for m in report["modules"].values() if m["layer"] == row["layer"]]
        # Loads: the extremes over the layer's modules (each has its own router); the rest pooled.
        pooled = {**route, **load_summary(route), **{k: redundant[k] for k in ("mean_distance", "mean_norm", "relative_distance")}}
        assert row == {**pooled, "max_load": max(m["max_load"] for m in own), "min_load": min(m["min_load"] for m in own)}
    assert report["layers"][3]["min_load"] < load_summary(routing["layers"][3])["min_load"]  # pooling would hide it


def test_expert_report_balance_loss_is_the_models_aux_loss():
    # The per-layer balance losses of one batch add up to the aux loss the model reports for it.
    model, batch = model_with_random_experts(), two_texts()
    report = expert_report(model, [batch])
    with torch.no_grad():
        aux = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).aux_loss
    assert sum(row["balance_loss"] for row in report["layers"]) == pytest.approx(float(aux), rel=1e-5)
    assert report["layers"][0]["balance_loss"] == pytest.approx(1.0)  # one expert: nothing to balance


def test_load_summary_of_balanced_and_collapsed_routing():
    balanced = {"num_experts": 4, "top_k": 2, "selection_share": [0.5] * 4, "mean_prob": [0.25] * 4}
    assert load_summary(balanced) == pytest.approx({"max_load": 1.0, "min_load": 1.0, "balance_loss": 1.0})
    # Two of four experts take every token: each gets twice its fair share, the others none.
    collapsed = {"num_experts": 4, "top_k": 2, "selection_share": [1.0, 1.0, 0.0, 0.0], "mean_prob": [0.5, 0.5, 0.0, 0.0]}
    assert load_summary(collapsed) == pytest.approx({"max_load": 2.0, "min_load": 0.0, "balance_loss": 2.0})


def test_expert_report_under_bf16_autocast_and_without_tokens():
    model, batch = model_with_random_experts(), two_texts()
    exact = expert_report(model, [batch])
    cast = expert_report(model, [batch], autocast_dtype=torch.bfloat16)
    assert cast["tokens"] == exact["tokens"]
    for row, same in zip(cast["layers"], exact["layers"]):
        assert row["mean_prob"] == pytest.approx(same["mean_prob"], abs=0.05)
    with pytest.raises(ValueError, match="no token to route"):
        expert_report(model, [])
    empty = {"input_ids": batch["input_ids"], "attention_mask": torch.zeros_like(batch["attention_mask"])}
    with pytest.raises(ValueError, match="no token to route"):
        expert_report(model, [empty])
