"""The paper's benchmark tasks, read from local copies of their public files.

Each loader turns one split of one dataset into `TaskExample`s: an Alpaca prompt, the answer
labels (letters, OpenBookQA's ``answer1``..``answer4``, or the label words ``no``/``yes`` for the
GLUE tasks) and the index of the right one. A `TaskData` then gives the same examples as

- training records ``{"prompt", "completion"}`` whose completion is "The answer is X." (for
  ScienceQA the MoLA sample's own "Answer: The answer is X."), for `mola.data.load_training_data`;
- ``choice_items()`` for `mola.evaluate.multiple_choice_accuracy`: each option is the full
  completion for one label, so it is scored on exactly the tokens the model was trained on;
- ``generation_items()`` for `mola.evaluate.generation_accuracy`: ``{"prompt", "answer": label}``.

Loaders are pure: ``loader(data_root, split, limit=None)`` reads files under ``data_root`` (the
folder described in the shared data README) and returns the first ``limit`` examples in file
order (``limit`` None: all; a negative limit is a ValueError). The library never guesses where
the data lives.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from mola.data import alpaca_prompt, read_records

logger = logging.getLogger(__name__)

ANSWER_TEMPLATE = "The answer is {}."
SCIENCEQA_TEMPLATE = "Answer: The answer is {}."  # the MoLA authors' ScienceQA outputs
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
YES_NO = ("no", "yes")  # index = the GLUE label (1 = paraphrase / entailment / acceptable)
SPLIT_ALIASES = {"dev": "validation", "val": "validation", "valid": "validation"}


@dataclass(frozen=True)
class TaskExample:
    """One question: the full prompt, the answer labels, and the index of the right label."""

    prompt: str
    labels: tuple[str, ...]
    answer: int
    template: str = ANSWER_TEMPLATE

    def completion(self, label: str | None = None) -> str:
        """The completion stating ``label`` (default: the right one)."""
        return self.template.format(self.labels[self.answer] if label is None else label)

    @property
    def label(self) -> str:
        return self.labels[self.answer]


@dataclass
class TaskData:
    """The examples of one split of one task, with the views training and evaluation need."""

    name: str
    split: str
    examples: list[TaskExample]

    def __len__(self) -> int:
        return len(self.examples)

    def training_records(self) -> list[dict[str, str]]:
        return [{"prompt": ex.prompt, "completion": ex.completion()} for ex in self.examples]

    def choice_items(self) -> list[dict[str, Any]]:
        return [
            {"prompt": ex.prompt, "options": [ex.completion(label) for label in ex.labels], "labels": list(ex.labels), "answer": ex.answer}
            for ex in self.examples
        ]

    def generation_items(self) -> list[dict[str, str]]:
        return [{"prompt": ex.prompt, "answer": ex.label} for ex in self.examples]


# ---- helpers ---------------------------------------------------------------------------------


def _split_file(task: str, split: str, files: dict[str, Any]) -> tuple[str, Any]:
    """``(split name after aliases, its file(s))``, or a ValueError naming the split asked for
    (and what its alias reads as) and listing the splits there are."""
    canonical = SPLIT_ALIASES.get(split, split)
    if canonical not in files:
        read_as = f" (read as {canonical!r})" if canonical != split else ""
        raise ValueError(f"{task}: no split {split!r}{read_as}; choose from {', '.join(files)}")
    return canonical, files[canonical]


def _check_limit(limit: Any) -> None:
    """``limit`` is None or a count: a negative one would be a slice from the end for a list
    (every row but the last) and an error for ``islice``, so it is refused everywhere."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or an integer >= 0, got {limit!r}")


def _read_tsv(path: Path, header: bool) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of a GLUE TSV. Quotes are literal text in these files, and MRPC
    starts with a byte-order mark, hence QUOTE_NONE and utf-8-sig."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        for line, fields in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if header and line == 1:
                continue
            if fields:
                yield line, fields


def _options_line(labels: tuple[str, ...] | str, texts: list[str]) -> str:
    return "Options: " + " ".join(f"({label}) {text}" for label, text in zip(labels, texts))


def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{where}: {message}")


# ---- loaders ---------------------------------------------------------------------------------


def load_scienceqa(data_root: str | os.PathLike, split: str = "train", limit: int | None = None) -> TaskData:
    """The MoLA authors' ScienceQA sample (train / validation / test, 200 rows each): their own
    instruction and "Answer: The answer is X." output."""
    _check_limit(limit)
    split, _ = _split_file("scienceqa", split, {"train": None, "validation": None, "test": None})
    path = Path(data_root) / "scienceqa" / "mola_sample.hf"
    examples = []
    for i, row in enumerate(islice(read_records(path, split=split), limit), start=1):
        labels = tuple(LETTERS[: len(row["choices"])])
        _require(row["answer"] in labels, f"{path.name}[{split}]:{i}", f"answer {row['answer']!r} not among {labels}")
        prompt = alpaca_prompt(row["instruction"], row.get("input"))
        examples.append(TaskExample(prompt, labels, labels.index(row["answer"]), SCIENCEQA_TEMPLATE))
    return TaskData("scienceqa", split, examples)


def load_commonsenseqa(data_root: str | os.PathLike, split: str = "train", limit: int | None = None) -> TaskData:
    """CommonsenseQA (official JSONL; 5 lettered choices). Evaluated on the dev split."""
    _check_limit(limit)
    split, name = _split_file("commonsenseqa", split, {"train": "train_rand_split.jsonl", "validation": "dev_rand_split.jsonl"})
    path = Path(data_root) / "commonsenseqa" / name
    examples = []
    with open(path, encoding="utf-8") as f:
        lines = (line for line in f if line.strip())
        for i, line in enumerate(islice(lines, limit), start=1):
            row = json.loads(line)
            question = row["question"]
            labels = tuple(c["label"] for c in question["choices"])
            _require(row.get("answerKey") in labels, f"{path.name}:{i}", f"answerKey {row.get('answerKey')!r} not among {labels}")
            instruction = f"Question: {question['stem']}\n{_options_line(labels, [c['text'] for c in question['choices']])}\n"
            examples.append(TaskExample(alpaca_prompt(instruction), labels, labels.index(row["answerKey"])))
    return TaskData("commonsenseqa", split, examples)


def load_openbookqa(data_root: str | os.PathLike, split: str = "train", limit: int | None = None) -> TaskData:
    """OpenBookQA in LLM-Adapters' instruction form; the labels are ``answer1``..``answer4``,
    as its instruction asks for."""
    _check_limit(limit)
    split, name = _split_file("openbookqa", split, {"train": "train.json", "test": "test.json"})
    path = Path(data_root) / "openbookqa" / name
    rows = json.loads(path.read_text(encoding="utf-8"))
    labels = ("answer1", "answer2", "answer3", "answer4")
    examples = []
    for i, row in enumerate(rows[:limit], start=1):
        _require(row.get("answer") in labels, f"{path.name}: item {i}", f"answer {row.get('answer')!r} not among {labels}")
        prompt = alpaca_prompt(row["instruction"], row.get("input"))
        examples.append(TaskExample(prompt, labels, labels.index(row["answer"])))
    return TaskData("openbookqa", split, examples)


def _glue_example(instruction: str, label: int) -> TaskExample:
    return TaskExample(alpaca_prompt(instruction), YES_NO, label)


def load_mrpc(data_root: str | os.PathLike, split: str = "train", limit: int | None = None) -> TaskData:
    """MRPC: are two sentences paraphrases? Labels no / yes."""
    _check_limit(limit)
    split, name = _split_file("mrpc", split, {"train": "train.tsv", "validation": "dev.tsv"})
    path = Path(data_root) / "glue" / "MRPC" / name
    examples = []
    for line, fields in islice(_read_tsv(path, header=True), limit):
        _require(len(fields) == 5 and fields[0] in ("0", "1"), f"{path.name}:{line}", "expected Quality (0/1), two ids, two sentences")
        instruction = (
            f"Sentence 1: {fields[3]}\nSentence 2: {fields[4]}\n"
            "Question: Do the two sentences mean the same thing? Answer yes or no.\n"
        )
        examples.append(_glue_example(instruction, int(fields[0])))
    return TaskData("mrpc", split, examples)


def load_rte(data_root: str | os.PathLike, split: str = "train", limit: int | None = None) -> TaskData:
    """RTE: does the first sentence entail the second? Labels no / yes."""
    _check_limit(limit)
    split, name = _split_file("rte", split, {"train": "train.tsv", "validation": "dev.tsv"})
    path = Path(data_root) / "glue" / "RTE" / name
    examples = []
    for line, fields in islice(_read_tsv(path, header=True), limit):
        ok = len(fields) == 4 and fields[3] in ("entailment", "not_entailment")
        _require(ok, f"{path.name}:{line}", "expected index, sentence1, sentence2, label (entailment/not_entailment)")
        instruction = (
            f"Premise: {fields[1]}\nHypothesis: {fields[2]}\n"
            "Question: Does the premise entail the hypothesis? Answer yes or no.\n"
        )
        examples.append(_glue_example(instruction, int(fields[3] == "entailment")))
    return TaskData("rte", split, examples)


def load_cola(data_root: str | os.PathLike, split: str = "train", limit: int | None = None) -> TaskData:
    """CoLA: is a sentence grammatically acceptable? Labels no / yes. The GLUE dev set is the
    in-domain and the out-of-domain dev files together."""
    _check_limit(limit)
    split, names = _split_file("cola", split, {"train": ["in_domain_train.tsv"], "validation": ["in_domain_dev.tsv", "out_of_domain_dev.tsv"]})
    folder = Path(data_root) / "glue" / "CoLA"

    def rows() -> Iterator[tuple[str, list[str]]]:
        for name in names:
            for line, fields in _read_tsv(folder / name, header=False):
                yield f"{name}:{line}", fields

    examples = []
    for where, fields in islice(rows(), limit):
        _require(len(fields) == 4 and fields[1] in ("0", "1"), where, "expected source, label (0/1), mark, sentence")
        instruction = f"Sentence: {fields[3]}\nQuestion: Is this sentence grammatically acceptable? Answer yes or no.\n"
        examples.append(_glue_example(instruction, int(fields[1])))
    return TaskData("cola", split, examples)


Loader = Callable[..., TaskData]

TASKS: dict[str, Loader] = {
    "scienceqa": load_scienceqa,
    "commonsenseqa": load_commonsenseqa,
    "openbookqa": load_openbookqa,
    "mrpc": load_mrpc,
    "rte": load_rte,
    "cola": load_cola,
}

# The split each task is reported on (the paper family's evaluation split).
EVAL_SPLITS: dict[str, str] = {
    "scienceqa": "test",
    "commonsenseqa": "validation",
    "openbookqa": "test",
    "mrpc": "validation",
    "rte": "validation",
    "cola": "validation",
}


def load_task(name: str, data_root: str | os.PathLike, split: str = "train", limit: int | None = None) -> TaskData:
    """``TASKS[name](data_root, split, limit)`` with a readable error for an unknown name."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    data = TASKS[name](data_root, split, limit)
    logger.info("%s[%s]: %d examples", name, data.split, len(data))
    return data
