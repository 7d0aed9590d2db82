"""mola.data: reading, format detection, tokenization with loss masks, collation, inspection."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import torch
from tokenizers import processors

from mola.data import (
    ALPACA_PROMPT_INPUT,
    IGNORE_INDEX,
    alpaca_prompt,
    collate,
    detect_format,
    inspect_dataset,
    load_training_data,
    read_records,
    render,
)
from mola.tiny import byte_tokenizer

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
SCIENCEQA = DATA_ROOT / "scienceqa" / "mola_sample.hf"

GOOD = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"prompt": "Q: hi\nA:", "completion": " hello"},
]

# (bad JSONL line, text the error must contain after "bad.jsonl:4: ")
BAD_LINES = [
    ('{"instruction": "x", "output": 3}', "field 'output' must be a string, got int"),
    ('{"instruction": 1, "output": "y"}', "field 'instruction' must be a string, got int"),
    ('{"instruction": "x"}', "field 'output' is missing"),
    ('{"instruction": "x", "input": 5, "output": "y"}', "field 'input' must be a string, got int"),
    ('{"instruction": "x", "output": true}', "field 'output' must be a string, got bool"),
    ('{"messages": "hello"}', "field 'messages' must be a non-empty list, got str"),
    ('{"messages": []}', "field 'messages' must be a non-empty list"),
    ('{"messages": ["hi", "there"]}', "field 'messages[0]' must be an object, got str"),
    ('{"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "x"}]}', "field 'messages[0].content' must be a string, got int"),
    ('{"messages": [{"content": "q"}, {"role": "assistant", "content": "x"}]}', "field 'messages[0].role' must be a string, got null"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "field 'messages[0].role' must be 'assistant'"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "field 'messages' needs at least one message"),
    ('{"prompt": "x"}', "field 'completion' is missing"),
    ('{"completion": "x"}', "field 'prompt' is missing"),
    ('{"prompt": null, "completion": "y"}', "field 'prompt' must be a string, got null"),
    ('{"prompt": "x", "completion": ["y"]}', "field 'completion' must be a string, got list"),
    ('{"text": ""}', "field 'text' must not be empty"),
    ('{"instruction": "", "output": ""}', "the record has no text: 'instruction' and 'output' are empty"),
    ('{"instruction": "", "input": "", "output": ""}', "the record has no text: 'instruction', 'input' and 'output' are empty"),
    ('{"prompt": "", "completion": ""}', "the record has no text: 'prompt' and 'completion' are empty"),
    ('{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]}', "the record has no text: every message's 'content' is empty"),
    ('{"text": {"a": 1}}', "field 'text' must be a string, got dict"),
    ('{"question": "q", "answer": "a"}', "accepted formats: {instruction, input?, output}"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('"just a string"', "expected a JSON object, got str"),
    ('{"instruction": "x", "output": "y"', "not valid JSON ("),
    ("not json at all", "not valid JSON ("),
    ('{"text": ' + "[" * 20000 + "]" * 20000 + "}", "JSON nested too deeply"),  # not a RecursionError
]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def bos_tokenizer():
    """The byte tokenizer, but adding a BOS token like LLaMA tokenizers do, and a chat template
    that writes BOS as text: a chat prompt must then not get a second one."""
    tokenizer = byte_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tokenizer.bos_token_id)]
    )
    tokenizer.chat_template = "<|endoftext|>" + tokenizer.chat_template
    return tokenizer


# ---- malformed input -------------------------------------------------------------------------


def test_rows_with_an_empty_completion_are_valid_and_counted(tmp_path):
    rows = [
        {"instruction": "Say nothing.", "output": ""},
        {"instruction": "", "input": "context", "output": "an answer from the input alone"},
        {"prompt": "Silence: ", "completion": ""},
        {"prompt": "", "completion": "a completion with no prompt"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
        {"text": "plain text has no completion of its own"},
    ]
    path = write_jsonl(tmp_path / "empty.jsonl", [json.dumps(r) for r in rows])
    report = inspect_dataset(path, byte_tokenizer())
    assert (report.valid_rows, report.error_count, report.empty_targets) == (6, 0, 3) and report.ok
    assert report.to_dict()["empty_targets"] == 3
    assert len(load_training_data(path, byte_tokenizer())) == 6  # each still teaches where its answer ends


@pytest.mark.parametrize("line,expected", BAD_LINES, ids=[b[1][:40] for b in BAD_LINES])
def test_bad_line_is_reported_with_file_line_and_field(tmp_path, line, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(GOOD[0]), "", json.dumps(GOOD[1]), line])
    with pytest.raises(ValueError) as info:
        read_records(path)
    message = str(info.value)
    assert message.startswith("bad.jsonl:4: "), message
    assert expected in message
    # The same line through load_training_data, and through inspect_dataset (which never raises).
    with pytest.raises(ValueError, match="bad.jsonl:4: "):
        load_training_data(path, byte_tokenizer())
    report = inspect_dataset(path, byte_tokenizer())
    assert (report.rows, report.valid_rows, report.error_count) == (3, 2, 1)
    assert report.errors[0]["line"] == 4 and expected in report.errors[0]["message"]
    assert not report.ok


def test_invalid_utf8_line_is_one_bad_row(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD[0]).encode() + b"\n" + '{"text": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match=r"latin1.jsonl:2: not valid UTF-8"):
        read_records(path)
    assert inspect_dataset(path).valid_rows == 1


def test_in_memory_records_are_validated_too():
    with pytest.raises(ValueError, match=r"<records>:2: field 'completion' is missing"):
        load_training_data([GOOD[1], {"prompt": "x"}], byte_tokenizer())


def test_missing_path_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_records(tmp_path / "nope.jsonl")


# ---- formats and tokenization ----------------------------------------------------------------

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye?"},
        {"role": "assistant", "content": "Goodbye."},
    ]
}
CHATML_PROMPT = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
    "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye?<|im_end|>\n<|im_start|>assistant\n"
)
PLAIN_CHAT_PROMPT = "system: Be brief.\nuser: Hi?\nassistant: Hello.\nuser: Bye?\nassistant: "

# (record, format, expected prompt text, expected completion text, chat template on?)
ROUND_TRIPS = [
    (
        {"instruction": "Add.", "input": "2 and 3", "output": "5"},
        "alpaca",
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n",
        "5",
        True,
    ),
    (
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        "alpaca",
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSay hi.\n\n### Response:\n",
        "hi",
        True,
    ),
    ({"instruction": "Say hi.", "output": "hi"}, "alpaca", alpaca_prompt("Say hi."), "hi", True),
    ({"prompt": "2+2=", "completion": "4"}, "completion", "2+2=", "4", True),
    ({"text": "Just some text."}, "text", "", "Just some text.", True),
    (CHAT, "chat", CHATML_PROMPT, "Goodbye.", True),
    (CHAT, "chat", PLAIN_CHAT_PROMPT, "Goodbye.", False),
]


@pytest.mark.parametrize("record,fmt,prompt,completion,templated", ROUND_TRIPS)
def test_format_round_trips_with_labels_on_the_completion(record, fmt, prompt, completion, templated):
    tokenizer = byte_tokenizer()
    if not templated:
        tokenizer.chat_template = None
    assert detect_format(record) == fmt
    assert render(record, tokenizer)[:2] == (prompt, completion)
    (example,) = load_training_data([record], tokenizer, cutoff_len=1024)
    eos = tokenizer.eos_token
    assert tokenizer.decode(example["input_ids"]) == prompt + completion + eos
    labelled = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == completion + eos
    # The labelled tokens are exactly the tail: the prompt is masked, nothing else is.
    assert example["labels"][-len(labelled):] == example["input_ids"][-len(labelled):]
    assert all(t == IGNORE_INDEX for t in example["labels"][: -len(labelled)])


def test_text_format_trains_on_every_token():
    (example,) = load_training_data([{"text": "abc"}], byte_tokenizer())
    assert example["labels"] == example["input_ids"]


def test_train_on_inputs_labels_everything():
    (example,) = load_training_data([GOOD[0]], byte_tokenizer(), train_on_inputs=True)
    assert example["labels"] == example["input_ids"]


def test_alpaca_prompt_uses_the_input_template_only_with_an_input():
    assert alpaca_prompt("do", "this") == ALPACA_PROMPT_INPUT.format(instruction="do", input="this")
    assert "### Input:" not in alpaca_prompt("do", "") and "### Input:" not in alpaca_prompt("do", None)


def test_bos_added_once_for_plain_prompts_and_never_twice_for_chat():
    tokenizer = bos_tokenizer()
    bos = tokenizer.bos_token_id
    plain, chat = load_training_data([GOOD[1], CHAT], tokenizer)
    assert plain["input_ids"][0] == bos and plain["input_ids"].count(bos) == 1
    assert chat["input_ids"][0] == bos and chat["input_ids"].count(bos) == 1
    assert tokenizer.decode([t for t in chat["labels"] if t != IGNORE_INDEX]) == "Goodbye.<|im_end|>"


def test_earlier_assistant_turns_carry_no_loss():
    (example,) = load_training_data([CHAT], byte_tokenizer())
    labelled = byte_tokenizer().decode([t for t in example["labels"] if t != IGNORE_INDEX])
    assert labelled == "Goodbye.<|im_end|>"  # "Hello." is context only


def test_truncation_keeps_the_start_and_drops_examples_without_trainable_tokens(caplog):
    tokenizer = byte_tokenizer()
    long_completion = {"prompt": "abcd", "completion": "0123456789"}
    long_prompt = {"prompt": "x" * 20, "completion": "y"}
    full = load_training_data([long_completion], tokenizer, cutoff_len=1024)[0]
    with caplog.at_level(logging.WARNING, logger="mola.data"):
        examples = load_training_data([long_completion, long_prompt], tokenizer, cutoff_len=8)
    assert len(examples) == 1
    assert examples[0]["input_ids"] == full["input_ids"][:8]
    assert examples[0]["labels"] == [IGNORE_INDEX] * 4 + full["input_ids"][4:8]
    assert "dropped 1 of 2 examples" in caplog.text
    assert examples.stats.to_dict() == {
        "records": 2, "examples": 1, "over_cutoff": 2, "dropped_at_cutoff": 1,
        "total_tokens": 8, "trainable_tokens": 4, "mean_tokens": 8.0, "max_tokens": 8,
        "cutoff_len": 8, "train_on_inputs": False,
    }
    # Exactly one completion token left after the prompt still counts as trainable.
    assert len(load_training_data([long_prompt], tokenizer, cutoff_len=21)) == 1
    assert load_training_data([long_prompt], tokenizer, cutoff_len=20) == []


def test_training_data_is_a_list_whose_stats_count_what_the_loss_uses():
    tokenizer = byte_tokenizer()
    records = [{"prompt": "ab", "completion": "cd"}, {"text": "xyz"}]
    data = load_training_data(records, tokenizer, cutoff_len=64)
    lengths = [len(e["input_ids"]) for e in data]
    trainable = sum(sum(t != IGNORE_INDEX for t in e["labels"][1:]) for e in data)
    assert isinstance(data, list) and lengths == [5, 4]  # EOS appended to each completion
    assert (data.stats.records, data.stats.examples, data.stats.over_cutoff, data.stats.dropped_at_cutoff) == (2, 2, 0, 0)
    assert (data.stats.total_tokens, data.stats.trainable_tokens, data.stats.max_tokens) == (9, trainable, 5) and trainable == 3 + 3
    every_token = load_training_data(records, tokenizer, cutoff_len=64, train_on_inputs=True).stats
    assert every_token.trainable_tokens == 4 + 3 and every_token.train_on_inputs
    assert type(data[:1]) is list and json.loads(json.dumps(data.stats.to_dict()))["examples"] == 2


@pytest.mark.parametrize("cutoff_len", [0, 1, 2.5, "256"])
def test_cutoff_len_is_validated(cutoff_len):
    with pytest.raises(ValueError, match="cutoff_len"):
        load_training_data([GOOD[1]], byte_tokenizer(), cutoff_len=cutoff_len)


def test_mixed_formats_load_and_are_logged(tmp_path, caplog):
    path = write_jsonl(tmp_path / "mixed.jsonl", [json.dumps(r) for r in [*GOOD, {"text": "t"}, CHAT]])
    with caplog.at_level(logging.INFO, logger="mola.data"):
        examples = load_training_data(path, byte_tokenizer())
    assert len(examples) == 4
    assert "mixes record formats" in caplog.text


# ---- Hugging Face save_to_disk folders -------------------------------------------------------


def write_hf_split(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": None}))


def test_hf_dataset_dict_and_single_split(tmp_path):
    root = tmp_path / "ds.hf"
    write_hf_split(root / "train", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}])
    write_hf_split(root / "test", [{"text": "only one"}])
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert read_records(root) == [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    assert read_records(root, split="test") == [{"text": "only one"}]
    assert read_records(root / "test") == [{"text": "only one"}]
    with pytest.raises(ValueError, match="no split 'validation'; it has train, test"):
        read_records(root, split="validation")
    report = inspect_dataset(root, split="test")
    assert (report.rows, report.format) == (1, "text")


def test_hf_bad_row_names_the_split_and_row(tmp_path):
    root = tmp_path / "ds.hf"
    write_hf_split(root / "train", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}])
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    with pytest.raises(ValueError, match=r"ds.hf\[train\]:2: field 'completion' must be a string, got null"):
        read_records(root)


def test_directory_that_is_not_a_dataset(tmp_path):
    with pytest.raises(ValueError, match="not a Hugging Face save_to_disk dataset"):
        read_records(tmp_path)


@pytest.mark.skipif(not SCIENCEQA.is_dir(), reason=f"shared data not found at {SCIENCEQA}")
def test_scienceqa_sample_reads_as_alpaca():
    records = read_records(SCIENCEQA, split="validation")
    assert len(records) == 200
    assert records[0]["output"].startswith("Answer: The answer is ")
    examples = load_training_data(records[:16], byte_tokenizer(), cutoff_len=2048)
    tokenizer = byte_tokenizer()
    for record, example in zip(records, examples):
        assert tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX]) == record["output"] + "<|im_end|>"


# ---- collate ---------------------------------------------------------------------------------


def test_collate_pads_right_with_masks():
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = collate(batch, pad_token_id=0)
    assert {k: v.dtype for k, v in out.items()} == dict.fromkeys(("input_ids", "attention_mask", "labels"), torch.long)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert collate(batch, pad_token_id=0, pad_to_multiple_of=8)["input_ids"].shape == (2, 8)


def test_collate_rejects_missing_pad_and_empty_batch():
    with pytest.raises(ValueError, match="pad_token_id"):
        collate([{"input_ids": [1], "labels": [1]}], pad_token_id=None)
    with pytest.raises(ValueError, match="empty"):
        collate([], pad_token_id=0)


# ---- inspect_dataset -------------------------------------------------------------------------


def test_inspect_dataset_counts_formats_errors_and_tokens(tmp_path):
    lines = [json.dumps(GOOD[0]), "", json.dumps(GOOD[1]), "{broken", json.dumps({"text": "z" * 300}), '{"x": 1}', json.dumps(CHAT)]
    path = write_jsonl(tmp_path / "upload.jsonl", lines)
    tokenizer = byte_tokenizer()
    report = inspect_dataset(path, tokenizer, cutoff_len=256)
    assert (report.rows, report.valid_rows, report.error_count) == (6, 4, 2)
    assert [e["line"] for e in report.errors] == [4, 6]
    assert report.format == "mixed"
    assert report.formats == {"alpaca": 1, "completion": 1, "text": 1, "chat": 1}
    good = [json.loads(lines[i]) for i in (0, 2, 4, 6)]
    lengths = [len(e["input_ids"]) for e in load_training_data(good, tokenizer, cutoff_len=10_000)]
    assert report.total_tokens == sum(lengths) and report.max_tokens == max(lengths) == 301
    assert report.mean_tokens == pytest.approx(sum(lengths) / 4)
    assert report.over_cutoff == 1 and report.dropped_at_cutoff == 0
    as_dict = json.loads(json.dumps(report.to_dict()))  # JSON-ready for the REST API
    assert as_dict["ok"] is False and as_dict["errors"][0]["message"].startswith("not valid JSON")


# A strict chat template, as some models ship: it refuses a conversation whose turns do not
# alternate between the user and the assistant (a system turn first is allowed).
STRICT_CHAT_TEMPLATE = (
    "{% set offset = 1 if messages[0]['role'] == 'system' else 0 %}"
    "{% for m in messages %}{% if m['role'] != 'system' and (m['role'] == 'user') != ((loop.index0 - offset) % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_rows_the_chat_template_refuses_are_named_by_line(tmp_path):
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = STRICT_CHAT_TEMPLATE
    twice = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "user", "content": "Hi??"}, {"role": "assistant", "content": "Yes."}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [json.dumps(CHAT), json.dumps(twice), "{broken", json.dumps(twice), json.dumps(GOOD[0])])
    report = inspect_dataset(path, tokenizer)
    refused = "cannot render the record: Conversation roles must alternate user/assistant"
    assert report.unrenderable == [{"line": 2, "message": refused}, {"line": 4, "message": refused}]
    assert (report.rows, report.valid_rows, report.error_count, report.formats) == (5, 2, 3, {"chat": 1, "alpaca": 1})
    assert [e["line"] for e in report.errors] == [3, 2, 4]  # what reading found, then what rendering did
    assert inspect_dataset(path, tokenizer, max_errors=1).unrenderable == [{"line": 2, "message": refused}]
    assert inspect_dataset(path).unrenderable is None  # no tokenizer, no rendering
    assert inspect_dataset(write_jsonl(tmp_path / "ok.jsonl", [json.dumps(CHAT)]), tokenizer).unrenderable == []


def test_inspect_dataset_without_tokenizer_caps_errors_and_bytes(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [json.dumps(GOOD[1])] + ["{bad"] * 30)
    report = inspect_dataset(path, max_errors=5)
    assert report.error_count == 30 and len(report.errors) == 5
    assert report.total_tokens is None and report.format == "completion"
    first_line = len(json.dumps(GOOD[1])) + 1
    partial = inspect_dataset(path, max_bytes=first_line + 3)  # "{bad\n" is 5 bytes: cut inside line 2
    assert (partial.rows, partial.truncated, partial.ok) == (1, True, True)


def test_inspect_single_format_file_is_ok(tmp_path):
    path = write_jsonl(tmp_path / "ok.jsonl", [json.dumps(GOOD[1])] * 3)
    report = inspect_dataset(path, byte_tokenizer())
    assert report.ok and report.format == "completion" and report.valid_rows == 3


def test_inspect_dataset_refuses_rows_over_max_row_bytes(tmp_path):
    short, long = json.dumps({"text": "a" * 100}), json.dumps({"text": "b" * 3000})
    path = write_jsonl(tmp_path / "long.jsonl", [short, long, short])
    report = inspect_dataset(path, byte_tokenizer(), max_row_bytes=2048)
    assert (report.rows, report.valid_rows, report.error_count) == (3, 2, 1)
    assert report.errors == [{"line": 2, "message": "the row is 3 KiB, more than the 2 KiB a row may have"}]
    assert inspect_dataset(path, max_row_bytes=len(long)).ok  # the limit is on the row, not its newline


def test_tokenizing_in_batches_equals_one_row_at_a_time(monkeypatch):
    # Rows are tokenized a bounded batch at a time (a whole upload at once took gigabytes):
    # batches split by row count and by characters give each row what it gets alone.
    import mola.data

    tokenizer = byte_tokenizer()
    records = [{"prompt": f"question {i}: " + "x" * (i * 37 % 200), "completion": "y" * (i % 7 + 1)} for i in range(23)]
    records += [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "z" * i}]} for i in range(1, 6)]
    alone = [example for record in records for example in load_training_data([record], tokenizer, cutoff_len=128)]
    monkeypatch.setattr(mola.data, "ENCODE_BATCH_ROWS", 4)
    monkeypatch.setattr(mola.data, "ENCODE_BATCH_CHARS", 300)
    assert load_training_data(records, tokenizer, cutoff_len=128) == alone
    batches = list(mola.data._batches([render(r, tokenizer) for r in records]))
    assert len(batches) > len(records) / 4 and sum(map(len, batches)) == len(records)


def test_generation_rows_are_the_first_rows_with_a_prompt_that_fit_whole():
    from mola.data import generation_rows

    tokenizer = byte_tokenizer()
    records = [
        {"prompt": "Q: one? ", "completion": "A"},
        {"text": "no prompt to generate from"},
        {"prompt": "Q: long? ", "completion": "x" * 300},  # prompt and completion pass cutoff_len
        {"instruction": "Name a colour.", "output": "Blue."},
        {"prompt": "Q: after the limit? ", "completion": "B"},
    ]
    rows = generation_rows(records, tokenizer, cutoff_len=256, limit=4)
    assert [row.prompt for row in rows] == ["Q: one? ", alpaca_prompt("Name a colour.")]
    first = rows[0]
    assert first.prompt_ids == tokenizer("Q: one? ")["input_ids"]
    assert first.completion_ids == tokenizer("A", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(generation_rows(records, tokenizer, cutoff_len=256)) == 3


def test_a_utf16_file_is_named_as_such(tmp_path):
    path = tmp_path / "notepad.jsonl"
    path.write_bytes(json.dumps({"prompt": "p", "completion": "c"}).encode("utf-16"))  # with its byte-order mark
    with pytest.raises(ValueError, match=r"notepad.jsonl:1: not valid UTF-8 \(.*\): the file looks like UTF-16, save it as UTF-8$"):
        read_records(path)
