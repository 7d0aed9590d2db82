"""mola.tasks on the real datasets under ../shared/data: labels checked against an independent
reading of each raw file, and the three views fed to the code that consumes them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from mola.data import IGNORE_INDEX, load_training_data, read_records
from mola.evaluate import answers_match, extract_answer, generation_accuracy, multiple_choice_accuracy
from mola.tasks import EVAL_SPLITS, TASKS, load_task
from mola.tiny import byte_tokenizer, tiny_model

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA_ROOT.is_dir(), reason=f"shared datasets not found at {DATA_ROOT}")
LIMIT = 32


def tsv(path: Path, header: bool) -> list[list[str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[1:] if header else rows


# Independent readings of each raw file: (right label, a text the prompt must contain) per row.
def truth_scienceqa(split):
    return [(r["answer"], r["question"]) for r in read_records(DATA_ROOT / "scienceqa" / "mola_sample.hf", split=split)]


def truth_commonsenseqa(split):
    name = {"train": "train_rand_split.jsonl", "validation": "dev_rand_split.jsonl"}[split]
    rows = [json.loads(line) for line in (DATA_ROOT / "commonsenseqa" / name).read_text().splitlines() if line.strip()]
    return [(r["answerKey"], r["question"]["stem"]) for r in rows]


def truth_openbookqa(split):
    rows = json.loads((DATA_ROOT / "openbookqa" / f"{split}.json").read_text())
    return [(r["answer"], r["instruction"]) for r in rows]


def truth_mrpc(split):
    rows = tsv(DATA_ROOT / "glue" / "MRPC" / {"train": "train.tsv", "validation": "dev.tsv"}[split], header=True)
    return [("yes" if r[0] == "1" else "no", r[3]) for r in rows]


def truth_rte(split):
    rows = tsv(DATA_ROOT / "glue" / "RTE" / {"train": "train.tsv", "validation": "dev.tsv"}[split], header=True)
    return [("yes" if r[3] == "entailment" else "no", r[2]) for r in rows]


def truth_cola(split):
    names = {"train": ["in_domain_train.tsv"], "validation": ["in_domain_dev.tsv", "out_of_domain_dev.tsv"]}[split]
    rows = [r for name in names for r in tsv(DATA_ROOT / "glue" / "CoLA" / name, header=False)]
    return [("yes" if r[1] == "1" else "no", r[3]) for r in rows]


TRUTH = {
    "scienceqa": truth_scienceqa,
    "commonsenseqa": truth_commonsenseqa,
    "openbookqa": truth_openbookqa,
    "mrpc": truth_mrpc,
    "rte": truth_rte,
    "cola": truth_cola,
}
EXPECTED_LABELS = {
    "commonsenseqa": ("A", "B", "C", "D", "E"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4"),
    "mrpc": ("no", "yes"),
    "rte": ("no", "yes"),
    "cola": ("no", "yes"),
}
# Rows in each task's evaluation split, from the shared data README.
EVAL_ROWS = {"scienceqa": 200, "commonsenseqa": 1221, "openbookqa": 500, "mrpc": 408, "rte": 277, "cola": 527 + 516}
CASES = [(name, split) for name in TASKS for split in ("train", EVAL_SPLITS[name])]


def test_registry_covers_the_truth_table():
    assert set(TASKS) == set(TRUTH) == set(EVAL_SPLITS)


@pytest.mark.parametrize("name,split", CASES)
def test_examples_match_the_raw_files(name, split):
    data = TASKS[name](DATA_ROOT, split, limit=LIMIT)
    truth = TRUTH[name](split)[:LIMIT]
    assert (data.name, data.split, len(data)) == (name, split, LIMIT)
    for example, (label, text) in zip(data.examples, truth):
        assert example.label == label
        assert text in example.prompt
        assert example.prompt.startswith("Below is an instruction") and example.prompt.endswith("### Response:\n")
        if name in EXPECTED_LABELS:
            assert example.labels == EXPECTED_LABELS[name]
    assert len({ex.answer for ex in data.examples}) > 1  # 32 rows of each hold several answers


@pytest.mark.parametrize("name,split", CASES)
def test_views_agree_with_each_other(name, split):
    data = TASKS[name](DATA_ROOT, split, limit=LIMIT)
    records, choices, generations = data.training_records(), data.choice_items(), data.generation_items()
    assert len(records) == len(choices) == len(generations) == LIMIT
    for example, record, choice, generation in zip(data.examples, records, choices, generations):
        assert record["prompt"] == choice["prompt"] == generation["prompt"] == example.prompt
        # The completion says "The answer is X." and the evaluation's extraction reads X back.
        assert record["completion"].endswith(f"The answer is {example.label}.")
        assert answers_match(extract_answer(record["completion"]), generation["answer"])
        assert generation["answer"] == example.label
        assert choice["options"][choice["answer"]] == record["completion"]
        assert len(choice["options"]) == len(choice["labels"]) == len(set(choice["options"]))


def test_scienceqa_completions_are_the_authors_outputs():
    rows = read_records(DATA_ROOT / "scienceqa" / "mola_sample.hf", split="test")[:LIMIT]
    records = load_task("scienceqa", DATA_ROOT, "test", limit=LIMIT).training_records()
    assert [r["completion"] for r in records] == [row["output"] for row in rows]


@pytest.mark.parametrize("name", list(TASKS))
def test_full_evaluation_split_sizes(name):
    assert len(load_task(name, DATA_ROOT, EVAL_SPLITS[name])) == EVAL_ROWS[name]


def test_records_tokenize_with_the_completion_labelled():
    tokenizer = byte_tokenizer()
    records = load_task("rte", DATA_ROOT, "train", limit=LIMIT).training_records()
    examples = load_training_data(records, tokenizer, cutoff_len=4096)
    assert len(examples) == LIMIT
    for record, example in zip(records, examples):
        assert tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX]) == record["completion"] + tokenizer.eos_token


def test_evaluation_items_run_through_both_evaluators():
    tokenizer = byte_tokenizer()
    model = tiny_model("llama", num_layers=1, hidden_size=32)
    data = load_task("cola", DATA_ROOT, "validation", limit=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        choice = multiple_choice_accuracy(model, tokenizer, data.choice_items(), batch_size=4)
        generated = generation_accuracy(model, tokenizer, data.generation_items(), max_new_tokens=4, batch_size=4)
    finally:
        torch.set_num_threads(threads)
    assert choice["n"] == 4 and all(p in (0, 1) for p in choice["predictions"])
    assert generated["n"] == 4 and len(generated["generations"]) == 4


def test_split_aliases_and_errors():
    assert load_task("rte", DATA_ROOT, "dev", limit=3).split == "validation"
    assert [e.prompt for e in load_task("mrpc", DATA_ROOT, "val", limit=3).examples] == [
        e.prompt for e in load_task("mrpc", DATA_ROOT, "validation", limit=3).examples
    ]
    with pytest.raises(ValueError, match="openbookqa: no split 'validation'; choose from train, test"):
        load_task("openbookqa", DATA_ROOT, "validation")
    # The message names the split asked for, not only what its alias reads as.
    with pytest.raises(ValueError, match=r"openbookqa: no split 'dev' \(read as 'validation'\); choose from train, test"):
        load_task("openbookqa", DATA_ROOT, "dev")
    with pytest.raises(ValueError, match="scienceqa: no split 'training'; choose from train, validation, test"):
        load_task("scienceqa", DATA_ROOT, "training")
    with pytest.raises(ValueError, match="unknown task 'squad'; choose from scienceqa"):
        load_task("squad", DATA_ROOT)
    with pytest.raises(FileNotFoundError):
        load_task("cola", DATA_ROOT / "nowhere", "train")


@pytest.mark.parametrize("name", list(TASKS))
def test_limits(name):
    # A negative limit was every row but the last for OpenBookQA (a list slice) and an islice
    # error elsewhere: it is the same clear error for every task.
    for limit in (-1, 2.5, True):
        with pytest.raises(ValueError, match=f"limit must be None or an integer >= 0, got {limit!r}"):
            load_task(name, DATA_ROOT, "train", limit=limit)
    assert len(load_task(name, DATA_ROOT, "train", limit=0)) == 0
    assert len(load_task(name, DATA_ROOT, "train", limit=2)) == 2
