"""Logits at chosen positions (mola.logits): the same numbers and gradients as indexing the full
(B, T, V) logits, with the output layer really run on the chosen rows only."""

import pytest
import torch
import torch.nn.functional as F

from mola import MolaConfig, get_mola_model, tiny_model
from mola.lora import get_lora_model
from mola.logits import forward_logits_at, next_token_positions
from mola.tiny import TINY_ARCHITECTURES


def wrapped(kind: str, arch: str):
    base = tiny_model(arch)
    torch.manual_seed(7)
    if kind == "base":
        return base
    if kind == "lora":
        return get_lora_model(base, rank=4, alpha=8, dropout=0.0)
    model = get_mola_model(base, MolaConfig(experts="2468", top_k=2, dropout=0.0))
    with torch.no_grad():  # B starts at zero; make the adapter count
        for _, module in model.mola_modules():
            module.lora_B.normal_(std=0.02)
    return model


def batch(vocab: int):
    torch.manual_seed(0)
    ids = torch.randint(3, vocab, (3, 12))  # (B, T)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0  # a right-padded row
    labels = ids.clone()
    labels[:, :7] = -100  # a prompt
    labels[2, 9:] = -100  # its padding
    labels[1, :] = -100  # a row with nothing labelled
    return ids, mask, labels


@pytest.mark.parametrize("kind", ["base", "lora", "mola"])
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_chosen_logits_and_gradients_equal_the_full_ones(kind, arch):
    model = wrapped(kind, arch).eval()  # tiny GPT-2 has dropout: two forwards must agree
    ids, mask, labels = batch(model.config.vocab_size)
    positions, targets = next_token_positions(labels)
    assert positions.sum() == targets.numel() == 5 + 0 + 2

    out, chosen = forward_logits_at(model, positions, input_ids=ids, attention_mask=mask)
    assert out.logits.shape == chosen.shape == (targets.numel(), model.config.vocab_size)  # the head ran on n rows
    loss = F.cross_entropy(chosen.float(), targets, reduction="sum")
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    full = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    assert full.dim() == 3  # the hook is gone after the call
    reference = F.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum")
    reference.backward()
    torch.testing.assert_close(chosen, full[positions], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:
            # float32 sums in another order: the tiny heads (10x the usual init) make gradients larger
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


class NoHead(torch.nn.Module):
    """A model without get_output_embeddings: the full logits are indexed instead."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **inputs):
        return self.inner(**inputs)


def test_models_without_an_output_layer_fall_back_to_indexing():
    inner = tiny_model("llama")
    ids, mask, labels = batch(inner.config.vocab_size)
    positions, _ = next_token_positions(labels)
    out, chosen = forward_logits_at(NoHead(inner), positions, input_ids=ids, attention_mask=mask)
    assert out.logits.dim() == 3
    torch.testing.assert_close(chosen, out.logits[positions])


def test_next_token_positions_shift_by_one():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, -100, -100]])
    positions, targets = next_token_positions(labels)
    assert positions.tolist() == [[False, True, True, False], [True, False, False, False]]
    assert targets.tolist() == [5, 6, 7]
