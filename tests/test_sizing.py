"""`mola.sizing` counts, from the shapes `describe_base_model` records, exactly the trainable
parameters the built adapters have."""

import pytest

from mola import MolaConfig, get_mola_model, tiny_model
from mola.lora import get_lora_model
from mola.models import describe_base_model
from mola.sizing import adapter_parameter_count, lora_rank_of_size, matches_target
from mola.tiny import TINY_ARCHITECTURES


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_counts_from_described_shapes_are_the_built_adapters(architecture):
    described = describe_base_model(f"tiny-{architecture}")
    shapes, targets = described["module_shapes"], described["target_modules"]
    experts = [1, 2, 3, 4][: described["num_layers"]]
    config = MolaConfig(experts=experts, top_k=1, rank=3, target_modules=targets)
    assert adapter_parameter_count(shapes, targets, 3, experts) == trainable(get_mola_model(tiny_model(architecture), config))
    assert adapter_parameter_count(shapes, targets, 5) == trainable(get_lora_model(tiny_model(architecture), 5, target_modules=targets))


def test_dotted_targets_name_one_module_and_a_suffix_names_all_it_ends():
    shapes = describe_base_model("tiny-gpt2")["module_shapes"]
    only_attention = adapter_parameter_count(shapes, ["attn.c_proj"], 2)
    both = adapter_parameter_count(shapes, ["c_proj"], 2)
    assert only_attention == 4 * 2 * (64 + 64)
    assert both == only_attention + 4 * 2 * (256 + 64)
    assert trainable(get_lora_model(tiny_model("gpt2"), 2, target_modules=["attn.c_proj"])) == only_attention
    assert matches_target("self_attn.q_proj", "q_proj") and not matches_target("self_attn.q_proj", "_proj")


def test_experts_must_cover_every_layer():
    shapes = describe_base_model("tiny-llama")["module_shapes"]
    with pytest.raises(ValueError, match="experts has 3 entries for 4 layers"):
        adapter_parameter_count(shapes, ["q_proj"], 8, [2, 2, 2])


def test_the_lora_rank_of_equal_size_is_the_closest_whole_rank():
    # Two layers of one 10 -> 6 module: a rank-1 LoRA has 2 * (10 + 6) = 32 parameters.
    shapes = [{"q_proj": (10, 6)}, {"q_proj": (10, 6)}]
    assert adapter_parameter_count(shapes, ["q_proj"], 1) == 32
    mola = adapter_parameter_count(shapes, ["q_proj"], 2, [2, 4])  # (2 + 4) experts * 2 * 16 + router (2 + 4) * 10 = 252
    assert mola == 252 and lora_rank_of_size(shapes, ["q_proj"], mola) == 8  # 252 / 32 = 7.9
    assert lora_rank_of_size(shapes, ["q_proj"], 5) == 1  # never rank 0
    with pytest.raises(ValueError, match=r"no module of the model matches the targets \['k_proj'\]"):
        lora_rank_of_size(shapes, ["k_proj"], 100)
