"""`torch_compile=True` compiles the model once, whatever the batches' lengths.

Dynamo's "eager" backend traces graphs without generating kernels: the graphs and guards, which
decide when the model is compiled again, are those Inductor gets, at a fraction of the time.
"""

import functools

import torch
from torch._dynamo.utils import counters

import mola.train
from mola import MolaConfig, byte_tokenizer, get_mola_model, tiny_model
from mola.compile import compile_for_training
from mola.data import load_training_data
from mola.lora import get_lora_model
from mola.train import TrainConfig, train

TOKENIZER = byte_tokenizer()


def records_of_growing_length():
    """Every example of its own length and number of labelled tokens."""
    return [
        {"prompt": "q" * (10 + 7 * i), "completion": "a" * (3 + 2 * i)}
        for i in range(8)
    ]


def train_compiled(model, monkeypatch):
    monkeypatch.setattr(mola.train, "compile_for_training", functools.partial(compile_for_training, backend="eager"))
    data = load_training_data(records_of_growing_length(), TOKENIZER, cutoff_len=128)
    torch._dynamo.reset()
    counters.clear()
    config = TrainConfig(max_steps=4, batch_size=2, micro_batch_size=2, torch_compile=True)
    train(model, TOKENIZER, data, config=config)


def assert_compiled_at_most_twice():
    # Two: the first batch may have as many labelled tokens as positions, which Dynamo takes for
    # a rule (duck sizing) until another batch breaks it. One graph per length was the bug.
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    assert not counters["recompile_limit"], "the model fell back to eager"


def test_mola_compiles_once_for_every_length(monkeypatch):
    torch.manual_seed(0)
    model = get_mola_model(tiny_model("llama"), MolaConfig(experts="2222", dropout=0.0))
    train_compiled(model, monkeypatch)
    assert_compiled_at_most_twice()


def test_lora_compiles_once_for_every_length(monkeypatch):
    torch.manual_seed(0)
    model = get_lora_model(tiny_model("llama"), rank=4, dropout=0.0)
    train_compiled(model, monkeypatch)
    assert_compiled_at_most_twice()
