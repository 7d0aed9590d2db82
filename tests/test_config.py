import pytest

from mola.config import MolaConfig


def test_defaults_follow_the_paper():
    config = MolaConfig()
    assert (config.rank, config.alpha, config.dropout, config.top_k) == (8, 16.0, 0.05, 2)
    assert config.aux_loss_coef == 0.001
    assert config.scaling == 2.0
    assert config.targets_for("llama") == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_resolve_against_a_model_depth():
    experts, top_k = MolaConfig(experts="8642", top_k=[1, 2, 3, 4]).resolve(4)
    assert experts == [8, 6, 4, 2]
    assert top_k == [1, 2, 3, 2]


def test_round_trip_through_a_dict():
    config = MolaConfig(experts=[1, 2], top_k=1, target_modules="q_proj, v_proj")
    assert config.target_modules == ["q_proj", "v_proj"]
    assert MolaConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank must be an integer"),
        ({"rank": 2.5}, "rank must be an integer"),
        ({"alpha": -1}, "alpha must be a positive finite number"),
        ({"alpha": float("nan")}, "alpha must be a positive finite number, got nan"),
        ({"alpha": float("inf")}, "alpha must be a positive finite number, got inf"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"aux_loss_coef": -0.1}, "aux_loss_coef must be a finite number >= 0"),
        ({"aux_loss_coef": float("nan")}, "aux_loss_coef must be a finite number >= 0, got nan"),
        ({"aux_loss_coef": float("inf")}, "aux_loss_coef must be a finite number >= 0, got inf"),
        ({"target_modules": []}, "target_modules must be a non-empty list"),
        ({"experts": "2x4"}, "allocation entry 0 is '2x4'"),
        ({"experts": [2, 0]}, "layer 1 has 0"),
        ({"top_k": 0}, "top_k: layer 0 has 0"),
        ({"top_k": 2.5}, "top_k: layer 0 has 2.5"),
        ({"experts": "2048"}, "allocation: group 1 has 0"),
    ],
)
def test_invalid_options_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MolaConfig(**kwargs)


def test_preset_limits_are_checked_against_the_real_depth():
    # The largest layer of a ramp grows with the depth: hourglass:180 fits 4 layers (240 at the
    # ends) but not 64, so the config waits for the model's depth to check it.
    assert MolaConfig(experts="hourglass:180").resolve(4)[0] == [240, 120, 120, 240]
    with pytest.raises(ValueError, match="'hourglass:180' on 64 layers: layer 0 has 296, more than the limit of 256"):
        MolaConfig(experts="hourglass:180").resolve(64)
    with pytest.raises(ValueError, match="'hourglass:200' on 4 layers: layer 0 has 266"):
        MolaConfig(experts={"preset": "hourglass", "average": 200}).resolve(4)
    with pytest.raises(ValueError, match="preset .rectangle.: average 300.0 exceeds 256"):
        MolaConfig(experts="rectangle:300")


def test_string_allocations_for_deep_models():
    # One digit or entry per layer of an 80-layer model: no nominal depth may cap the groups.
    for spec in ("2" * 40 + "4" * 40, ",".join(["2"] * 40 + ["12"] * 40)):
        experts, _ = MolaConfig(experts=spec).resolve(80)
        assert experts[0] == 2 and experts[-1] in (4, 12) and len(experts) == 80
    assert MolaConfig(top_k=2.0).resolve(4)[1] == [2, 2, 2, 2]


def test_unknown_architecture_needs_explicit_targets():
    with pytest.raises(ValueError, match="no default target modules for model type 'bert'"):
        MolaConfig().targets_for("bert")
    with pytest.raises(ValueError, match="unknown MolaConfig fields: colour"):
        MolaConfig.from_dict({"colour": "red"})


def test_numpy_numbers_are_numbers():
    # Allocations computed with numpy (np.linspace(...).round().astype(int)) were refused with
    # "layer 0 has np.int64(2), expected a whole number"; the resolved counts are plain ints,
    # which the adapter's JSON description needs.
    np = pytest.importorskip("numpy")
    config = MolaConfig(
        experts=list(np.array([2, 4, 6, 8])), top_k=np.int64(2), rank=np.int64(4), alpha=np.int64(8), dropout=np.float32(0.0)
    )
    experts, top_k = config.resolve(4)
    assert experts == [2, 4, 6, 8] and top_k == [2, 2, 2, 2]
    assert all(type(n) is int for n in experts + top_k) and type(config.rank) is int
    assert MolaConfig(experts={"preset": "triangle", "average": np.int64(3)}).resolve(4)[0] == [4, 3, 3, 2]
    with pytest.raises(ValueError, match="expected a whole number"):
        MolaConfig(experts=[np.float64(2.5)] * 4)
