"""`mola.generate` and `mola generate`: an adapter (folder or the service's .tar.gz), MoLA or
LoRA, loaded onto its base model generates what the model it was saved from generates, from
prompts formatted as training formatted them."""

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from mola import MolaConfig, get_mola_model
from mola.cli import main
from mola.data import load_training_data, prompt_template_for, read_records, render
from mola.evaluate import generate_ids, pad_token_id, records_loss
from mola.generate import adapter_folder, adapter_kind, attach_adapter, carries_adapter, encode_prompts, generate, open_adapter, prompt, reference_rows
from mola.lora import get_lora_model
from mola.models import load_base_model
from mola.train import TrainConfig, recorded_prompt_template, save_adapter, train

ROWS = [{"instruction": "Say the fruit.", "output": "banana"}, {"instruction": "Say the colour.", "output": "purple"}]


def pack(folder: Path, archive: Path) -> Path:
    """A .tar.gz like the service's download: the adapter's files at the top level, a card."""
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.glob("adapter_*")):
            tar.add(path, arcname=path.name)
        card = b"# adapter\n"
        info = tarfile.TarInfo("README.md")
        info.size = len(card)
        tar.addfile(info, io.BytesIO(card))
    return archive


def perturbed(model: torch.nn.Module, name_part: str) -> torch.nn.Module:
    """B starts at zero (the adapter adds nothing): give the adapter weights something to say."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name_part in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model


def test_prompts_are_rendered_as_training_rendered_their_format():
    _, tokenizer = load_base_model("tiny-llama")
    text, special = prompt("Name a prime.", tokenizer)
    assert (text, special) == render({"instruction": "Name a prime.", "output": "x"}, tokenizer)[::2]
    with_input = prompt("Add them.", tokenizer, input="2 3")[0]
    assert with_input == render({"instruction": "Add them.", "input": "2 3", "output": "5"}, tokenizer)[0]
    assert "### Input:\n2 3" in with_input
    chat, special = prompt("hi", tokenizer, "chat")
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" and special  # the tokenizer's template
    assert encode_prompts([(chat, special)], tokenizer)[0] == tokenizer(chat, add_special_tokens=False)["input_ids"]
    assert prompt("as it is", tokenizer, "raw") == ("as it is", False)
    with pytest.raises(ValueError, match="unknown template 'jinja'"):
        prompt("x", tokenizer, "jinja")
    with pytest.raises(ValueError, match="alpaca template only"):
        prompt("x", tokenizer, "chat", input="y")
    # An empty prompt is no malformed data row: each template still renders its frame.
    assert prompt("", tokenizer, "raw") == ("", False)
    assert prompt("", tokenizer, "chat")[0] == "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"
    assert prompt("", tokenizer)[0].endswith("### Response:\n")


@pytest.mark.parametrize("kind", ["mola", "lora"])
def test_a_loaded_adapter_generates_what_the_saved_model_generated(tmp_path, kind):
    base, tokenizer = load_base_model("tiny-llama")
    if kind == "mola":
        model = perturbed(get_mola_model(base, MolaConfig(experts=[2, 2, 3, 3], top_k=2, dropout=0.0)), "lora_B")
        model.save_pretrained(tmp_path / "adapter")
    else:
        model = perturbed(get_lora_model(base, rank=4, dropout=0.0), "lora_B")
        save_adapter(model, tmp_path / "adapter")
    model.eval()
    prompts = [prompt("Say the fruit.", tokenizer), prompt("Count to three, slowly please.", tokenizer)]
    ids = encode_prompts(prompts, tokenizer)
    expected = tokenizer.batch_decode(generate_ids(model, ids, [12, 12], pad_token_id(tokenizer), tokenizer.eos_token_id), skip_special_tokens=True)
    base_only = tokenizer.batch_decode(
        generate_ids(load_base_model("tiny-llama")[0], ids, [12, 12], pad_token_id(tokenizer), tokenizer.eos_token_id), skip_special_tokens=True
    )
    assert expected != base_only  # the adapter changes what comes out

    archive = pack(tmp_path / "adapter", tmp_path / "adapter.tar.gz")
    for path in (tmp_path / "adapter", archive):
        assert adapter_kind(tmp_path / "adapter") == kind
        with open_adapter(path) as adapter:
            assert (adapter.kind, adapter.base_model) == (kind, "tiny-llama")
            assert not adapter.model.training
            assert generate(adapter.model, adapter.tokenizer, prompts, max_new_tokens=12) == expected


def test_one_base_model_carries_one_adapter_after_another(tmp_path):
    """`attach_adapter` takes each adapter off again: a base model loaded once answers as a
    freshly loaded one with each adapter, MoLA and LoRA in turn, and as itself in between."""
    base, tokenizer = load_base_model("tiny-llama")
    prompts = [prompt("Say the fruit.", tokenizer), prompt("Count to three.", tokenizer)]
    mola = perturbed(get_mola_model(load_base_model("tiny-llama")[0], MolaConfig(experts="2233", dropout=0.0)), "lora_B")
    mola.save_pretrained(tmp_path / "mola")
    lora = perturbed(get_lora_model(load_base_model("tiny-llama")[0], rank=4, dropout=0.0), "lora_B")
    save_adapter(lora, tmp_path / "lora")
    expected = {}
    for name in ("mola", "lora"):
        with open_adapter(tmp_path / name) as adapter:
            expected[name] = generate(adapter.model, adapter.tokenizer, prompts, max_new_tokens=10)
    alone = generate(base, tokenizer, prompts, max_new_tokens=10)
    assert len({tuple(alone), *(tuple(texts) for texts in expected.values())}) == 3  # each adapter has its say

    archive = pack(tmp_path / "mola", tmp_path / "mola.tar.gz")
    for path, name in ((archive, "mola"), (tmp_path / "lora", "lora"), (tmp_path / "mola", "mola")):
        with attach_adapter(path, base, tokenizer, "tiny-llama") as adapter:
            assert (adapter.kind, adapter.base_model, adapter.tokenizer) == (name, "tiny-llama", tokenizer)
            assert carries_adapter(base) and not adapter.model.training
            assert generate(adapter.model, tokenizer, prompts, max_new_tokens=10) == expected[name]
            with pytest.raises(ValueError, match="already carries an adapter"):
                with attach_adapter(tmp_path / "lora", base, tokenizer, "tiny-llama"):
                    pass
        assert not carries_adapter(base)
        assert generate(base, tokenizer, prompts, max_new_tokens=10) == alone


def test_an_adapter_is_taken_off_when_the_block_fails(tmp_path):
    base, tokenizer = load_base_model("tiny-llama")
    get_mola_model(load_base_model("tiny-llama")[0], MolaConfig(experts="2")).save_pretrained(tmp_path / "adapter")
    with pytest.raises(RuntimeError, match="in the block"):
        with attach_adapter(tmp_path / "adapter", base, tokenizer, "tiny-llama"):
            raise RuntimeError("in the block")
    assert not carries_adapter(base)


def test_sampling_is_repeatable_with_a_seed_and_checked():
    base, tokenizer = load_base_model("tiny-llama")
    prompts = [prompt("Tell a story.", tokenizer)]
    first = generate(base, tokenizer, prompts, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    assert first == generate(base, tokenizer, prompts, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    assert len({generate(base, tokenizer, prompts, max_new_tokens=16, temperature=1.5, seed=s)[0] for s in range(4)}) > 1
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(base, tokenizer, prompts, temperature=-1.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        generate(base, tokenizer, prompts, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        generate(base, tokenizer, prompts, max_new_tokens=0)


def test_generation_stops_where_the_models_positions_end():
    base, tokenizer = load_base_model("tiny-llama")  # 512 positions, one token per byte
    long = [prompt("a" * 510, tokenizer, "raw")]
    assert len(generate(base, tokenizer, long, max_new_tokens=50)[0]) <= 2  # a byte per token, a character per byte at most
    with pytest.raises(ValueError, match="prompt 0 has 512 tokens: it leaves no room in the model's 512 positions"):
        generate(base, tokenizer, [prompt("a" * 512, tokenizer, "raw")])
    with pytest.raises(ValueError, match="row 7 has 512 tokens"):  # named as the caller knows it
        generate(base, tokenizer, [long[0], prompt("a" * 512, tokenizer, "raw")], names=["row 3", "row 7"])


def test_generation_reports_its_progress_after_each_batch():
    base, tokenizer = load_base_model("tiny-llama")
    prompts = [prompt(f"Say {i}: ", tokenizer, "raw") for i in range(5)]
    calls = []
    texts = generate(base, tokenizer, prompts, max_new_tokens=2, batch_size=2, on_progress=lambda done, total: calls.append((done, total)))
    assert len(texts) == 5 and calls == [(2, 5), (4, 5), (5, 5)]


def test_reference_rows_are_the_records_with_a_prompt_rendered_as_training_renders_them():
    _, tokenizer = load_base_model("tiny-llama")
    records = [
        {"instruction": "Add 2 and 3.", "input": "", "output": "The answer is 5"},
        {"text": "a story without a prompt"},
        {"prompt": "Say 3: ", "completion": "3"},
    ]
    rows = reference_rows(records, tokenizer)
    assert [(r.row, r.reference) for r in rows] == [(1, "The answer is 5"), (3, "3")]
    assert [(r.prompt, r.special) for r in rows] == [render(records[0], tokenizer)[::2], render(records[2], tokenizer)[::2]]


def test_archives_that_are_not_an_adapters_files_are_refused(tmp_path):
    climbing = tmp_path / "climbing.tar.gz"
    with tarfile.open(climbing, "w:gz") as tar:
        info = tarfile.TarInfo("../adapter_config.json")
        tar.addfile(info, io.BytesIO(b""))
    nested = tmp_path / "nested.tar.gz"
    with tarfile.open(nested, "w:gz") as tar:
        info = tarfile.TarInfo("adapter/adapter_config.json")
        tar.addfile(info, io.BytesIO(b""))
    for archive in (climbing, nested):
        with pytest.raises(ValueError, match="holds more than an adapter's files"):
            with adapter_folder(archive):
                pass
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither an adapter folder nor a .tar.gz"):
        with adapter_folder(tmp_path / "notes.txt"):
            pass
    with pytest.raises(FileNotFoundError, match="no adapter at"):
        with adapter_folder(tmp_path / "missing.tar.gz"):
            pass
    with pytest.raises(FileNotFoundError, match="not an adapter"):
        adapter_kind(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="neither a MoLA nor a LoRA adapter"):
        adapter_kind(tmp_path)


def test_the_unpacked_archive_is_removed_afterwards(tmp_path):
    base, _ = load_base_model("tiny-llama")
    get_mola_model(base, MolaConfig(experts="2")).save_pretrained(tmp_path / "adapter")
    with adapter_folder(pack(tmp_path / "adapter", tmp_path / "a.tar.gz")) as folder:
        assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert not folder.exists()


def test_cli_a_trained_adapter_answers_its_training_prompts(tmp_path, capsys, monkeypatch):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 4))
    trained = main(
        ["train", "--model", "tiny-llama", "--data", str(data), "--output", str(tmp_path / "adapter"), "--experts", "2", "--max-steps", "60",
         "--batch-size", "8", "--micro-batch-size", "8", "--lr", "3e-3", "--warmup-steps", "0", "--lr-schedule", "constant", "--dropout", "0"]
    )  # fmt: skip
    assert trained == 0
    archive = pack(tmp_path / "adapter", tmp_path / "job-adapter.tar.gz")
    capsys.readouterr()

    assert main(["generate", str(archive), "--prompt", "Say the fruit.", "--prompt", "Say the colour.", "--max-new-tokens", "20"]) == 0
    assert capsys.readouterr().out == "### 1\nbanana\n### 2\npurple\n"
    assert main(["generate", str(tmp_path / "adapter"), "--prompt", "Say the fruit."]) == 0
    assert capsys.readouterr().out == "banana\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("Say the colour.\n"))  # `echo ... |`: the newline is not the prompt's
    assert main(["generate", str(archive), "--prompt", "-"]) == 0
    assert capsys.readouterr().out == "purple\n"

    # A test file in the training formats: prompts rendered as in training, references scored;
    # a text row has no prompt and is left out, saying so.
    test = tmp_path / "test.jsonl"
    rows = [*ROWS, {"instruction": "Say the fruit.", "output": "The answer is banana"}, {"text": "no prompt here"}]
    test.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = tmp_path / "generated.json"
    assert main(["generate", str(archive), "--data", str(test), "--json", str(report)]) == 0
    out, err = capsys.readouterr()
    assert "1 of 4 rows have no prompt (text rows) and are left out" in err
    assert "reference: banana\ngenerated: banana" in out and "exact match 66.7% of 3 rows" in out
    saved = json.loads(report.read_text())
    assert (saved["kind"], saved["base_model"], saved["settings"]["template"]) == ("mola", "tiny-llama", "alpaca")
    assert [r["generated"] for r in saved["rows"]] == ["banana", "purple", "banana"]
    assert saved["rows"][0]["prompt"] == render(ROWS[0], None)[0]
    records = read_records(test)
    with open_adapter(archive) as adapter:  # the loss: all four rows, as training tokenizes them
        loss = records_loss(adapter.model, adapter.tokenizer, records)
        with_prompts = records_loss(adapter.model, adapter.tokenizer, records, cutoff_len=12, train_on_inputs=True)
    assert saved["scores"] == {"n": 3, "exact_match": pytest.approx(2 / 3), "answers_expected": 1, "answer_accuracy": 0.0, **loss}
    assert f"; loss {loss['loss']:.4f} over {loss['loss_tokens']} tokens" in out
    assert main(["generate", str(archive), "--data", str(test), "--cutoff-len", "12", "--train-on-inputs", "--json", str(report)]) == 0
    assert {k: json.loads(report.read_text())["scores"][k] for k in ("loss", "loss_tokens")} == with_prompts

    # `mola analyze` takes the archive too.
    assert main(["analyze", str(archive)]) == 0
    assert "distance / norm" in capsys.readouterr().out


def test_cli_errors_name_the_flag(tmp_path, capsys, monkeypatch):
    base, _ = load_base_model("tiny-llama")
    get_mola_model(base, MolaConfig(experts="2")).save_pretrained(tmp_path / "adapter")
    adapter = str(tmp_path / "adapter")
    assert main(["generate", adapter, "--prompt", "x", "--template", "chat", "--input", "y"]) == 2
    assert "--input goes with --template alpaca, not chat" in capsys.readouterr().err
    (tmp_path / "texts.jsonl").write_text('{"text": "only text"}\n')
    assert main(["generate", adapter, "--data", str(tmp_path / "texts.jsonl")]) == 2
    assert "no row with a prompt to generate from" in capsys.readouterr().err
    assert main(["generate", adapter, "--data", str(tmp_path / "texts.jsonl"), "--limit", "0"]) == 2
    assert "--limit must be at least 1, got 0" in capsys.readouterr().err
    assert main(["generate", adapter, "--data", str(tmp_path / "texts.jsonl"), "--cutoff-len", "1"]) == 2
    assert "--cutoff-len must be at least 2 (a token and the next to predict), got 1" in capsys.readouterr().err
    assert main(["generate", adapter, "--prompt", "x", "--train-on-inputs"]) == 2
    assert "--cutoff-len and --train-on-inputs go with --data" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
    assert "no adapter at" in capsys.readouterr().err

    def refusing_template(record, tokenizer, fmt=None):
        raise RuntimeError("Conversation roles must alternate")  # what a strict chat template raises

    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")
    monkeypatch.setattr("mola.generate.render", refusing_template)  # what reference_rows renders with
    assert main(["generate", adapter, "--data", str(tmp_path / "chat.jsonl")]) == 2
    assert f"--data {tmp_path / 'chat.jsonl'}: row 1: cannot render the record: Conversation roles must alternate" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: a prompt or a dataset, not both
        main(["generate", adapter, "--prompt", "x", "--data", str(tmp_path / "texts.jsonl")])


CHAT_ROWS = [
    {"messages": [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row["output"]}]} for row in ROWS
]


def test_prompt_templates_follow_the_training_formats():
    assert prompt_template_for({"alpaca": 3}) == "alpaca"
    assert prompt_template_for({"chat": 2, "alpaca": 1}) == "chat"  # mixed: the most rows
    assert prompt_template_for({"completion": 1, "text": 2, "chat": 2}) == "raw"  # both read as they are
    assert prompt_template_for({}) is None
    with pytest.raises(ValueError, match="prompt_template must be one of"):
        TrainConfig(prompt_template="jinja")


def test_the_adapter_and_its_checkpoints_record_the_prompt_template(tmp_path):
    base, tokenizer = load_base_model("tiny-llama")
    data = load_training_data(CHAT_ROWS, tokenizer)
    assert data.formats == {"chat": 2}
    config = TrainConfig(max_steps=1, batch_size=2, micro_batch_size=2, checkpoint_every=1, prompt_template=prompt_template_for(data.formats))
    model = get_mola_model(base, MolaConfig(experts="2"))
    train(model, tokenizer, data, config=config, checkpoint_dir=tmp_path / "checkpoints")
    save_adapter(model, tmp_path / "adapter", config.prompt_template)
    for folder in (tmp_path / "adapter", tmp_path / "checkpoints" / "checkpoint-1"):
        assert json.loads((folder / "adapter_prompt.json").read_text()) == {"template": "chat"}
        assert recorded_prompt_template(folder) == "chat"
    with open_adapter(pack(tmp_path / "adapter", tmp_path / "a.tar.gz")) as adapter:  # packed with the adapter_* files
        assert adapter.prompt_template == "chat"
    lora = get_lora_model(load_base_model("tiny-llama")[0], rank=2)
    save_adapter(lora, tmp_path / "lora", "raw")
    with open_adapter(tmp_path / "lora") as adapter:
        assert (adapter.kind, adapter.prompt_template) == ("lora", "raw")
    model.save_pretrained(tmp_path / "bare")  # saved without one (or before adapters recorded it)
    assert recorded_prompt_template(tmp_path / "bare") is None


def test_cli_a_chat_trained_adapter_is_prompted_as_a_chat(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS * 4))
    trained = main(
        ["train", "--model", "tiny-llama", "--data", str(data), "--output", str(tmp_path / "adapter"), "--experts", "2", "--max-steps", "60",
         "--batch-size", "8", "--micro-batch-size", "8", "--lr", "3e-3", "--warmup-steps", "0", "--lr-schedule", "constant", "--dropout", "0"]
    )  # fmt: skip
    assert trained == 0
    assert recorded_prompt_template(tmp_path / "adapter") == "chat"
    capsys.readouterr()
    report = tmp_path / "generated.json"
    # No --template: the user's turn of a chat, as the adapter records.
    assert main(["generate", str(tmp_path / "adapter"), "--prompt", "Say the fruit.", "--prompt", "Say the colour.", "--json", str(report)]) == 0
    out, err = capsys.readouterr()
    assert out == "### 1\nbanana\n### 2\npurple\n" and err == ""
    saved = json.loads(report.read_text())
    assert saved["settings"]["template"] == "chat"
    assert saved["rows"][0]["prompt"] == prompt("Say the fruit.", load_base_model("tiny-llama")[1], "chat")[0]
    assert main(["generate", str(tmp_path / "adapter"), "--prompt", "x", "--input", "y"]) == 2
    assert "--input goes with the alpaca template, and the adapter's training rows were chat" in capsys.readouterr().err


def test_cli_an_adapter_without_a_recorded_template_is_prompted_as_alpaca_saying_so(tmp_path, capsys):
    base, _ = load_base_model("tiny-llama")
    get_mola_model(base, MolaConfig(experts="2")).save_pretrained(tmp_path / "adapter")
    assert main(["generate", str(tmp_path / "adapter"), "--prompt", "x", "--max-new-tokens", "2", "--json", str(tmp_path / "g.json")]) == 0
    assert "does not record how its training prompts looked" in capsys.readouterr().err
    assert json.loads((tmp_path / "g.json").read_text())["settings"]["template"] == "alpaca"


def test_an_opened_adapters_model_outlives_the_block(tmp_path):
    """`open_adapter` owns the base model it loads: leaving the block removes the unpacked
    archive, not the adapter (`mola analyze` works with the model after it)."""
    get_mola_model(load_base_model("tiny-llama")[0], MolaConfig(experts="2")).save_pretrained(tmp_path / "adapter")
    with open_adapter(pack(tmp_path / "adapter", tmp_path / "a.tar.gz")) as adapter:
        pass
    assert carries_adapter(adapter.model) and adapter.model.mola_modules()
