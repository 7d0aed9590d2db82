"""Training data: read records, tell their format, tokenize them with loss masks, collate.

Accepted inputs are JSONL files (one JSON object per line, blank lines skipped) and Hugging Face
``save_to_disk`` folders (read with pyarrow, no `datasets` needed). Each record is one of:

================  =========================================  ==================================
format            fields                                      loss on
================  =========================================  ==================================
``alpaca``        ``instruction``, ``output``, ``input``?     ``output`` (Alpaca prompt template)
``chat``          ``messages``: [{role, content}, ...]        the final assistant message
``completion``    ``prompt``, ``completion``                  ``completion``
``text``          ``text``                                    every token
================  =========================================  ==================================

A record is classified by the first of ``messages``, ``instruction``, ``prompt``/``completion``,
``text`` that it carries; other keys are ignored (so ScienceQA rows, with many extra columns,
read as ``alpaca``). Formats may be mixed in one file; that is logged, and reported by
`inspect_dataset`.

Tokenization: the prompt and the completion are tokenized separately and concatenated, so the
prompt's tokens are exactly those the model sees at inference (when it is given the prompt
alone), and the loss boundary is exact. EOS is appended to the completion.

Chat records: the prompt is every message before the final assistant message, rendered with the
tokenizer's chat template and ``add_generation_prompt=True`` (or, without a template, as
``role: content`` lines followed by ``assistant: ``); the completion is the final assistant
message's content. Earlier assistant turns are context only: they carry no loss.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
FORMATS = ("alpaca", "chat", "completion", "text")
ACCEPTED_SHAPES = (
    "{instruction, input?, output} (alpaca), {messages: [{role, content}]} (chat), "
    "{prompt, completion} (completion), {text} (text)"
)

# The Alpaca prompt template, as the MoLA authors' code uses it (with and without an input).
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """The Alpaca prompt for an instruction and an optional input (empty input = no input)."""
    if input:
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


# ---- format detection and validation ---------------------------------------------------------


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _require_str(record: dict, key: str, optional: bool = False) -> None:
    value = record.get(key)
    if value is None and optional:
        return
    if key not in record:
        raise ValueError(f"field '{key}' is missing")
    if not isinstance(value, str):
        raise ValueError(f"field '{key}' must be a string, got {_type_name(value)}")


def _require_some_text(record: dict, keys: tuple[str, ...]) -> None:
    # A row of empty strings is no example (as `{"text": ""}` is not): most likely a field
    # lost on the way, better named here than trained as "answer nothing to nothing".
    if not any(record.get(key) for key in keys):
        names = [f"'{key}'" for key in keys if key in record]
        raise ValueError(f"the record has no text: {', '.join(names[:-1])} and {names[-1]} are empty")


def empty_target(record: dict, fmt: str) -> bool:
    """Whether the row's completion (its `output`, `completion` or final assistant reply) is
    empty: it teaches only to end the answer at once, which a dataset rarely means to."""
    if fmt == "alpaca":
        return not record["output"]
    if fmt == "completion":
        return not record["completion"]
    if fmt == "chat":
        return not record["messages"][-1]["content"]
    return False


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"field 'messages' must be a non-empty list, got {_type_name(messages)}")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"field '{where}' must be an object, got {_type_name(message)}")
        for key in ("role", "content"):
            value = message.get(key)
            if not isinstance(value, str):
                raise ValueError(f"field '{where}.{key}' must be a string, got {_type_name(value)}")
        if not message["role"]:
            raise ValueError(f"field '{where}.role' must not be empty")
    if messages[-1]["role"] != "assistant":
        last = len(messages) - 1
        raise ValueError(f"field 'messages[{last}].role' must be 'assistant' (the reply to learn), got {messages[-1]['role']!r}")
    if len(messages) < 2:
        raise ValueError("field 'messages' needs at least one message before the final assistant reply")
    if not any(message["content"] for message in messages):
        raise ValueError("the record has no text: every message's 'content' is empty")


def detect_format(record: Any) -> str:
    """The format of one record ("alpaca", "chat", "completion" or "text"), after checking its
    fields. Raises ValueError naming the offending field (without a location: callers add it)."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {_type_name(record)}")
    if "messages" in record:
        _check_messages(record["messages"])
        return "chat"
    if "instruction" in record:
        _require_str(record, "instruction")
        _require_str(record, "input", optional=True)
        _require_str(record, "output")
        _require_some_text(record, ("instruction", "input", "output"))
        return "alpaca"
    if "prompt" in record or "completion" in record:
        _require_str(record, "prompt")
        _require_str(record, "completion")
        _require_some_text(record, ("prompt", "completion"))
        return "completion"
    if "text" in record:
        _require_str(record, "text")
        if not record["text"]:
            raise ValueError("field 'text' must not be empty")
        return "text"
    keys = ", ".join(sorted(map(str, record))[:8]) or "none"
    raise ValueError(f"unrecognised record (keys: {keys}); accepted formats: {ACCEPTED_SHAPES}")


# ---- reading sources --------------------------------------------------------------------------


@dataclass
class _Row:
    """One row of a source: its 1-based line (or row) number, and the record or the error."""

    line: int
    record: Any = None
    error: str | None = None


def _iter_jsonl(path: Path, max_bytes: int | None, max_row_bytes: int | None = None) -> Iterator[_Row]:
    """Rows of a JSONL file. Reads bytes and decodes line by line, so one undecodable line is
    one bad row, not a failed file. With ``max_bytes``, stops before the line that crosses it;
    a line longer than ``max_row_bytes`` is a bad row."""
    consumed = 0
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            consumed += len(raw)
            if max_bytes is not None and consumed > max_bytes:
                return
            if max_row_bytes is not None and len(raw.rstrip(b"\r\n")) > max_row_bytes:
                yield _Row(line_number, error=f"the row is {_size(len(raw))}, more than the {_size(max_row_bytes)} a row may have")
                continue
            if line_number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark, as some editors write
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                # Windows tools save "Unicode" text as UTF-16: a byte-order mark, then NULs
                # between ASCII letters. Saying so saves a puzzled user a search.
                utf16 = line_number == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff")
                hint = ": the file looks like UTF-16, save it as UTF-8" if utf16 else ""
                yield _Row(line_number, error=f"not valid UTF-8 ({e.reason} at byte {e.start}){hint}")
                continue
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                hint = " (a JSON array? write one object per line)" if line_number == 1 and text.strip() == "[" else ""
                yield _Row(line_number, error=f"not valid JSON ({e.msg} at column {e.colno}){hint}")
                continue
            except RecursionError:  # the parser recurses once per level of nesting
                yield _Row(line_number, error="JSON nested too deeply")
                continue
            yield _Row(line_number, record=record)


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.0f} KiB" if n >= 1024 else f"{n} bytes"


def _hf_split_dir(path: Path, split: str) -> Path:
    """The folder of one split of a ``save_to_disk`` dataset (a DatasetDict or a single split)."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise ValueError(f"{path.name}: no split {split!r}; it has {', '.join(map(str, splits)) or 'none'}")
        return path / split
    if (path / "state.json").is_file():
        return path
    raise ValueError(f"{path}: a directory, but not a Hugging Face save_to_disk dataset (no dataset_dict.json or state.json)")


def _iter_hf(path: Path, split: str) -> Iterator[_Row]:
    """Rows of a ``save_to_disk`` dataset, read from its Arrow IPC stream files with pyarrow."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    split_dir = _hf_split_dir(path, split)
    state = json.loads((split_dir / "state.json").read_text())
    names = [entry["filename"] for entry in state.get("_data_files", [])]
    files = [split_dir / n for n in names] or sorted(split_dir.glob("data-*.arrow"))
    if not files:
        raise ValueError(f"{split_dir}: no data-*.arrow files")
    row = 0
    for file in files:
        with pa.memory_map(str(file)) as source:
            table = ipc.open_stream(source).read_all()
        for record in table.to_pylist():
            row += 1
            yield _Row(row, record=record)


def _source_label(path: Path, split: str) -> str:
    """The short name errors start with: the file name, or ``folder[split]`` for HF datasets."""
    if path.is_dir():
        return f"{path.name}[{split}]" if (path / "dataset_dict.json").is_file() else path.name
    return path.name


def _iter_source(
    path: str | os.PathLike, split: str = "train", max_bytes: int | None = None, max_row_bytes: int | None = None
) -> tuple[str, Iterator[_Row]]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    label = _source_label(path, split)
    rows = _iter_hf(path, split) if path.is_dir() else _iter_jsonl(path, max_bytes, max_row_bytes)
    return label, rows


@dataclass
class _Checked:
    where: str
    record: dict
    format: str


def _checked_rows(path_or_records: str | os.PathLike | Sequence[dict], split: str) -> list[_Checked]:
    """Every row, validated; the first bad row raises ``ValueError("SOURCE:LINE: ...")``."""
    if isinstance(path_or_records, (str, os.PathLike)):
        label, rows = _iter_source(path_or_records, split)
    else:
        label = "<records>"
        rows = (_Row(i, record=r) for i, r in enumerate(path_or_records, start=1))
    checked = []
    for row in rows:
        where = f"{label}:{row.line}"
        if row.error is not None:
            raise ValueError(f"{where}: {row.error}")
        try:
            fmt = detect_format(row.record)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        checked.append(_Checked(where, row.record, fmt))
    counts = Counter(c.format for c in checked)
    if len(counts) > 1:
        logger.info("%s mixes record formats: %s", label, dict(counts))
    return checked


def read_records(path: str | os.PathLike, split: str = "train") -> list[dict]:
    """All records of a JSONL file or of one split of a HF ``save_to_disk`` folder, validated.

    Raises ``ValueError("FILE:LINE: ...")`` at the first malformed row (bad JSON, wrong field
    type, unknown shape); ``FileNotFoundError`` if the path does not exist.
    """
    return [c.record for c in _checked_rows(path, split)]


# ---- tokenization -----------------------------------------------------------------------------


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(record: dict, tokenizer: Any, fmt: str | None = None) -> tuple[str, str, bool]:
    """``(prompt, completion, prompt_has_special_tokens)`` for one record.

    The flag is True when the prompt text already contains the special tokens the model expects
    (a rendered chat template), so the tokenizer must not add its own (a second BOS).
    """
    fmt = fmt or detect_format(record)
    if fmt == "alpaca":
        return alpaca_prompt(record["instruction"], record.get("input")), record["output"], False
    if fmt == "completion":
        return record["prompt"], record["completion"], False
    if fmt == "text":
        return "", record["text"], False
    messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    context, reply = messages[:-1], messages[-1]["content"]
    if _has_chat_template(tokenizer):
        prompt = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
        return prompt, reply, True
    lines = "".join(f"{m['role']}: {m['content']}\n" for m in context)
    return lines + "assistant: ", reply, False


# Rows tokenized per call, at most: batched calls are what make a fast tokenizer fast, and a
# bounded batch bounds memory. The whole file in one call held every row's untruncated ids,
# attention mask and offsets at once: about a hundred bytes per token, gigabytes for an upload of
# tens of MB. A batch also ends once it holds ENCODE_BATCH_CHARS characters (long rows).
ENCODE_BATCH_ROWS = 512
ENCODE_BATCH_CHARS = 1 << 20


def _batches(pairs: Sequence[tuple[str, str, bool]]) -> Iterator[Sequence[tuple[str, str, bool]]]:
    start, chars = 0, 0
    for end, (prompt, completion, _) in enumerate(pairs, start=1):
        chars += len(prompt) + len(completion)
        if end - start == ENCODE_BATCH_ROWS or chars >= ENCODE_BATCH_CHARS:
            yield pairs[start:end]
            start, chars = end, 0
    if start < len(pairs):
        yield pairs[start:]


def _tokenize(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=add_special_tokens, return_attention_mask=False, return_token_type_ids=False)
    return list(encoded["input_ids"])


def iter_encoded_pairs(pairs: Sequence[tuple[str, str, bool]], tokenizer: Any) -> Iterator[tuple[list[int], list[int]]]:
    """Token ids ``(prompt_ids, completion_ids + [eos])`` for ``(prompt, completion, special)``
    triples from `render`, in order, tokenized a bounded batch of rows at a time: a caller
    that keeps only what it needs of each row (a cut example, a length) never holds more."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token first")
    for batch in _batches(pairs):
        prompt_ids: list[list[int]] = [[] for _ in batch]
        for already_special in (False, True):
            index = [i for i, p in enumerate(batch) if p[2] == already_special]
            for i, ids in zip(index, _tokenize(tokenizer, [batch[i][0] for i in index], not already_special)):
                prompt_ids[i] = list(ids)
        completion_ids = _tokenize(tokenizer, [p[1] for p in batch], False)
        for prompt, completion in zip(prompt_ids, completion_ids):
            yield prompt, list(completion) + [eos]


def encode_pairs(pairs: Sequence[tuple[str, str, bool]], tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """All of `iter_encoded_pairs` as a list."""
    return list(iter_encoded_pairs(pairs, tokenizer))


def build_example(prompt_ids: list[int], completion_ids: list[int], cutoff_len: int, train_on_inputs: bool = False) -> dict[str, list[int]] | None:
    """Concatenate, mask the prompt's labels, keep the first ``cutoff_len`` tokens.

    Returns None when no token is left to learn from. Position 0 never counts: a causal LM
    predicts token t from tokens < t, so a label on the first token is never used.
    """
    input_ids = (prompt_ids + completion_ids)[:cutoff_len]
    if train_on_inputs:
        labels = list(input_ids)
    else:
        labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:cutoff_len]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return {"input_ids": input_ids, "labels": labels}


@dataclass(frozen=True)
class GenerationRow:
    """A row to generate the completion of and score (`mola.evaluate.completion_match`)."""

    prompt: str
    prompt_ids: list[int]
    completion_ids: list[int]  # ends with EOS, as in training


def generation_rows(
    path_or_records: str | os.PathLike | Sequence[dict], tokenizer: Any, cutoff_len: int, limit: int | None = None, split: str = "train"
) -> list[GenerationRow]:
    """Of the first ``limit`` rows (all when None), those with a prompt whose prompt and
    completion fit in ``cutoff_len``: the rows a model trained at that cutoff saw whole (a
    ``text`` row has no prompt to generate from)."""
    checked = _checked_rows(path_or_records, split)[:limit]
    rendered = [render(c.record, tokenizer, c.format) for c in checked]
    return [
        GenerationRow(text[0], prompt_ids, completion_ids)
        for text, (prompt_ids, completion_ids) in zip(rendered, iter_encoded_pairs(rendered, tokenizer))
        if text[0] and len(prompt_ids) + len(completion_ids) <= cutoff_len
    ]


@dataclass
class TrainingDataStats:
    """What tokenizing a dataset for training kept and cut, as `load_training_data` did it.

    ``records`` were read; ``over_cutoff`` of them were longer than ``cutoff_len`` tokens (cut
    to it), and ``dropped_at_cutoff`` of those kept no trainable token (left out), so
    ``examples = records - dropped_at_cutoff``. Token counts are of the kept examples, after
    the cut; ``trainable_tokens`` counts the labels the loss uses (never position 0).
    """

    records: int
    examples: int
    over_cutoff: int
    dropped_at_cutoff: int
    total_tokens: int
    trainable_tokens: int
    mean_tokens: float
    max_tokens: int
    cutoff_len: int
    train_on_inputs: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainingData(list):
    """The training examples (a plain list of ``{"input_ids", "labels"}`` dicts, as before),
    with ``stats``: a `TrainingDataStats` of what tokenizing them kept and cut, and
    ``formats``: how many of the records read were of each format. Slices and copies are plain
    lists."""

    stats: TrainingDataStats
    formats: dict[str, int]


# How `mola.generate.prompt` dresses a bare prompt, named after the training format it
# matches: "alpaca" makes it the instruction of the Alpaca template, "chat" the user's turn of
# a conversation (the tokenizer's chat template), "raw" leaves it as it is.
PROMPT_TEMPLATES = ("alpaca", "chat", "raw")
TEMPLATE_OF_FORMAT = {"alpaca": "alpaca", "chat": "chat", "completion": "raw", "text": "raw"}


def prompt_template_for(formats: dict[str, int]) -> str | None:
    """The prompt template that renders a bare prompt as most of the training rows (their
    ``formats`` counts) were rendered; None without rows."""
    votes: Counter[str] = Counter()
    for fmt, count in formats.items():
        votes[TEMPLATE_OF_FORMAT[fmt]] += count
    return max(PROMPT_TEMPLATES, key=lambda t: votes[t]) if sum(votes.values()) else None


def _stats(examples: list[dict[str, list[int]]], records: int, over_cutoff: int, cutoff_len: int, train_on_inputs: bool) -> TrainingDataStats:
    lengths = [len(e["input_ids"]) for e in examples]
    return TrainingDataStats(
        records=records,
        examples=len(examples),
        over_cutoff=over_cutoff,
        dropped_at_cutoff=records - len(examples),
        total_tokens=sum(lengths),
        trainable_tokens=sum(sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in examples),
        mean_tokens=sum(lengths) / len(lengths) if lengths else 0.0,
        max_tokens=max(lengths, default=0),
        cutoff_len=cutoff_len,
        train_on_inputs=train_on_inputs,
    )


def load_training_data(
    path_or_records: str | os.PathLike | Sequence[dict],
    tokenizer: Any,
    cutoff_len: int = 256,
    train_on_inputs: bool = False,
    split: str = "train",
) -> TrainingData:
    """Read (a path) or take (a list of records) and tokenize into training examples.

    Returns ``[{"input_ids": [...], "labels": [...]}, ...]`` with labels ``-100`` on the prompt
    (unless ``train_on_inputs``), EOS appended to each completion, each example cut to its
    first ``cutoff_len`` tokens; examples left with no trainable token are dropped (logged).
    The list's ``stats`` (`TrainingDataStats`) counts what was cut and dropped.
    """
    if not isinstance(cutoff_len, int) or cutoff_len < 2:
        raise ValueError(f"cutoff_len must be an integer >= 2, got {cutoff_len!r}")
    rows = _checked_rows(path_or_records, split)
    pairs = []
    for row in rows:
        try:
            pairs.append(render(row.record, tokenizer, row.format))
        except Exception as e:  # a chat template may reject a conversation (e.g. a role)
            raise ValueError(f"{row.where}: cannot render the record: {e}") from e
    examples = TrainingData()
    over_cutoff = 0
    for prompt_ids, completion_ids in iter_encoded_pairs(pairs, tokenizer):
        over_cutoff += len(prompt_ids) + len(completion_ids) > cutoff_len
        example = build_example(prompt_ids, completion_ids, cutoff_len, train_on_inputs)
        if example is not None:
            examples.append(example)
    examples.stats = _stats(examples, len(rows), over_cutoff, cutoff_len, train_on_inputs)
    examples.formats = dict(Counter(row.format for row in rows))
    if examples.stats.dropped_at_cutoff:
        logger.warning("dropped %d of %d examples: no trainable token within cutoff_len=%d", examples.stats.dropped_at_cutoff, len(rows), cutoff_len)
    logger.info("tokenized %d examples (%d cut to cutoff_len=%d)", len(examples), over_cutoff, cutoff_len)
    return examples


def collate(batch: Sequence[dict[str, Sequence[int]]], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict[str, Any]:
    """Right-pad a list of examples into LongTensors ``input_ids``, ``attention_mask``,
    ``labels`` of shape (B, T); labels are -100 on padding. ``pad_to_multiple_of`` rounds T up
    (tensor cores like multiples of 8)."""
    import torch

    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set the tokenizer's pad token (or use its EOS id)")
    if not batch:
        raise ValueError("cannot collate an empty batch")
    length = max(len(example["input_ids"]) for example in batch)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for i, example in enumerate(batch):
        n = len(example["input_ids"])
        input_ids[i, :n] = torch.as_tensor(example["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.as_tensor(example.get("labels", example["input_ids"]), dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ---- inspection (upload validation) -----------------------------------------------------------


@dataclass
class DatasetReport:
    """What `inspect_dataset` found. Token statistics are None without a tokenizer.

    ``rows`` counts non-blank rows read; ``errors`` holds the first ``max_errors`` problems as
    ``{"line", "message"}`` and ``error_count`` all of them; ``truncated`` says reading stopped at
    ``max_bytes``. ``over_cutoff`` counts rows longer than ``cutoff_len`` tokens (they are cut),
    ``dropped_at_cutoff`` those that would keep no trainable token (they are dropped).
    ``empty_targets`` counts valid rows whose completion (output, final reply) is empty.
    ``unrenderable`` (with a tokenizer) lists the first ``max_errors`` rows the tokenizer could
    not render, its chat template refusing a conversation say, as ``{"line", "message"}``; they
    are errors too, and not among ``valid_rows``.
    """

    rows: int = 0
    valid_rows: int = 0
    format: str | None = None
    formats: dict[str, int] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    error_count: int = 0
    empty_targets: int = 0
    truncated: bool = False
    total_tokens: int | None = None
    mean_tokens: float | None = None
    max_tokens: int | None = None
    cutoff_len: int | None = None
    over_cutoff: int | None = None
    dropped_at_cutoff: int | None = None
    unrenderable: list[dict[str, Any]] | None = None

    @property
    def ok(self) -> bool:
        """True when every row is valid and there is at least one."""
        return self.valid_rows > 0 and self.error_count == 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _add_error(report: DatasetReport, line: int, message: str, max_errors: int) -> None:
    report.error_count += 1
    if len(report.errors) < max_errors:
        report.errors.append({"line": line, "message": message})


def _token_statistics(report: DatasetReport, rows: list[tuple[int, dict, str]], tokenizer: Any, cutoff_len: int, max_errors: int) -> None:
    """Fill the token fields of ``report``; rows the tokenizer cannot render become errors."""
    pairs = []
    report.unrenderable = []
    for line, record, fmt in rows:
        try:
            pairs.append(render(record, tokenizer, fmt))
        except Exception as e:  # noqa: BLE001 - a template error is a bad row, reported
            message = f"cannot render the record: {e}"
            _add_error(report, line, message, max_errors)
            if len(report.unrenderable) < max_errors:
                report.unrenderable.append({"line": line, "message": message})
            report.valid_rows -= 1
            report.formats[fmt] -= 1
    lengths, dropped = [], 0
    for prompt_ids, completion_ids in iter_encoded_pairs(pairs, tokenizer):
        lengths.append(len(prompt_ids) + len(completion_ids))
        dropped += build_example(prompt_ids, completion_ids, cutoff_len) is None
    report.total_tokens = sum(lengths)
    report.mean_tokens = report.total_tokens / len(lengths) if lengths else 0.0
    report.max_tokens = max(lengths, default=0)
    report.cutoff_len = cutoff_len
    report.over_cutoff = sum(n > cutoff_len for n in lengths)
    report.dropped_at_cutoff = dropped


def inspect_dataset(
    path: str | os.PathLike,
    tokenizer: Any = None,
    max_errors: int = 20,
    max_bytes: int | None = None,
    cutoff_len: int = 256,
    split: str = "train",
    max_row_bytes: int | None = None,
) -> DatasetReport:
    """Check a JSONL file or HF dataset without raising on bad rows: count rows, formats and
    problems, and with a tokenizer the token lengths (as `load_training_data` would make them).
    ``max_row_bytes`` makes longer JSONL lines errors (a service bounds what it tokenizes).

    Raises only for a missing path or an unreadable dataset folder, not for bad content.
    """
    label, rows = _iter_source(path, split, max_bytes, max_row_bytes)
    report = DatasetReport()
    good: list[tuple[int, dict, str]] = []
    for row in rows:
        report.rows += 1
        if row.error is not None:
            _add_error(report, row.line, row.error, max_errors)
            continue
        try:
            good.append((row.line, row.record, detect_format(row.record)))
        except ValueError as e:
            _add_error(report, row.line, str(e), max_errors)
    if max_bytes is not None and not Path(path).is_dir():
        report.truncated = Path(path).stat().st_size > max_bytes
    report.valid_rows = len(good)
    report.empty_targets = sum(empty_target(record, fmt) for _, record, fmt in good)
    report.formats = dict(Counter(fmt for _, _, fmt in good))
    if tokenizer is not None:
        _token_statistics(report, good, tokenizer, cutoff_len, max_errors)
    report.formats = {k: v for k, v in report.formats.items() if v}
    if len(report.formats) == 1:
        report.format = next(iter(report.formats))
    elif report.formats:
        report.format = "mixed"
    logger.info("%s: %d rows, %d valid, format %s, %d errors", label, report.rows, report.valid_rows, report.format, report.error_count)
    return report

