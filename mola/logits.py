"""Logits at chosen positions only.

A causal LM's last matmul, hidden (B, T, H) @ W_vocab.T -> logits (B, T, V), and the
cross-entropy over V after it are a large share of a training step for a small model with a big
vocabulary (SmolLM2-135M: V = 49,152, a fifth of the model's matmul FLOPs; on CPU the
log-softmax over all (B*T, V) logits took a sixth of the step). Training on responses only and
scoring options only need the logits at a few positions, so `forward_logits_at` applies the
output layer to those rows alone: (n, H) -> (n, V).

It works on any model whose output layer is what ``get_output_embeddings()`` returns (Hugging
Face causal LMs, through a peft or `MolaModel` wrapper) by a forward pre-hook on that layer that
gathers the chosen rows of its input. Where the layer is missing or sees a different shape (a
model that slices hidden states itself), the full logits are computed and indexed instead: the
same numbers, only slower.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A host tensor onto ``device`` without making the host wait: a pageable copy to CUDA waits
    for the stream, a pinned non-blocking one does not (torch keeps the pinned buffer alive until
    the copy is done)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@contextmanager
def _output_rows(model: nn.Module, positions: Tensor, rows: Tensor) -> Iterator[dict[str, bool]]:
    """Inside the block the output layer sees only the chosen rows of its input, hidden
    (B*T, H)[rows] = (n, H), instead of hidden (B, T, H). Yields ``{"applied": bool}``."""
    state = {"applied": False}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Module):
        yield state
        return

    def gather(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        hidden = args[0] if args else None
        if not isinstance(hidden, Tensor) or hidden.dim() != 3 or hidden.shape[:2] != positions.shape:
            return None  # not the (B, T, H) we expected: leave the call alone
        state["applied"] = True
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, to_device(rows, hidden.device)), *args[1:])  # (n, H)

    handle = head.register_forward_pre_hook(gather)
    try:
        yield state
    finally:
        handle.remove()


def forward_logits_at(model: nn.Module, positions: Tensor, **inputs: Any) -> tuple[Any, Tensor]:
    """Run ``model(**inputs)`` and return ``(output, logits)`` where logits (n, V) are those of
    the positions where ``positions`` (B, T bool) is True, in row-major order (the order of
    ``tensor[positions]``). ``output`` is the model's own output; its ``.logits`` may hold only
    the chosen rows. Other outputs (a `MolaModel`'s ``aux_loss``) are untouched.

    Pass ``positions`` on the CPU: the row indices are then found on the host and copied over,
    where a mask on the GPU would make the host wait for the forward pass to learn n."""
    rows = positions.reshape(-1).nonzero().squeeze(1)  # (n,) flat indices into B*T
    with _output_rows(model, positions, rows) as state:
        out = model(**inputs)
    logits = out.logits
    if not state["applied"] or logits.dim() == 3:  # the fallback on full (B, T, V) logits
        logits = logits.reshape(-1, logits.shape[-1]).index_select(0, to_device(rows, logits.device))  # (n, V)
    return out, logits


def next_token_positions(labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """For labels (B, T): ``(positions, targets)``, where positions (B, T) marks the positions
    whose next token is labelled (position t predicts token t+1) and targets (n,) are those
    tokens, in the order of ``logits[positions]``. Both on the device of ``labels``."""
    positions = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    positions[:, :-1] = labels[:, 1:] != ignore_index
    return positions, labels[:, 1:][positions[:, :-1]]
