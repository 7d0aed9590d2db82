"""`mola.models.load_tokenizer` (the tokenizer `load_base_model` gives, without the weights), and
the built-in tiny models."""

from __future__ import annotations

import pytest

from mola.models import load_base_model, load_tokenizer

TEXT = "Below is an instruction.\n### Response:\nThe number is 7."


def _same(a, b) -> None:
    assert type(a) is type(b)
    assert a(TEXT).input_ids == b(TEXT).input_ids
    assert (a.eos_token, a.pad_token, a.pad_token_id) == (b.eos_token, b.pad_token, b.pad_token_id)
    assert a.get_vocab() == b.get_vocab()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "local-dir"])
def test_the_tokenizer_of_load_base_model(name, tmp_path):
    if name == "local-dir":  # a Hugging Face model directory
        model, tokenizer = load_base_model("tiny-qwen2")
        model.save_pretrained(tmp_path)
        tokenizer.save_pretrained(tmp_path)
        name = str(tmp_path)
    _same(load_tokenizer(name), load_base_model(name)[1])


def test_an_unknown_model_is_not_found():
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_tokenizer("no-such-model")


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_tiny_model_is_in_eval_mode_like_a_loaded_model(architecture):
    torch = pytest.importorskip("torch")
    from mola import tiny_model

    model = tiny_model(architecture)
    assert not any(module.training for module in model.modules())
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():  # GPT-2 has dropout 0.1: in train mode two forwards would differ
        assert torch.equal(model(ids).logits, model(ids).logits)
    assert not load_base_model(f"tiny-{architecture}")[0].training
