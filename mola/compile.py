"""Regional `torch.compile`: each decoder layer compiled on its own.

Eager MoLA issues about 40 more small ops per adapted module and step than LoRA does (router,
softmax, top-k, gates, routing statistics, and their backward: bench/README.md counts them).
Where a step is bound by how fast ops are launched, as on a GPU with a small model, fusing them
is what brings MoLA near LoRA's speed, and `torch.compile` does that fusion.

Why per decoder layer and not the whole model:
- Layers with the same experts and top-k share one compiled graph (parameters are graph
  inputs), so a 30-layer model with allocation 2468 compiles about four graphs, not 30 layers
  of one huge graph: minutes less of compile time.
- The embedding, the output layer and the loss stay eager, so `mola.logits`'s hook (logits at the
  labelled positions only) and the per-step Python around them do not force recompilation.

Shapes are compiled dynamic from the first call, since every batch is padded to its own
longest example.
"""

from __future__ import annotations

import torch
import torch._dynamo
from torch import nn

from mola.architectures import find_decoder_layers
from mola.layer import MolaLinear

# Graphs a layer may need besides one per distinct (experts, top-k) of its MoLA modules: the
# first layer's input does not require grad (the embedding is frozen) while the others' does,
# training and evaluation differ (dropout, the recorder), and Inductor guards small sizes apart.
GRAPHS_PER_LAYER_KIND = 8


def compile_decoder_layers(model: nn.Module, *, backend: str = "inductor", mode: str | None = None) -> int:
    """Compile every decoder layer of ``model`` in place (`nn.Module.compile`); the model is
    used as before. Returns the number of compiled layers.

    ``backend`` and ``mode`` are `torch.compile`'s (``"aot_eager"`` traces without generating
    kernels: a quick check that a model compiles at all).
    """
    _, layers = find_decoder_layers(model)
    kinds = {
        tuple((m.num_experts, m.top_k) for m in layer.modules() if isinstance(m, MolaLinear))
        for layer in layers
    }
    # Dynamo's recompile limit (default 8) counts the graphs cached for one code object, and the
    # layers of every compiled model in the process share one forward: without room for this
    # model's kinds too, its layers would silently fall back to eager.
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit += GRAPHS_PER_LAYER_KIND * len(kinds)
    # With activation checkpointing, Dynamo would break the graph at the routing recorder's
    # list append, a side effect it cannot replay in the recomputation. Not replaying it is
    # what the recorder wants: it only records while a forward pass is active (`RoutingRecorder`).
    dynamo_config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for layer in layers:
        layer.compile(backend=backend, mode=mode, dynamic=True)
    return len(layers)
