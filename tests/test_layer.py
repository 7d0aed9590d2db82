"""The vectorised MolaLinear against the per-expert loop oracle (tests/oracle.py)."""

import pytest
import torch
from torch import nn

from mola.layer import MolaLinear, RoutingRecorder
from mola.router import load_balancing_loss, routing_stats, top_k_gates
from tests.oracle import loop_aux_loss, loop_forward

CASES = [
    # (experts, top_k, dtype)
    (1, 1, torch.float32),
    (2, 1, torch.float32),
    (4, 2, torch.float32),
    (8, 2, torch.float32),
    (6, 6, torch.float32),
    (8, 3, torch.float64),
    (4, 2, torch.bfloat16),
]


def make_layer(experts, top_k, dtype, in_features=24, out_features=20, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features).to(dtype)
    base.requires_grad_(False)
    layer = MolaLinear(base, experts, top_k, rank=4, alpha=8, dropout=0.0)
    if dtype != torch.bfloat16:
        layer.to(dtype)
    nn.init.normal_(layer.lora_B, std=0.5)  # B = 0 would hide errors in the expert path
    return layer


def tolerances(dtype):
    return {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}[dtype]


# The same check on a GPU where there is one (CI has none: these are skipped there; the device
# machine runs them, see bench/README.md).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


def fast_step(layer, x, weights, forward=None):
    """Output, load-balancing loss and gradients (router, A, B, x) of one forward and backward
    of ``forward`` (the layer itself by default) with the loss (out * weights).sum() + aux."""
    recorder = RoutingRecorder()
    layer.recorder = recorder
    recorder.start(None)
    out = (forward if forward is not None else layer)(x)
    (records,) = [s for _, s in recorder.stop()]
    aux = load_balancing_loss([records], layer.top_k)
    ((out * weights).sum() + aux).backward()
    return out.detach(), aux.detach(), take_grads(layer, x)


def loop_step(layer, x, weights):
    out, probs, mask = loop_forward(layer, x)
    aux = loop_aux_loss([probs], [mask], layer.top_k)
    ((out * weights).sum() + aux).backward()
    return out.detach(), aux.detach(), take_grads(layer, x)


def take_grads(layer, x):
    params = (layer.router.weight, layer.lora_A, layer.lora_B, x)
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return grads


def assert_steps_match(fast, slow, rtol, atol):
    (fast_out, fast_aux, fast_grads), (slow_out, slow_aux, slow_grads) = fast, slow
    assert fast_out.dtype == slow_out.dtype
    torch.testing.assert_close(fast_out, slow_out, rtol=rtol, atol=atol)
    torch.testing.assert_close(fast_aux, slow_aux, rtol=1e-5, atol=1e-6)
    for name, a, b in zip(["router", "lora_A", "lora_B", "x"], fast_grads, slow_grads):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("experts, top_k, dtype", CASES)
def test_forward_and_gradients_match_the_loop(experts, top_k, dtype, device):
    layer = make_layer(experts, top_k, dtype).to(device)
    x = torch.randn(3, 5, 24, dtype=dtype).to(device).requires_grad_()
    weights = torch.randn(3, 5, 20, dtype=dtype).to(device)
    fast = fast_step(layer, x, weights)
    assert fast[0].dtype == dtype
    assert_steps_match(fast, loop_step(layer, x, weights), *tolerances(dtype))


def test_zero_b_at_init_gives_the_base_layer():
    base = nn.Linear(16, 12)
    layer = MolaLinear(base, num_experts=4, top_k=2, rank=4, alpha=8)
    x = torch.randn(7, 16)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    assert layer.lora_A.shape == (4, 4, 16) and layer.lora_B.shape == (4, 12, 4)
    assert layer.router.weight.shape == (4, 16) and layer.router.bias is None
    assert (layer.num_experts, layer.top_k, layer.rank, layer.scaling) == (4, 2, 4, 2.0)


def test_routing_weights_sum_to_one_and_respect_top_k():
    logits = torch.randn(50, 6)
    gates, probs, selected = top_k_gates(logits, 2)
    torch.testing.assert_close(gates.sum(-1), torch.ones(50))
    assert ((gates > 0).sum(-1) == 2).all()
    assert (selected.sum(-1) == 2).all()
    assert torch.equal(gates > 0, selected > 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(50))


def test_uniform_routing_has_unit_balance_loss():
    layer = make_layer(4, 2, torch.float32)
    nn.init.zeros_(layer.router.weight)  # equal logits: ties broken by index, probs uniform
    gates, probs, selected = layer.route(torch.randn(8, 24))
    stats = [routing_stats(gates, probs, selected, None)]
    # all slots go to experts 0 and 1: f = (.5, .5, 0, 0), P = .25 each -> N * sum f P = 1
    torch.testing.assert_close(load_balancing_loss(stats, 2), torch.tensor(1.0))


def test_token_mask_leaves_padding_out_of_the_statistics():
    layer = make_layer(4, 2, torch.float32)
    recorder = RoutingRecorder()
    layer.recorder = recorder
    x = torch.randn(2, 6, 24)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    recorder.start(mask.reshape(-1))
    layer(x)
    (masked,) = [s for _, s in recorder.stop()]
    recorder.start(None)
    layer(torch.cat([x[0, :4], x[1, :3]]))
    (packed,) = [s for _, s in recorder.stop()]
    for field in ("dispatch", "probs", "weights", "tokens"):
        torch.testing.assert_close(getattr(masked, field), getattr(packed, field))


def test_bf16_autocast_is_close_to_fp32():
    layer = make_layer(8, 2, torch.float32)
    x = torch.randn(4, 24)
    reference = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = layer(x)
    torch.testing.assert_close(auto.float(), reference, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_layer_matches_the_loop(device):
    """torch.compile with the default (Inductor) backend: one graph, the forward, the routing
    statistics and every gradient as the eager oracle's, in fp32 and under bf16 autocast."""
    layer = make_layer(8, 2, torch.float32).to(device)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(3, 5, 24, device=device, requires_grad=True)
    weights = torch.randn(3, 5, 20, device=device)
    assert_steps_match(fast_step(layer, x, weights, compiled), loop_step(layer, x, weights), 1e-5, 1e-5)
    with torch.autocast(device, dtype=torch.bfloat16):
        eager = fast_step(layer, x, weights)
        fused = fast_step(layer, x, weights, compiled)
    # Inductor fuses the bf16 casts into its kernels, so it rounds at other points than eager.
    assert_steps_match(fused, eager, 2e-2, 2e-2)


def test_rejects_unsupported_modules_and_bad_top_k():
    with pytest.raises(TypeError, match="not Embedding"):
        MolaLinear(nn.Embedding(10, 4), 2, 1, 4, 8)
    with pytest.raises(ValueError, match="top_k must be in"):
        MolaLinear(nn.Linear(4, 4), 2, 3, 4, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are only observable on CUDA")
def test_no_host_sync_in_forward_and_backward_on_cuda():
    layer = make_layer(8, 2, torch.float32).cuda()
    recorder = RoutingRecorder()
    layer.recorder = recorder
    x = torch.randn(64, 24, device="cuda", requires_grad=True)
    mask = torch.ones(64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        recorder.start(mask)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        records = [s for _, s in recorder.stop()]
        (y.float().sum() + load_balancing_loss(records, 2)).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
