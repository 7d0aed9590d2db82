"""`torch.compile` of a model for training.

Eager MoLA issues about 40 more small ops per adapted module and step than LoRA does (router,
softmax, top-k, gates, routing statistics, and their backward: bench/README.md counts them).
Where a step is bound by how fast ops are launched, as on a GPU with a small model, fusing them
is what brings MoLA near LoRA's speed, and `torch.compile` does that fusion.

The whole model is compiled as one graph, the load-balancing loss and the output layer at the
labelled positions (`mola.logits`) included. We measured it against compiling each decoder layer
on its own (`nn.Module.compile`: fewer distinct graphs to compile), side by side on a
dispatch-bound CPU shape: MoLA's step took 61.8 ms eager, 51.4 ms compiled per layer and 42.9 ms
compiled whole (`bench/step_bench.py --compile --compile-scope model,layers`, bench/README.md).
Per layer, every layer call crosses a graph boundary, and the routing statistics leave each
graph to be pooled eagerly.

Shapes are compiled dynamic from the first call, since every batch is padded to its own longest
example: one graph serves every length (two at most, when the first batch's count of labelled
tokens happens to equal its length, which Dynamo takes for a rule until a batch breaks it).
The compiled module is a wrapper: the model itself stays eager, so generation and
evaluation after training run as before.
"""

from __future__ import annotations

import torch
import torch._dynamo
from torch import nn


def compile_for_training(model: nn.Module, *, backend: str = "inductor", mode: str | None = None) -> nn.Module:
    """``torch.compile(model)`` set up for MoLA training; returns the compiled wrapper (it shares
    the model's parameters). ``backend`` and ``mode`` are `torch.compile`'s (``"aot_eager"``
    traces without generating kernels: a quick check that a model compiles at all)."""
    # With activation checkpointing, Dynamo would break the graph at the routing recorder's
    # list append, a side effect it cannot replay in the recomputation. Not replaying it is
    # what the recorder wants: it only records while a forward pass is active (`RoutingRecorder`).
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    # `mola.logits` hands the output layer its labelled rows through a forward pre-hook, and
    # Dynamo reads tensors reached through a module (its hooks' closures included) as fixed-size
    # by default: every batch's own padded length and count of labelled tokens then compiled the
    # model again (one compile per step, until the recompile limit fell back to eager).
    torch._dynamo.config.force_nn_module_property_static_shapes = False
    return torch.compile(model, backend=backend, mode=mode, dynamic=True)
