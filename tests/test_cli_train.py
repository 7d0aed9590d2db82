"""`mola train` and `mola analyze` (python -m mola) run in-process on tiny models: the errors
and options the library commands add on top of `mola.train` and `mola.analysis`."""

import json
import re

import pytest
import torch

from mola import MolaConfig, get_mola_model
from mola.cli import main
from mola.models import load_base_model
from mola.train import list_checkpoints

ROWS = [{"instruction": "Repeat the word.", "input": w, "output": w} for w in ["cat", "dog", "sun", "sky"]]
SMALL_RUN = ["--model", "tiny-llama", "--experts", "1,2", "--top-k", "1", "--batch-size", "4", "--micro-batch-size", "4", "--device", "cpu"]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return path


def mola_train(*args):
    return main(["train", *SMALL_RUN, *map(str, args)])


def test_a_run_that_diverges_fails_with_the_step_and_what_to_change(data, tmp_path, capsys):
    from mola import byte_tokenizer, tiny_model

    model = tiny_model("llama")
    with torch.no_grad():  # a base model with a NaN weight: the loss is NaN from the first step
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan-model")
    byte_tokenizer().save_pretrained(tmp_path / "nan-model")
    argv = ["train", *SMALL_RUN[2:], "--model", tmp_path / "nan-model", "--data", data, "--output", tmp_path / "run", "--max-steps", 4]
    assert main([str(a) for a in argv]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == "error: training diverged at step 1: lm_loss nan, aux_loss nan, grad_norm nan; lower learning_rate, keep max_grad_norm set, or train without bf16"
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == []


def test_an_output_folder_is_one_runs(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert mola_train("--data", data, "--output", out, "--max-steps", 2) == 0
    capsys.readouterr()
    # A new run there would lose its checkpoints to the rotation, and --resume latest would
    # pick the old run's: it is refused before the model loads.
    assert mola_train("--data", data, "--output", out, "--max-steps", 2) == 2
    error = capsys.readouterr().err
    assert f"--output {out} already holds checkpoints of another run (newest: {out / 'checkpoints' / 'checkpoint-2'})" in error
    assert "pass --resume latest to continue that run, or choose another --output" in error
    # Continuing it with another schedule is refused too, naming both values.
    assert mola_train("--data", data, "--output", out, "--max-steps", 3, "--resume", "latest") == 2
    assert "total steps: 2 in the checkpoint, 3 now (max_steps 2 -> 3" in capsys.readouterr().err
    assert mola_train("--data", data, "--output", out, "--max-steps", 2, "--resume", "latest") == 0
    assert json.loads((out / "training_summary.json").read_text())["steps"] == 2


def test_schedule_and_checkpoint_flags_reach_the_run(data, tmp_path):
    out = tmp_path / "run"
    flags = ["--lr-schedule", "constant", "--warmup-steps", 1, "--weight-decay", 0.01, "--keep-checkpoints", 1, "--checkpoint-every", 1]
    assert mola_train("--data", data, "--output", out, "--max-steps", 3, *flags) == 0
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-3"]
    config = json.loads((out / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())["config"]
    assert (config["lr_schedule"], config["warmup_steps"], config["weight_decay"], config["keep_checkpoints"]) == ("constant", 1, 0.01, 1)


def test_the_summary_says_what_the_cutoff_cut_and_dropped(data, tmp_path, capsys):
    rows = [*ROWS, {"instruction": "x" * 600, "output": "y"}, {"instruction": "Spell it.", "output": "a b c " * 100}]
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "run"
    assert mola_train("--data", path, "--eval-data", data, "--output", out, "--max-steps", 1, "--cutoff-len", 400) == 0
    assert f"--data {path}: 2 of 6 records longer than --cutoff-len 400 were cut, 1 of them dropped" in capsys.readouterr().err
    summary = json.loads((out / "training_summary.json").read_text())["data"]
    assert (summary["train"]["records"], summary["train"]["examples"], summary["train"]["max_tokens"]) == (6, 5, 400)
    assert summary["eval"]["examples"] == 4 and summary["eval"]["over_cutoff"] == 0


def test_an_empty_eval_file_is_an_error(data, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert mola_train("--data", data, "--eval-data", empty, "--output", tmp_path / "run", "--max-steps", 1) == 2
    assert f"--eval-data {empty}: no example to use" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a torch without a usable GPU")
def test_a_device_that_is_not_there_is_a_clear_error(data, tmp_path, capsys):
    for device, message in [("cuda", "--device cuda: "), ("cuda:1", "--device cuda:1: "), ("tpu9", "--device 'tpu9': ")]:
        assert main(["train", "--model", "tiny-llama", "--data", str(data), "--output", str(tmp_path / "run"), "--device", device]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"error: {message}") and "Traceback" not in error
        if device.startswith("cuda"):
            assert "use --device cpu" in error


def test_analyze_routes_rows_longer_than_the_cutoff(tmp_path, capsys):
    # Rows whose prompt fills the cutoff have no trainable token, and were dropped: the routing
    # tables came out empty. Routing needs no labels, so they are routed, cut at --cutoff-len.
    base, _ = load_base_model("tiny-llama")
    torch.manual_seed(0)
    get_mola_model(base, MolaConfig(experts="1,2", top_k=1)).save_pretrained(tmp_path / "adapter")
    data = tmp_path / "long.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": "x" * 100, "completion": "y"}) for _ in range(3)) + "\n")
    report = tmp_path / "analysis.json"
    argv = ["analyze", str(tmp_path / "adapter"), "--model", "tiny-llama", "--data", str(data), "--cutoff-len", "32", "--json", str(report)]
    assert main(argv) == 0
    routing = json.loads(report.read_text())["routing"]
    assert len(routing["layers"]) == 4
    assert {row["tokens"] for row in routing["modules"].values()} == {3 * 32}
    assert main([*argv, "--limit", "0"]) == 2
    assert "--limit must be at least 1, got 0" in capsys.readouterr().err


def write_dataset_dict(root, splits):
    """A save_to_disk DatasetDict folder, written with pyarrow as `datasets` lays it out."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    for split, rows in splits.items():
        folder = root / split
        folder.mkdir(parents=True)
        table = pa.Table.from_pylist(rows)
        with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": split}))
    (root / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    return root


def test_a_dataset_folder_evaluates_on_its_validation_split(tmp_path, capsys):
    # --data and --eval-data naming one folder read its train split twice: the eval loss was the
    # training loss. --eval-data now reads --eval-split (validation), --data reads --split (train).
    held_out = [{"instruction": "Repeat the word.", "input": "a much longer held-out word", "output": "a much longer held-out word"}]
    folder = write_dataset_dict(tmp_path / "ds.hf", {"train": ROWS, "validation": held_out, "test": ROWS[:1]})
    out = tmp_path / "run"
    assert mola_train("--data", folder, "--eval-data", folder, "--output", out, "--max-steps", 1) == 0
    data = json.loads((out / "training_summary.json").read_text())["data"]
    assert (data["train"]["records"], data["eval"]["records"]) == (4, 1)
    out2 = tmp_path / "run2"
    assert mola_train("--data", folder, "--eval-data", folder, "--eval-split", "test", "--split", "validation", "--output", out2, "--max-steps", 1) == 0
    data = json.loads((out2 / "training_summary.json").read_text())["data"]
    assert (data["train"]["records"], data["eval"]["records"]) == (1, 1)
    capsys.readouterr()
    no_validation = write_dataset_dict(tmp_path / "two.hf", {"train": ROWS, "test": ROWS})
    assert mola_train("--data", no_validation, "--eval-data", no_validation, "--output", tmp_path / "run3", "--max-steps", 1) == 2
    assert f"--eval-data {no_validation} has no split 'validation' (it has train, test): choose one with --eval-split" in capsys.readouterr().err


def test_eval_generate_scores_generated_completions(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert mola_train("--data", data, "--eval-data", data, "--eval-generate", 3, "--eval-every", 1, "--output", out, "--max-steps", 2) == 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["eval"]["eval_generated"] == 3 and 0.0 <= summary["eval"]["eval_exact_match"] <= 1.0
    assert [s["reference"] for s in summary["samples"]] == ["cat", "dog", "sun"]
    assert re.search(r"step 1: eval_loss [\d.]+, exact match [\d.]+%\n", capsys.readouterr().out)
    assert mola_train("--data", data, "--eval-generate", 3, "--output", tmp_path / "run2", "--max-steps", 1) == 2
    assert "--eval-generate needs --eval-data and a count of at least 1" in capsys.readouterr().err
