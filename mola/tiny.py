"""Tiny random-weight causal LMs and a byte-level tokenizer that need no download.

For tests and quick demos: `tiny_model("llama")` builds a LLaMA-shaped model from a config in
code; `byte_tokenizer()` maps every UTF-8 byte to one token, plus ChatML special tokens and a
chat template, so any text round-trips without a vocabulary file.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_ARCHITECTURES = ("llama", "mistral", "qwen2", "gpt2")
HEAD_SCALE = 10.0  # see tiny_model


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: ids 0-255 are bytes, then the special tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet, key=lambda s: ord(s)))}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def tiny_config(architecture: str = "llama", num_layers: int = 4, hidden_size: int = 64, vocab_size: int | None = None):
    """A small config of the given architecture, sized for CPU tests."""
    tokenizer_size = 256 + len(SPECIAL_TOKENS)
    vocab_size = vocab_size or tokenizer_size
    eos, pad, bos = 256 + SPECIAL_TOKENS.index("<|im_end|>"), 256 + SPECIAL_TOKENS.index("<|pad|>"), 256
    common = dict(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    llama_like = dict(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        **common,
    )
    if architecture == "llama":
        return LlamaConfig(**llama_like)
    if architecture == "mistral":
        return MistralConfig(sliding_window=None, **llama_like)
    if architecture == "qwen2":
        return Qwen2Config(**llama_like)
    if architecture == "gpt2":
        return GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=4, n_positions=512, **common)
    raise ValueError(f"unknown tiny architecture {architecture!r}; choose from {', '.join(TINY_ARCHITECTURES)}")


def tiny_model(architecture: str = "llama", num_layers: int = 4, hidden_size: int = 64, seed: int = 0):
    """A randomly initialised causal LM of the given architecture (deterministic for a seed), in
    eval mode like a loaded model (GPT-2's dropout would otherwise make two forwards differ);
    `mola.train.train` switches it to training for its steps."""
    config = tiny_config(architecture, num_layers, hidden_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    if head.weight is not model.get_input_embeddings().weight:
        # With the usual init (std 0.02) the frozen head caps a logit at about 0.02 * hidden
        # (1.3 at 64): an adapter could barely make a token likelier than the rest, and what a
        # trained adapter generates greedily would turn on noise. A larger head lets a few
        # adapter steps learn confident answers, as on a real pretrained model.
        with torch.no_grad():
            head.weight.mul_(HEAD_SCALE)
    model.config._name_or_path = f"tiny-{architecture}"
    return model.eval()
