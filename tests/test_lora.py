"""The peft LoRA baseline: MoLA with one expert is LoRA, matched ranks match MoLA's size, LoRA trains."""

from __future__ import annotations

import json

import pytest
import torch

from mola.config import MolaConfig
from mola.lora import get_lora_model, lora_parameter_count, matched_alpha_pattern, matched_rank_pattern, mola_parameter_count, parameter_counts
from mola.model import get_mola_model
from mola.tiny import tiny_model

ARCHITECTURES = ["llama", "qwen2", "gpt2"]


def _batch(vocab_size: int, batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_one_expert_top1_equals_peft_lora(architecture):
    """With N=1 and top-1 the gate is exactly 1, so MoLA is LoRA with the same A, B and scaling."""
    config = MolaConfig(experts="1", top_k=1, rank=8, alpha=16, dropout=0.0)
    mola = get_mola_model(tiny_model(architecture, seed=0), config).eval()
    lora = get_lora_model(tiny_model(architecture, seed=0), rank=8, alpha=16, dropout=0.0).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, layer in mola.mola_modules():
            # Random B, so the adapters do change the output (B = 0 would make the test vacuous).
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=generator))
            target = lora.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.lora_A[0])  # (r, in)
            target.lora_B["default"].weight.copy_(layer.lora_B[0])  # (out, r)
            assert target.scaling["default"] == layer.scaling
    input_ids = _batch(mola.config.vocab_size)
    with torch.no_grad():
        mola_logits = mola(input_ids=input_ids).logits
        lora_logits = lora(input_ids=input_ids).logits
        with lora.disable_adapter():
            base_logits = lora(input_ids=input_ids).logits
    assert (mola_logits - base_logits).abs().max() > 1e-3
    torch.testing.assert_close(mola_logits, lora_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("experts", ["8642", "2468", "1", {"preset": "hourglass", "average": 3}])
def test_matched_rank_pattern_equal_parameters(architecture, experts):
    config = MolaConfig(experts=experts, top_k=1, rank=8)
    counts = parameter_counts(tiny_model(architecture), config)
    assert abs(counts["relative_difference"]) < 0.01
    for module in counts["modules"]:  # each module within one rank's worth of parameters
        assert abs(module.lora - module.mola) <= module.in_features + module.out_features
    for layer in counts["layers"].values():  # and each layer within 1%
        assert abs(layer["lora"] - layer["mola"]) < 0.01 * layer["mola"]

    # The counts from shapes are the models' real trainable parameters, and peft applied every
    # rank of the pattern to the module it names (full names, matched exactly).
    base = tiny_model(architecture)
    ranks = matched_rank_pattern(base, config)
    lora = get_lora_model(
        base, rank=8, alpha=16, rank_pattern=ranks, alpha_pattern=matched_alpha_pattern(ranks, config.scaling)
    )
    for name, rank in ranks.items():
        module = lora.base_model.model.get_submodule(name)
        assert module.lora_A["default"].weight.shape[0] == rank
        assert module.scaling["default"] == pytest.approx(config.scaling)
    mola_trainable, _ = get_mola_model(tiny_model(architecture), config).trainable_parameters()
    lora_trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert (mola_trainable, lora_trainable) == (counts["mola"], counts["lora"])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_parameter_counts_before_building_are_the_built_adapters(architecture):
    config = MolaConfig(experts="2468", top_k=2, rank=4)
    assert mola_parameter_count(tiny_model(architecture), config) == get_mola_model(tiny_model(architecture), config).trainable_parameters()[0]
    lora = get_lora_model(tiny_model(architecture), rank=6, target_modules=None)
    assert lora_parameter_count(tiny_model(architecture), rank=6) == sum(p.numel() for p in lora.parameters() if p.requires_grad)


def test_lora_targets_only_decoder_modules():
    """Full names keep peft's suffix matching from catching modules outside the decoder stack."""
    lora = get_lora_model(tiny_model("gpt2"), target_modules=["c_proj"])
    adapted = [n for n, m in lora.named_modules() if hasattr(m, "lora_A") and n.endswith("c_proj")]
    assert len(adapted) == 2 * 4  # attn.c_proj and mlp.c_proj in each of the 4 layers


def test_unknown_target_raises():
    with pytest.raises(ValueError, match="no_such_proj"):
        get_lora_model(tiny_model("llama"), target_modules=["no_such_proj"])


def test_lora_model_trains():
    torch.manual_seed(0)
    model = get_lora_model(tiny_model("llama"), rank=8, alpha=16, dropout=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    input_ids = _batch(model.config.vocab_size, batch=4, length=16)
    losses = []
    for _ in range(6):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_a_saved_lora_adapter_names_the_base_model_it_was_loaded_by(tmp_path):
    """peft would record nothing for a model built from a config, and the cache folder for one
    read from disk: the adapter names its base as a MoLA adapter does, by the name loaded."""
    from mola.models import load_base_model
    from mola.train import save_adapter

    base, _ = load_base_model("tiny-qwen2")
    save_adapter(get_lora_model(base, rank=4), tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-qwen2"
