"""mola.evaluate on tiny models: loss against a hand computation, likelihood scoring against
unbatched sums, and both accuracies on a model trained to know the answers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from mola.config import MolaConfig
from mola.data import IGNORE_INDEX, collate, encode_pairs, load_training_data
from mola.evaluate import (
    _generation_batches,
    answers_match,
    completion_match,
    evaluate_loss,
    extract_answer,
    generate_ids,
    generate_texts,
    generation_accuracy,
    multiple_choice_accuracy,
    records_loss,
)
from mola.model import get_mola_model
from mola.tiny import byte_tokenizer, tiny_model

RECORDS = [
    {"prompt": "Q: one?\n", "completion": "The answer is A."},
    {"instruction": "Name a colour.", "input": "", "output": "Blue, most likely."},
    {"text": "Plain text carries a label on every token."},
    {"prompt": "x", "completion": "y"},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]},
]

# Distinct prompts of different lengths, so a batch needs padding.
QA = [
    ("Which planet is red?\n", "B"),
    ("Grass colour?\n", "A"),
    ("Zebra stripes are what?\n", "D"),
    ("Capital of France, please tell me.\n", "C"),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, above all when other test processes share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def examples(tokenizer):
    return load_training_data(RECORDS, tokenizer, cutoff_len=512)


def make_model(kind: str):
    base = tiny_model("llama", num_layers=2, hidden_size=64, seed=1)
    if kind == "hf":
        return base
    if kind == "mola":
        model = get_mola_model(base, MolaConfig(experts=[2, 4], top_k=2, rank=4, dropout=0.1))
        with torch.no_grad():  # a non-zero B, so the adapter changes the logits
            for _, module in model.mola_modules():
                module.lora_B.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
        return model
    if kind == "peft":
        return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1, init_lora_weights=False))
    raise AssertionError(kind)


def hand_loss(model, examples) -> tuple[float, int]:
    """Mean -log p(label) over labelled positions, one unpadded example at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            logp = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0].float().log_softmax(-1)  # (T, V)
            for t in range(1, len(ex["input_ids"])):
                if ex["labels"][t] != IGNORE_INDEX:
                    total -= logp[t - 1, ex["labels"][t]].item()
                    count += 1
    return total / count, count


# ---- evaluate_loss ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hf", "mola", "peft"])
def test_evaluate_loss_equals_hand_computation(kind, examples, tokenizer):
    model = make_model(kind)
    model.eval()
    expected, count = hand_loss(model, examples)
    model.train()
    result = evaluate_loss(model, examples, tokenizer.pad_token_id, batch_size=3)
    assert result["eval_tokens"] == count
    assert result["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert model.training  # put back in train mode


def test_evaluate_loss_matches_the_models_own_loss(examples, tokenizer):
    model = make_model("hf").eval()
    batch = collate(examples[:1], tokenizer.pad_token_id)
    with torch.no_grad():
        own = model(**batch).loss.item()
    assert evaluate_loss(model, examples[:1], tokenizer.pad_token_id)["eval_loss"] == pytest.approx(own, rel=1e-5)


def test_evaluate_loss_does_not_depend_on_batch_size(examples, tokenizer):
    model = make_model("hf")
    losses = {bs: evaluate_loss(model, examples, tokenizer.pad_token_id, batch_size=bs)["eval_loss"] for bs in (1, 2, 5)}
    assert losses[1] == pytest.approx(losses[2], rel=1e-5) == pytest.approx(losses[5], rel=1e-5)


def test_each_module_gets_its_own_mode_back(examples, tokenizer):
    model = make_model("hf")
    model.train()
    model.model.layers[0].eval()  # e.g. a frozen block kept in eval mode on purpose
    evaluate_loss(model, examples, tokenizer.pad_token_id)
    assert model.training and model.model.layers[1].training
    assert not model.model.layers[0].training and not model.model.layers[0].mlp.training


def test_evaluate_loss_under_bf16_autocast_is_close(examples, tokenizer):
    model = make_model("hf")
    exact = evaluate_loss(model, examples, tokenizer.pad_token_id)["eval_loss"]
    mixed = evaluate_loss(model, examples, tokenizer.pad_token_id, autocast_dtype=torch.bfloat16)["eval_loss"]
    assert mixed == pytest.approx(exact, rel=0.02)


def test_evaluate_loss_without_labelled_tokens_is_nan(tokenizer):
    result = evaluate_loss(make_model("hf"), [{"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX] * 3}], tokenizer.pad_token_id)
    assert result["eval_tokens"] == 0 and math.isnan(result["eval_loss"])


def test_records_loss_is_the_hand_loss_of_the_records_tokenized_as_training_did(tokenizer):
    """Data rows straight from a file: tokenized at the run's cutoff_len (a long row cut),
    prompts unlabelled unless train_on_inputs, every format (text rows too) counted."""
    model = make_model("mola").eval()
    for cutoff_len, train_on_inputs in ((512, False), (24, False), (512, True)):
        expected, count = hand_loss(model, load_training_data(RECORDS, tokenizer, cutoff_len=cutoff_len, train_on_inputs=train_on_inputs))
        measured = records_loss(model, tokenizer, RECORDS, cutoff_len=cutoff_len, train_on_inputs=train_on_inputs, batch_size=2)
        assert measured == {"loss": pytest.approx(expected, rel=1e-5), "loss_tokens": count}
    labelled = {toi: records_loss(model, tokenizer, RECORDS, train_on_inputs=toi)["loss_tokens"] for toi in (False, True)}
    assert labelled[True] > labelled[False]  # the prompts count too


def test_records_loss_of_rows_with_nothing_to_predict_is_none(tokenizer):
    # Each row's prompt fills the cutoff: no completion token is left.
    rows = [{"prompt": "a long prompt that fills it", "completion": "x"}]
    assert records_loss(make_model("hf"), tokenizer, rows, cutoff_len=8) == {"loss": None, "loss_tokens": 0}


# ---- multiple choice -------------------------------------------------------------------------

CHOICE_ITEMS = [
    {"prompt": "Pick one:", "options": [" yes", " no"], "answer": 0},
    {"prompt": "A much longer prompt, to force padding in the batch:", "options": [" red", " green", " a long blue option"], "answer": 2},
    {"prompt": "Q", "options": ["A", "B", "C", "D"], "answer": 3},
]


def hand_option_score(model, tokenizer, prompt: str, option: str) -> tuple[float, int]:
    p = tokenizer(prompt)["input_ids"]
    o = tokenizer(option, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([p + o])).logits[0].float().log_softmax(-1)  # (T, V)
    return sum(logp[len(p) + j - 1, token].item() for j, token in enumerate(o)), len(o)


@pytest.mark.parametrize("normalize", [False, True])
def test_choice_scores_equal_unbatched_sums(tokenizer, normalize):
    model = make_model("hf").eval()
    result = multiple_choice_accuracy(model, tokenizer, CHOICE_ITEMS, batch_size=4, normalize=normalize)
    for item, scores, prediction in zip(CHOICE_ITEMS, result["scores"], result["predictions"]):
        expected = []
        for option in item["options"]:
            total, n = hand_option_score(model, tokenizer, item["prompt"], option)
            expected.append(total / n if normalize else total)
        assert scores == pytest.approx(expected, abs=1e-4)
        assert prediction == max(range(len(expected)), key=expected.__getitem__)
    assert result["n"] == 3 and result["correct"] == sum(p == it["answer"] for p, it in zip(result["predictions"], CHOICE_ITEMS))


@pytest.mark.parametrize(
    "item,match",
    [
        ({"prompt": "p", "options": ["a"], "answer": 1}, "'answer' must be an index"),
        ({"prompt": "p", "options": [], "answer": 0}, "'options' must be a non-empty list"),
        ({"prompt": 3, "options": ["a"], "answer": 0}, "'prompt' must be a string"),
    ],
)
def test_choice_items_are_validated(tokenizer, item, match):
    with pytest.raises(ValueError, match=match):
        multiple_choice_accuracy(make_model("hf"), tokenizer, [item])


@pytest.fixture(scope="module")
def trained(tokenizer):
    """A tiny LLaMA trained to answer the QA prompts with "The answer is X." (about a second)."""
    model = tiny_model("llama", num_layers=2, hidden_size=64, seed=0)
    records = [{"prompt": p, "completion": f"The answer is {a}."} for p, a in QA]
    batch = collate(load_training_data(records, tokenizer), tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(150):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("normalize", [False, True])
def test_choice_picks_the_answer_a_model_was_trained_on(trained, tokenizer, normalize):
    items = [{"prompt": p, "options": [f"The answer is {x}." for x in "ABCD"], "answer": "ABCD".index(a)} for p, a in QA]
    result = multiple_choice_accuracy(trained, tokenizer, items, batch_size=3, normalize=normalize)
    assert result["accuracy"] == 1.0 and result["predictions"] == [it["answer"] for it in items]


def test_mola_wrapper_scores_like_its_base_at_init(trained, tokenizer):
    """B = 0 at init, so a fresh MoLA adapter must leave every score unchanged."""
    items = [{"prompt": p, "options": [f"The answer is {x}." for x in "ABCD"], "answer": "ABCD".index(a)} for p, a in QA]
    mola = get_mola_model(copy.deepcopy(trained), MolaConfig(experts=[2, 2], top_k=1, rank=2))
    base_scores = multiple_choice_accuracy(trained, tokenizer, items)["scores"]
    mola_scores = multiple_choice_accuracy(mola, tokenizer, items)["scores"]
    for a, b in zip(base_scores, mola_scores):
        assert a == pytest.approx(b, abs=1e-4)
    assert generation_accuracy(mola, tokenizer, [{"prompt": p, "answer": a} for p, a in QA], max_new_tokens=20)["accuracy"] == 1.0


# ---- generation ------------------------------------------------------------------------------


def test_generation_accuracy_on_a_trained_model(trained, tokenizer):
    tokenizer.padding_side = "right"
    items = [{"prompt": p, "answer": a} for p, a in QA] + [{"prompt": QA[0][0], "answer": "C"}]
    result = generation_accuracy(trained, tokenizer, items, max_new_tokens=20, batch_size=5)
    assert result["generations"][:4] == [f"The answer is {a}." for _, a in QA]
    assert result["predictions"] == ["B", "A", "D", "C", "B"]
    assert (result["correct"], result["n"], result["failed"]) == (4, 5, 0)
    assert result["accuracy"] == pytest.approx(0.8)
    assert tokenizer.padding_side == "right"  # left padding is done by hand, the tokenizer untouched


def test_batched_generation_equals_one_at_a_time(tokenizer):
    model = make_model("hf").eval()
    prompts = ["short", "a somewhat longer prompt", "mid length"]
    assert generate_texts(model, tokenizer, prompts, max_new_tokens=6, batch_size=3) == generate_texts(
        model, tokenizer, prompts, max_new_tokens=6, batch_size=1
    )


def test_completion_match_scores_generations_against_their_references(trained, tokenizer):
    references = [(p, f"The answer is {a}.") for p, a in QA] + [(QA[0][0], "The answer is C."), (QA[1][0], "Blue.")]
    pairs = encode_pairs([(p, c, False) for p, c in references], tokenizer)
    result = completion_match(trained, tokenizer, pairs, batch_size=4)
    assert result["generations"][:5] == [f"The answer is {a}." for _, a in QA] + ["The answer is B."]
    assert result["references"] == [c for _, c in references]
    assert (result["n"], result["answers_expected"]) == (6, 5)
    assert result["exact_match"] == pytest.approx(4 / 6)
    assert result["answer_accuracy"] == pytest.approx(4 / 5)  # "Blue." says no answer: not counted
    # Each generation is as long as its reference at most: "Blue." allows 5 tokens.
    assert len(tokenizer(result["generations"][5], add_special_tokens=False)["input_ids"]) <= 5


def test_completion_match_without_answers_in_the_references(trained, tokenizer):
    pairs = encode_pairs([(QA[0][0], "The answer is B.", False), (QA[1][0], "something else", False)], tokenizer)
    result = completion_match(trained, tokenizer, pairs)
    assert result["answers_expected"] == 1 and result["answer_accuracy"] == 1.0
    pairs = encode_pairs([(QA[1][0], "something else", False)], tokenizer)
    result = completion_match(trained, tokenizer, pairs)
    assert (result["answers_expected"], result["answer_accuracy"], result["exact_match"]) == (0, None, 0.0)
    assert completion_match(trained, tokenizer, [])["n"] == 0


def test_generate_ids_keeps_each_rows_budget_and_batches_like_one_at_a_time(tokenizer):
    model = make_model("hf").eval()
    prompts = [tokenizer(t)["input_ids"] for t in ("short", "a somewhat longer prompt", "mid length")]
    budgets = [1, 7, 3]
    batched = generate_ids(model, prompts, budgets, tokenizer.pad_token_id, eos_id=None, batch_size=3)
    assert [len(row) for row in batched] == budgets  # no EOS to stop at: each runs to its budget
    assert batched == [generate_ids(model, [p], [b], tokenizer.pad_token_id, None)[0] for p, b in zip(prompts, budgets)]


def test_a_generation_batch_stays_within_the_models_positions():
    # Together the longest prompt and the largest budget would pass 512 positions: two batches.
    assert list(_generation_batches([10, 500], [400, 5], batch_size=8, positions=512)) == [[0], [1]]
    assert list(_generation_batches([10, 500], [400, 5], batch_size=8, positions=None)) == [[0, 1]]
    assert list(_generation_batches([30, 20, 10], [1, 1, 1], batch_size=2, positions=512)) == [[2, 1], [0]]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("The answer is B.", "B"),
        ("Answer: The answer is A.", "A"),
        ("the answer is (C) because ...", "C"),
        ("THE ANSWER IS d", "d"),
        ("The answer is: E", "E"),
        ("the correct answer is answer4", "answer4"),
        ("I think the answer is yes.", "yes"),
        ("The answer is not_entailment.", "not_entailment"),
        ("The answer is B. The answer is C.", "B"),
        ("The answer is -3.", "-3"),
        ("The answer is 3.5 metres", "3.5"),
        ("The answer is 42abc", "42abc"),
        ("No idea.", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "predicted,expected,ok",
    [("B", "B", True), ("b", "B", False), ("Yes", "yes", True), ("answer4", "answer4", True), ("answer1", "answer4", False), (None, "A", False)],
)
def test_answers_match(predicted, expected, ok):
    assert answers_match(predicted, expected) is ok


# ---- sequences longer than the model's positions -----------------------------------------------


@pytest.mark.parametrize(
    "evaluate, message",
    [
        (lambda m, tok: evaluate_loss(m, [{"input_ids": [1, 2]}, {"input_ids": [1] * 520}], tok.pad_token_id),
         r"example 1 is 520 tokens but the model has 512 positions: tokenize with cutoff_len <= the model's positions"),
        (lambda m, tok: multiple_choice_accuracy(m, tok, [{"prompt": "x" * 510, "options": ["a", "b" * 5], "answer": 0}]),
         r"item 0: its prompt with option 1 is 515 tokens but the model has 512 positions: shorten the prompt"),
        (lambda m, tok: generate_texts(m, tok, ["short", "x" * 500], max_new_tokens=16),
         r"prompt 1 with max_new_tokens=16 is 516 tokens but the model has 512 positions: shorten the prompt or lower max_new_tokens"),
    ],
)
def test_sequences_longer_than_the_models_positions_are_refused(tokenizer, evaluate, message):
    # GPT-2's position embeddings failed with an IndexError deep inside the model.
    model = get_mola_model(tiny_model("gpt2"), MolaConfig(experts=[2, 2, 2, 2], top_k=1))
    with pytest.raises(ValueError, match=message):
        evaluate(model, tokenizer)
