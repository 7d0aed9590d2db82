"""Injection into Hugging Face models, the aux loss over a model, save/load, generation."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mola import MolaConfig, MolaLinear, get_mola_model, load_mola_model, read_adapter_config, tiny_model
from mola.architectures import find_decoder_layers
from mola.model import CACHE_FIELD
from tests.oracle import loop_aux_loss, loop_forward

ARCHITECTURES = ["llama", "mistral", "qwen2", "gpt2"]


def randomise_b(model):
    torch.manual_seed(1)
    for _, module in model.mola_modules():
        nn.init.normal_(module.lora_B, std=0.3)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_injection_follows_the_allocation_and_keeps_init_equal_to_base(arch):
    base = tiny_model(arch).eval()
    x = torch.randint(0, 256, (2, 12))
    reference = base(x).logits
    model = get_mola_model(base, MolaConfig(experts="1234", top_k=2)).eval()
    torch.testing.assert_close(model(input_ids=x).logits, reference, rtol=0, atol=0)
    modules = model.mola_modules()
    expected_per_layer = {"gpt2": 4}.get(arch, 7)
    assert len(modules) == 4 * expected_per_layer
    _, layers = find_decoder_layers(base)
    for name, module in modules:
        assert module.num_experts == module.layer_index + 1
        assert module.top_k == min(2, module.num_experts)
        assert layers[module.layer_index] .get_submodule(name.split(f".{module.layer_index}.", 1)[1]) is module
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n or "router" in n) for n in trainable)


def test_gpt2_conv1d_is_adapted_with_transposed_weights():
    base = tiny_model("gpt2").eval()
    model = get_mola_model(base, MolaConfig(experts=[2, 2, 2, 2], top_k=1, dropout=0.0)).eval()
    randomise_b(model)
    name, layer = model.mola_modules()[0]
    assert name.endswith("attn.c_attn") and (layer.in_features, layer.out_features) == (64, 192)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), loop_forward(layer, x)[0])


def test_model_aux_loss_pools_the_modules_of_each_layer():
    base = tiny_model("llama")
    config = MolaConfig(experts="2468", top_k=2, dropout=0.0, aux_loss_coef=0.01)
    model = get_mola_model(base, config).eval()
    x = torch.randint(0, 256, (2, 9))
    captured: dict[int, list] = {}

    def capture(module, inputs, output):
        _, probs, mask = loop_forward(module, inputs[0])
        captured.setdefault(module.layer_index, []).append((probs, mask))

    hooks = [m.register_forward_hook(capture) for _, m in model.mola_modules()]
    out = model(input_ids=x, labels=x)
    for h in hooks:
        h.remove()
    expected = sum(
        loop_aux_loss([p for p, _ in items], [m for _, m in items], model.top_k_per_layer[j])
        for j, items in captured.items()
    )
    torch.testing.assert_close(out.aux_loss, expected)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.01 * out.aux_loss)


@pytest.mark.parametrize("by", ["input_ids", "inputs_embeds"])
def test_aux_loss_leaves_padding_out(by):
    # Right padding changes no real token's routing, so it must not change the balance loss,
    # whether the tokens come as ids or as embeddings.
    model = get_mola_model(tiny_model("llama"), MolaConfig(experts="2468", top_k=2, dropout=0.0)).eval()
    x = torch.randint(0, 256, (1, 10))
    padded = torch.cat([x, torch.full((1, 5), 259)], 1)
    mask = torch.cat([torch.ones_like(x), torch.zeros(1, 5, dtype=torch.long)], 1)
    embed = model.get_input_embeddings()
    inputs = (lambda ids: {"input_ids": ids}) if by == "input_ids" else (lambda ids: {"inputs_embeds": embed(ids)})
    with torch.no_grad():
        alone = model(**inputs(x)).aux_loss
        torch.testing.assert_close(model(**inputs(padded), attention_mask=mask).aux_loss, alone)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_and_load_give_identical_logits(tmp_path, arch):
    model = get_mola_model(tiny_model(arch), MolaConfig(experts="1234" if arch != "gpt2" else "12", top_k=[1, 2, 2, 3])).eval()
    randomise_b(model)
    x = torch.randint(0, 256, (2, 10))
    logits = model(input_ids=x).logits
    model.save_pretrained(tmp_path)
    description = json.loads((tmp_path / "adapter_config.json").read_text())
    assert description["experts_per_layer"] == model.experts_per_layer
    assert description["top_k_per_layer"] == model.top_k_per_layer
    assert description["base_model_name_or_path"] == f"tiny-{arch}"
    assert description["rank"] == 8 and description["alpha"] == 16.0
    assert description["mola_version"]
    assert read_adapter_config(tmp_path) == description
    loaded = load_mola_model(tiny_model(arch), tmp_path)
    torch.testing.assert_close(loaded(input_ids=x).logits, logits, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_saved_weights_get_the_permissions_of_any_new_file(tmp_path):
    model = get_mola_model(tiny_model("llama"), MolaConfig(experts="2222"))
    previous = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path / "adapter")
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "adapter").iterdir()}
    assert modes == {"adapter_config.json": 0o644, "adapter_model.safetensors": 0o644}


def test_a_save_interrupted_between_its_two_files_still_loads(tmp_path, monkeypatch):
    x = torch.randint(0, 256, (2, 10))
    get_mola_model(tiny_model("llama"), MolaConfig(experts="2222")).save_pretrained(tmp_path)
    newer = get_mola_model(tiny_model("llama"), MolaConfig(experts="4444", top_k=1)).eval()
    randomise_b(newer)
    real_replace, calls = os.replace, []

    def dies_before_the_config(src, dst):
        calls.append(dst)
        if str(dst).endswith("adapter_config.json"):
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_before_the_config)
    with pytest.raises(OSError):
        newer.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["experts_per_layer"] == [2, 2, 2, 2]
    # The weights were replaced; their own description wins over the stale file.
    assert read_adapter_config(tmp_path)["experts_per_layer"] == [4, 4, 4, 4]
    loaded = load_mola_model(tiny_model("llama"), tmp_path)
    torch.testing.assert_close(loaded(input_ids=x).logits, newer(input_ids=x).logits, rtol=0, atol=0)
    # Once whole again, a hand edit of what does not shape the weights is respected.
    newer.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "base_model_name_or_path": "/models/llama"}))
    assert read_adapter_config(tmp_path)["base_model_name_or_path"] == "/models/llama"


def test_loading_onto_a_different_model_fails_clearly(tmp_path):
    model = get_mola_model(tiny_model("llama"), MolaConfig(experts="2222"))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has 4 entries but the model has 6 layers"):
        load_mola_model(tiny_model("llama", num_layers=6), tmp_path)
    with pytest.raises(ValueError, match="shape"):
        load_mola_model(tiny_model("llama", hidden_size=32), tmp_path)
    with pytest.raises(FileNotFoundError):
        load_mola_model(tiny_model("llama"), tmp_path / "missing")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unload_gives_back_the_base_model_as_it_was(tmp_path, arch):
    base = tiny_model(arch)
    base.lm_head.weight.requires_grad_(False)  # a flag of the caller's, to be kept as it was
    modules = dict(base.named_modules())
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    x = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        expected = base(input_ids=x).logits
    model = get_mola_model(base, MolaConfig(experts="2345" if arch != "gpt2" else "23"))
    randomise_b(model)
    model.save_pretrained(tmp_path)
    assert model.unload() is base
    assert dict(base.named_modules()) == modules  # the very modules, not copies
    assert {n for n, p in base.named_parameters() if p.requires_grad} == trainable
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=x).logits, expected, rtol=0, atol=0)
    # ... and it carries the next adapter like a freshly loaded model would.
    again = load_mola_model(base, tmp_path)
    fresh = load_mola_model(tiny_model(arch), tmp_path)
    torch.testing.assert_close(again(input_ids=x).logits, fresh(input_ids=x).logits, rtol=0, atol=0)


def test_weights_that_do_not_fit_leave_the_model_as_it_came(tmp_path):
    get_mola_model(tiny_model("llama"), MolaConfig(experts="2228")).save_pretrained(tmp_path)
    # Weights without their own description (as written by hand, or by another tool) beside a
    # description that does not match them: injection happens, then the weights are refused.
    weights = tmp_path / "adapter_model.safetensors"
    save_file(load_file(str(weights)), str(weights))
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "experts_per_layer": [2, 2, 2, 2]}))
    base = tiny_model("llama")
    modules = dict(base.named_modules())
    with pytest.raises(ValueError, match="saved shape"):
        load_mola_model(base, tmp_path)
    assert dict(base.named_modules()) == modules
    assert all(p.requires_grad for p in base.parameters())


def test_weights_of_other_shapes_are_refused_before_any_is_loaded(tmp_path):
    get_mola_model(tiny_model("llama"), MolaConfig(experts="2228")).save_pretrained(tmp_path)
    model = get_mola_model(tiny_model("llama"), MolaConfig(experts="2222"))  # only layer 3 differs
    before = {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}
    with pytest.raises(ValueError, match=r"layers\.3\..*saved shape \(8, 64\) != model \(2, 64\)"):
        model.load_adapter_weights(tmp_path)
    for name, tensor in model.adapter_state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_generation_uses_the_adapter_with_a_kv_cache():
    model = get_mola_model(tiny_model("llama"), MolaConfig(experts="2222", top_k=1)).eval()
    prompt = torch.randint(0, 256, (2, 5))
    before = model.generate(prompt, max_new_tokens=6, do_sample=False)
    randomise_b(model)
    after = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    no_cache = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert after.shape == (2, 11)
    assert torch.equal(after, no_cache)
    assert not torch.equal(before, after)



def test_forward_returns_the_base_models_cache_and_outputs():
    # The cache output is `cache` from transformers 5.24 on, `past_key_values` before.
    base = tiny_model("llama")
    model = get_mola_model(tiny_model("llama"), MolaConfig(experts="2222"))
    ids = torch.randint(0, 256, (2, 5))
    out = model(input_ids=ids, labels=ids, use_cache=True, output_hidden_states=True)
    reference = base(input_ids=ids, labels=ids, use_cache=True, output_hidden_states=True)
    assert out[CACHE_FIELD] is not None and out[CACHE_FIELD].get_seq_length() == 5
    assert len(out.hidden_states) == len(reference.hidden_states)
    torch.testing.assert_close(out.logits, reference.logits)
    torch.testing.assert_close(out.loss, out.lm_loss + model.mola_config.aux_loss_coef * out.aux_loss)
    assert out.loss is out[0] and out.logits is out[1]  # positional access as a Hugging Face output
    as_tuple = model(input_ids=ids, labels=ids, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], out.loss)
    torch.testing.assert_close(as_tuple[1], out.logits)


def test_one_config_serves_several_models(tmp_path):
    config = MolaConfig(experts="2")
    llama = get_mola_model(tiny_model("llama"), config)
    gpt2 = get_mola_model(tiny_model("gpt2"), config)
    assert config.base_model_name_or_path is None  # the caller's config is not changed
    assert llama.mola_config.base_model_name_or_path == "tiny-llama"
    gpt2.save_pretrained(tmp_path)
    assert read_adapter_config(tmp_path)["base_model_name_or_path"] == "tiny-gpt2"


def test_mixtral_defaults_adapt_the_attention():
    # Mixtral's MLP experts are fused parameters in transformers 5: no linear modules to adapt.
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(num_local_experts=2, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=300)
    model = get_mola_model(AutoModelForCausalLM.from_config(config), MolaConfig(experts="2"))
    names = {name.rsplit(".", 1)[-1] for name, _ in model.mola_modules()}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj"}
    ids = torch.randint(0, 300, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()

@pytest.mark.parametrize(
    "targets, error, message",
    [
        (["nonexistent_proj"], ValueError, "match no module"),
        (["self_attn"], TypeError, "LlamaAttention"),
        (["mlp.act_fn"], TypeError, "adapts only nn.Linear"),
    ],
)
def test_bad_targets_fail_clearly(targets, error, message):
    with pytest.raises(error, match=message):
        get_mola_model(tiny_model("llama"), MolaConfig(experts="2", target_modules=targets))


def test_target_subset_and_double_injection():
    model = get_mola_model(tiny_model("llama"), MolaConfig(experts="2", target_modules=["q_proj", "mlp.down_proj"]))
    names = {n.rsplit(".", 1)[-1] for n, _ in model.mola_modules()}
    assert names == {"q_proj", "down_proj"}
    with pytest.raises(ValueError, match="already carries MoLA layers"):
        get_mola_model(model.base_model, MolaConfig())
    assert isinstance(model.base_model.model.layers[0].self_attn.q_proj, MolaLinear)


@pytest.mark.parametrize("training", [False, True])
def test_injection_keeps_the_models_train_eval_mode(training):
    # load_base_model returns a model in eval mode: the MoLA layers put into it must not train
    # (dropout on, routing recorded) while the rest of the model is in eval mode.
    base = tiny_model("llama").train(training)
    model = get_mola_model(base, MolaConfig(experts="2222", top_k=2, dropout=0.5))
    assert model.training is training
    assert {m.training for m in model.modules()} == {training}
    if not training:
        randomise_b(model)
        x = torch.randint(0, 256, (2, 12))
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)
