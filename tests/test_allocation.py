import pytest

from mola.allocation import describe_allocation, expand_allocation, expand_top_k, group_sizes


@pytest.mark.parametrize(
    "spec, layers, expected",
    [
        ("2468", 8, [2, 2, 4, 4, 6, 6, 8, 8]),
        ("8642", 4, [8, 6, 4, 2]),
        ("2468", 30, [2] * 8 + [4] * 8 + [6] * 7 + [8] * 7),
        ("5", 3, [5, 5, 5]),
        ("2,4,6,8", 8, [2, 2, 4, 4, 6, 6, 8, 8]),
        ("4, 12", 4, [4, 4, 12, 12]),
        ("1,2,3,4", 4, [1, 2, 3, 4]),
        ([3, 1, 2], 3, [3, 1, 2]),
        ((2, 2), 2, [2, 2]),
        ([2.0, 3.0], 2, [2, 3]),
        ({"preset": "rectangle", "average": 5}, 4, [5, 5, 5, 5]),
    ],
)
def test_expand_allocation(spec, layers, expected):
    assert expand_allocation(spec, layers) == expected


@pytest.mark.parametrize("preset", ["triangle", "inverted_triangle", "hourglass", "rectangle"])
@pytest.mark.parametrize("layers, average", [(30, 5), (8, 4), (22, 5), (7, 2.5)])
def test_presets_keep_the_rectangle_budget(preset, layers, average):
    counts = expand_allocation({"preset": preset, "average": average}, layers)
    assert len(counts) == layers
    assert sum(counts) == round(average * layers)
    assert min(counts) >= 1
    assert counts == expand_allocation(f"{preset}:{average}", layers)


def test_preset_shapes():
    up = expand_allocation({"preset": "inverted_triangle", "average": 5}, 30)
    down = expand_allocation({"preset": "triangle", "average": 5}, 30)
    hour = expand_allocation({"preset": "hourglass", "average": 5}, 30)
    assert up == sorted(up) and up[0] < up[-1]
    assert down == sorted(down, reverse=True) and down[0] > down[-1]
    assert hour[0] > hour[15] < hour[-1]


@pytest.mark.parametrize("preset", ["triangle", "inverted_triangle", "hourglass", "rectangle"])
@pytest.mark.parametrize("layers", [1, 4, 30, 80])
def test_presets_stay_within_the_limit_or_refuse(preset, layers):
    for average in (100, 150, 200, 256):
        try:
            counts = expand_allocation(f"{preset}:{average}", layers)
        except ValueError as error:
            assert "more than the limit of 256" in str(error)
        else:
            assert max(counts) <= 256


def test_group_sizes_cover_all_layers():
    assert group_sizes(30, 4) == [8, 8, 7, 7]
    assert sum(group_sizes(22, 4)) == 22


@pytest.mark.parametrize(
    "spec, layers, message",
    [
        ([2, 2, 2], 4, "3 entries but the model has 4 layers"),
        ([2, 0, 2, 2], 4, "layer 1 has 0"),
        ([2, -3, 2, 2], 4, "layer 1 has -3"),
        ([2, 2.5, 2, 2], 4, "layer 1 has 2.5"),
        ([2, "x", 2, 2], 4, "layer 1 has 'x'"),
        ([2, 2, 2, 10_000], 4, "layer 3 has 10000"),
        ("2408", 8, "group 2 has 0"),
        ("2,4,0,8", 8, "entry 2 has 0"),
        (b"2468", 4, "must be a list"),
        ("24682468", 4, "8 groups but the model has only 4 layers"),
        ("2,a,4", 3, "entry 1 is 'a'"),
        ("2,-1,4", 3, "entry 1 has -1"),
        ("", 4, "empty"),
        ("2, 4, 6,", 4, "entry 3 is empty"),
        # A whole-string regex backtracked exponentially on this (minutes of CPU per request).
        ("1  ," * 40 + ",", 4, "entry 40 is empty"),
        ("rectangle:nan", 4, "average must be a number >= 1, got nan"),
        ("rectangle:inf", 4, "average must be a number >= 1, got inf"),
        ("pyramid:5", 4, "unknown allocation preset 'pyramid'"),
        ("triangle", 4, "needs an average"),
        ({"preset": "triangle", "average": 0}, 4, "average must be a number >= 1"),
        ({"preset": "triangle"}, 4, "needs 'preset' and 'average'"),
        ({"shape": "triangle"}, 4, "needs 'preset'"),
        (3.5, 4, "must be a list"),
        ([True, 2], 2, "layer 0 has True"),
        # Presets put up to 5/3 of the average in their largest layer: each count is checked.
        ("hourglass:200", 4, "'hourglass:200' on 4 layers: layer 0 has 266, more than the limit of 256"),
        ("inverted_triangle:256", 30, "'inverted_triangle:256' on 30 layers: layer 29 has 420, more than the limit of 256"),
        ({"preset": "triangle", "average": 200}, 8, "'triangle:200' on 8 layers: layer 0 has"),
    ],
)
def test_bad_allocations_raise_clear_errors(spec, layers, message):
    with pytest.raises(ValueError) as error:
        expand_allocation(spec, layers)
    assert message in str(error.value)


def test_top_k_is_clamped_to_the_layer_experts():
    assert expand_top_k(2, [1, 2, 4]) == [1, 2, 2]
    assert expand_top_k([1, 3, 8], [1, 2, 4]) == [1, 2, 4]
    with pytest.raises(ValueError, match="top_k has 2 entries"):
        expand_top_k([1, 2], [1, 2, 4])
    with pytest.raises(ValueError, match="layer 0 has 0"):
        expand_top_k(0, [1, 2])


def test_describe_allocation():
    assert describe_allocation([2, 2, 4, 8]) == "2x2 4x1 8x1 (total 16)"
