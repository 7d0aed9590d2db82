"""The training loop on tiny models: learning, accumulation, stop/resume, checkpoints."""

import functools
import json
from pathlib import Path

import pytest
import torch

from mola import MolaConfig, byte_tokenizer, get_mola_model, load_mola_model, tiny_model
from mola.compile import compile_for_training
from mola.data import load_training_data
from mola.lora import get_lora_model
from mola.train import TrainConfig, TrainingDiverged, batch_indices, best_checkpoint, list_checkpoints, total_steps_for, train

TOKENIZER = byte_tokenizer()
RECORDS = [{"prompt": f"{a} plus {b} is ", "completion": str(a + b)} for a in range(8) for b in range(8)]


@pytest.fixture(scope="module")
def data():
    return load_training_data(RECORDS, TOKENIZER, cutoff_len=64)


def fresh_model(arch="llama", experts="2468", dropout=0.05, aux_loss_coef=0.001):
    torch.manual_seed(123)
    return get_mola_model(tiny_model(arch), MolaConfig(experts=experts, top_k=2, dropout=dropout, aux_loss_coef=aux_loss_coef))


def adapter_tensors(model):
    return {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}


def test_a_few_steps_lower_the_loss(data):
    model = fresh_model()
    events = []
    result = train(model, TOKENIZER, data, config=TrainConfig(max_steps=25, batch_size=16, micro_batch_size=8, learning_rate=5e-3, seed=0), callback=events.append)
    losses = [e["lm_loss"] for e in events if e["kind"] == "train"]
    assert result.steps == 25 and not result.stopped
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    first = events[0]
    for key in ("loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_mb", "epoch"):
        assert first[key] is not None and first[key] == first[key], key
    assert first["aux_loss"] > 0 and first["loss"] == pytest.approx(first["lm_loss"] + 0.001 * first["aux_loss"])


def test_gradient_accumulation_matches_one_big_batch(data):
    # The balance loss is a product of batch statistics, so it is not additive over
    # micro-batches (each micro-batch balances itself); check the LM part, which must be exact.
    # A huge Adam epsilon makes the update proportional to the gradient (plain SGD), so the
    # comparison checks the accumulated gradients rather than Adam's sign-like first step.
    results = []
    for micro in (16, 4, 3):
        model = fresh_model(dropout=0.0, aux_loss_coef=0.0)
        config = TrainConfig(max_steps=2, batch_size=16, micro_batch_size=micro, seed=1, learning_rate=0.5, adam_eps=1.0, max_grad_norm=None)
        train(model, TOKENIZER, data, config=config)
        results.append(adapter_tensors(model))
    for other in results[1:]:
        for name, tensor in results[0].items():
            torch.testing.assert_close(other[name], tensor, rtol=1e-4, atol=1e-6)


def test_stop_and_resume_follow_the_same_trajectory(data, tmp_path):
    config = TrainConfig(max_steps=6, batch_size=8, micro_batch_size=4, learning_rate=3e-3, seed=7, checkpoint_every=100)
    straight = fresh_model()
    straight_events = []
    train(straight, TOKENIZER, data, config=config, callback=straight_events.append)

    interrupted = fresh_model()
    stopped = train(interrupted, TOKENIZER, data, config=config, checkpoint_dir=tmp_path, callback=lambda e: e["kind"] == "train" and e["step"] == 3)
    assert stopped.stopped and stopped.steps == 3
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3"]

    resumed = fresh_model()  # a new process would start from a fresh model too
    resumed_events = []
    result = train(resumed, TOKENIZER, data, config=config, checkpoint_dir=tmp_path, resume_from=tmp_path / "checkpoint-3", callback=resumed_events.append)
    assert result.steps == 6 and [e["step"] for e in resumed_events if e["kind"] == "train"] == [4, 5, 6]
    expected = [e["loss"] for e in straight_events if e["kind"] == "train"][3:]
    assert [e["loss"] for e in resumed_events if e["kind"] == "train"] == pytest.approx(expected, rel=1e-6)
    for name, tensor in adapter_tensors(straight).items():
        torch.testing.assert_close(resumed.adapter_state_dict()[name], tensor, rtol=1e-6, atol=1e-7)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-6"]

    # A run that died after its final checkpoint resumes with nothing left to do, and still
    # reports the last training metrics (a job's result and model card need them).
    final = train(fresh_model(), TOKENIZER, data, config=config, resume_from=tmp_path / "checkpoint-6", callback=resumed_events.append)
    assert final.steps == 6 and not final.stopped
    assert final.metrics["step"] == 6 and final.metrics["loss"] == pytest.approx(result.metrics["loss"], rel=1e-6)


def test_periodic_checkpoints_keep_the_newest_and_the_best_evaluated(data, tmp_path):
    model = fresh_model()
    events = []
    config = TrainConfig(max_steps=5, batch_size=8, micro_batch_size=8, checkpoint_every=1, keep_checkpoints=2, eval_every=2)
    train(model, TOKENIZER, data, data[:8], config, checkpoint_dir=tmp_path, callback=events.append)
    kinds = [(e["kind"], e["step"]) for e in events]
    assert ("eval", 2) in kinds and ("eval", 5) in kinds and ("checkpoint", 5) in kinds
    evals = {e["step"]: e["eval_loss"] for e in events if e["kind"] == "eval"}
    best = min(evals, key=evals.get)
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"checkpoint-{s}" for s in sorted({best, 4, 5})]
    state = json.loads((tmp_path / f"checkpoint-{best}" / "trainer_state.json").read_text())
    assert state["eval_metrics"]["eval_loss"] == evals[best]
    final = json.loads((tmp_path / "checkpoint-5" / "trainer_state.json").read_text())
    assert final["eval_metrics"]["eval_loss"] == evals[5]  # the final evaluation comes before the final checkpoint
    checkpoint = tmp_path / "checkpoint-5"
    assert (checkpoint / "adapter_config.json").is_file() and (checkpoint / "adapter_model.safetensors").is_file()


def test_pruning_keeps_an_older_best_checkpoint(tmp_path):
    from mola.train import save_checkpoint

    model = fresh_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    config = TrainConfig(keep_checkpoints=1)
    for step, loss in [(1, 0.5), (2, 0.9), (3, None), (4, 0.8)]:
        evaluated = {"eval_loss": loss} if loss is not None else None
        save_checkpoint(model, optimizer, scheduler, step, 4, {}, tmp_path, config, eval_metrics=evaluated)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-4"]


def test_best_checkpoint_is_the_lowest_eval_loss_of_the_evaluated(tmp_path):
    def made(step: int, eval_loss: float | None) -> Path:
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        state = {"step": step, **({"eval_metrics": {"eval_loss": eval_loss}} if eval_loss is not None else {})}
        (path / "trainer_state.json").write_text(json.dumps(state))
        return path

    paths = [made(1, None), made(2, 0.9), made(3, 0.7), made(4, None), made(5, 0.7)]
    assert best_checkpoint(paths) == paths[2]  # the earliest of two equal losses
    assert best_checkpoint([paths[0], paths[3]]) is None


def test_lora_baseline_runs_in_the_same_loop(data, tmp_path):
    torch.manual_seed(0)
    model = get_lora_model(tiny_model("llama"), rank=8, alpha=16, dropout=0.0)
    events = []
    result = train(model, TOKENIZER, data, config=TrainConfig(max_steps=20, batch_size=16, micro_batch_size=8, learning_rate=5e-3), checkpoint_dir=tmp_path, callback=events.append)
    losses = [e["lm_loss"] for e in events if e["kind"] == "train"]
    assert result.steps == 20 and losses[-1] < losses[0]
    assert all(e["aux_loss"] == 0 for e in events if e["kind"] == "train")


@pytest.mark.parametrize("method", ["mola", "lora"])
def test_gradient_checkpointing_gives_the_same_step(data, method):
    results = []
    for checkpointing in (False, True):
        if method == "mola":
            model = fresh_model(dropout=0.0)
        else:
            torch.manual_seed(123)
            model = get_lora_model(tiny_model("llama"), rank=8, alpha=16, dropout=0.0, target_modules=None)
        train(model, TOKENIZER, data, config=TrainConfig(max_steps=2, batch_size=8, micro_batch_size=4, gradient_checkpointing=checkpointing))
        results.append({k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad})
    for name, tensor in results[0].items():
        torch.testing.assert_close(results[1][name], tensor, rtol=1e-5, atol=1e-6)


def test_a_warmup_longer_than_the_run_is_refused(data):
    # 64 examples, batch 16, 1 epoch: 4 steps. The schedule would end before reaching its peak.
    config = TrainConfig(epochs=1, batch_size=16, warmup_steps=5)
    with pytest.raises(ValueError, match=r"warmup_steps=5 is more than the run's 4 steps: the learning rate would never reach learning_rate=0.0003"):
        train(fresh_model(), TOKENIZER, data, config=config)
    result = train(fresh_model(), TOKENIZER, data, config=TrainConfig(epochs=1, batch_size=16, micro_batch_size=16, warmup_steps=4))
    assert result.steps == 4 and result.warmup_steps == 4 and result.bf16 is False
    ratio = train(fresh_model(), TOKENIZER, data, config=TrainConfig(max_steps=2, batch_size=16, micro_batch_size=16, warmup_ratio=0.5))
    assert ratio.warmup_steps == 1  # the warm-up the ratio gave this run


def test_schedule_and_data_order():
    config = TrainConfig(epochs=2, batch_size=10, seed=3)
    assert total_steps_for(config, 25) == 6
    epoch0 = [i for s in range(3) for i in batch_indices(config, 25, s)]
    assert sorted(epoch0) == list(range(25))
    assert batch_indices(config, 25, 3) != batch_indices(config, 25, 0)
    assert batch_indices(config, 25, 4) == batch_indices(TrainConfig(epochs=2, batch_size=10, seed=3), 25, 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"learning_rate": 0}, r"learning_rate must be in \(0, 1\), got 0"),
        ({"learning_rate": float("nan")}, r"learning_rate must be in \(0, 1\), got nan"),
        ({"lr_schedule": "steps"}, "lr_schedule must be one of"),
        ({"max_steps": -1}, "max_steps must be an integer >= 1 or None, got -1"),
        ({"epochs": 0}, "epochs must be a positive number, got 0"),
        ({"epochs": float("nan")}, "epochs must be a positive number, got nan"),
        ({"epochs": float("inf")}, "epochs must be a positive number, got inf"),
        ({"seed": 2**50}, r"seed must be an integer in \[0, 4294967295\], got 1125899906842624"),
        ({"seed": -1}, r"seed must be an integer in \[0, 4294967295\], got -1"),
        ({"keep_checkpoints": 1.5}, "keep_checkpoints must be an integer >= 0, got 1.5"),
        ({"cutoff_len": 1}, "cutoff_len must be an integer >= 2, got 1"),
        ({"bf16": "yes"}, "bf16 must be True, False or None, got 'yes'"),
        ({"gradient_checkpointing": 1}, "gradient_checkpointing must be True or False, got 1"),
        ({"adam_betas": (0.9,)}, r"adam_betas must be two numbers in \[0, 1\), got \(0.9,\)"),
        ({"adam_betas": (0.9, float("nan"))}, "adam_betas must be two numbers"),
        ({"adam_eps": -1}, "adam_eps must be a positive number, got -1"),
        ({"warmup_ratio": "x"}, r"warmup_ratio must be in \[0, 1\), got 'x'"),
        ({"weight_decay": "x"}, "weight_decay must be a number >= 0, got 'x'"),
        ({"max_grad_norm": float("inf")}, "max_grad_norm must be a number >= 0 or None, got inf"),
    ],
)
def test_bad_train_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_train_config_takes_the_services_extremes():
    # The service's API bounds (api/schemas.py): what it accepts, the library must too.
    TrainConfig(epochs=1000.0, max_steps=10_000_000, learning_rate=0.5, batch_size=8192, micro_batch_size=8192, cutoff_len=8,
                warmup_steps=0, weight_decay=10.0, max_grad_norm=0.0, seed=2**32 - 1, bf16=False, eval_every=1, checkpoint_every=1)
    assert TrainConfig(adam_betas=[0.9, 0.95], max_grad_norm=None, seed=0, epochs=0.01).adam_betas == (0.9, 0.95)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_examples_longer_than_the_models_positions_are_refused(arch):
    model = fresh_model(arch)  # 512 positions; the example is 600 + 1 + EOS tokens (GPT-2's are learned: a longer input is an index error)
    long_records = [{"prompt": "x" * 600, "completion": "y"}]
    data = load_training_data(long_records, TOKENIZER, cutoff_len=1024, train_on_inputs=True)
    with pytest.raises(ValueError, match="example of 602 tokens but the model has 512 positions: tokenize with cutoff_len <= 512"):
        train(model, TOKENIZER, data, config=TrainConfig(max_steps=1))
    short = load_training_data(RECORDS[:4], TOKENIZER, cutoff_len=64)
    with pytest.raises(ValueError, match="eval_data has an example of 602 tokens"):
        train(model, TOKENIZER, short, eval_data=data, config=TrainConfig(max_steps=1))


@pytest.mark.parametrize("checkpointing, backend", [(False, "inductor"), (True, "aot_eager")])
def test_torch_compile_gives_the_same_steps(data, monkeypatch, checkpointing, backend):
    # The training forwards run as one compiled graph (Dynamo counts it: no graph break, no
    # fallback to eager) and two steps of training end at the same adapter as eager training. Dropout is off: compiled
    # kernels draw their random masks differently. Adam with a huge epsilon steps along the
    # gradient (see the accumulation test), so this compares gradients, not Adam's sign-like
    # first step. With activation checkpointing the graphs are only traced (aot_eager), to
    # keep the test short: Inductor's kernels are checked without it.
    from torch._dynamo.utils import counters

    import mola.train

    monkeypatch.setattr(mola.train, "compile_for_training", functools.partial(compile_for_training, backend=backend))
    results = []
    for compiled in (False, True):
        model = fresh_model(dropout=0.0)
        torch._dynamo.reset()
        counters.clear()
        config = TrainConfig(
            max_steps=2, batch_size=8, micro_batch_size=4, learning_rate=0.5, adam_eps=1.0, max_grad_norm=None,
            gradient_checkpointing=checkpointing, torch_compile=compiled,
        )
        train(model, TOKENIZER, data, config=config)
        results.append(adapter_tensors(model))
        if compiled:
            assert counters["stats"]["unique_graphs"] >= 1
            assert not counters["graph_break"], list(counters["graph_break"])
            assert not counters["recompile_limit"], "the model fell back to eager"
    for name, tensor in results[0].items():
        torch.testing.assert_close(results[1][name], tensor, rtol=1e-4, atol=1e-5)


# ---- resuming only the same run ---------------------------------------------------------------

RESUMED = dict(max_steps=3, batch_size=8, micro_batch_size=8, learning_rate=3e-3, seed=7)


@pytest.fixture(scope="module")
def stopped_run(data, tmp_path_factory):
    """A checkpoint at step 2 of a 3-step run."""
    root = tmp_path_factory.mktemp("stopped")
    train(fresh_model(), TOKENIZER, data, config=TrainConfig(**RESUMED), checkpoint_dir=root, callback=lambda e: e["kind"] == "train" and e["step"] == 2)
    return root / "checkpoint-2"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"max_steps": 4}, r"total steps: 3 in the checkpoint, 4 now \(max_steps 3 -> 4, epochs 3.0 -> 3.0\)"),
        ({"seed": 8}, "seed: 7 in the checkpoint, 8 now"),
        ({"learning_rate": 1e-3}, "learning_rate: 0.003 in the checkpoint, 0.001 now"),
        ({"lr_schedule": "linear"}, "lr_schedule: 'cosine' in the checkpoint, 'linear' now"),
        ({"warmup_steps": 1}, r"warm-up steps \(warmup_steps, else warmup_ratio of the total\): 0 in the checkpoint, 1 now"),
        ({"weight_decay": 0.1}, "weight_decay: 0.0 in the checkpoint, 0.1 now"),
        ({"adam_betas": (0.9, 0.95)}, r"adam_betas: \[0.9, 0.999\] in the checkpoint, \(0.9, 0.95\) now"),
        ({"max_grad_norm": None}, "max_grad_norm: 1.0 in the checkpoint, None now"),
        ({"cutoff_len": 128}, "cutoff_len: 256 in the checkpoint, 128 now"),
        ({"train_on_inputs": True}, "train_on_inputs: False in the checkpoint, True now"),
        # Both values of every field that differs, in one message.
        ({"batch_size": 4, "micro_batch_size": 4, "seed": 1}, "batch_size: 8 in the checkpoint, 4 now; seed: 7 in the checkpoint, 1 now"),
    ],
)
def test_resume_refuses_another_schedule(data, stopped_run, changes, message):
    with pytest.raises(ValueError, match=f"cannot resume from {stopped_run}: this run's schedule, data or adapter differ from the checkpoint's .*{message}"):
        train(fresh_model(), TOKENIZER, data, config=TrainConfig(**{**RESUMED, **changes}), resume_from=stopped_run)


@pytest.mark.parametrize(
    "mola_config, message",
    [
        # Same shapes, so the weights load without error: only the comparison catches these.
        (dict(top_k=1), r"adapter top_k_per_layer: \[2, 2, 2, 2\] in the checkpoint, \[1, 1, 1, 1\] now"),
        (dict(alpha=32), "adapter alpha: 16.0 in the checkpoint, 32.0 now"),
        (dict(dropout=0.1), "adapter dropout: 0.05 in the checkpoint, 0.1 now"),
        (dict(aux_loss_coef=0.01), "adapter aux_loss_coef: 0.001 in the checkpoint, 0.01 now"),
        (dict(experts="2466"), r"adapter experts_per_layer: \[2, 4, 6, 8\] in the checkpoint, \[2, 4, 6, 6\] now"),
    ],
)
def test_resume_refuses_another_adapter(data, stopped_run, mola_config, message):
    torch.manual_seed(123)
    model = get_mola_model(tiny_model("llama"), MolaConfig(**{**dict(experts="2468", top_k=2), **mola_config}))
    before = adapter_tensors(model)
    with pytest.raises(ValueError, match=f"cannot resume from {stopped_run}: .*{message}"):
        train(model, TOKENIZER, data, config=TrainConfig(**RESUMED), resume_from=stopped_run)
    for name, tensor in adapter_tensors(model).items():
        assert torch.equal(tensor, before[name]), name  # refused before anything was loaded


def test_lora_resume_refuses_another_alpha(data, tmp_path):
    def lora(alpha):
        torch.manual_seed(0)
        return get_lora_model(tiny_model("llama"), rank=4, alpha=alpha)

    train(lora(8), TOKENIZER, data, config=TrainConfig(**RESUMED), checkpoint_dir=tmp_path, callback=lambda e: e["kind"] == "train" and e["step"] == 1)
    with pytest.raises(ValueError, match="adapter lora_alpha: 8 in the checkpoint, 16 now"):
        train(lora(16), TOKENIZER, data, config=TrainConfig(**RESUMED), resume_from=tmp_path / "checkpoint-1")
    assert train(lora(8), TOKENIZER, data, config=TrainConfig(**RESUMED), resume_from=tmp_path / "checkpoint-1").steps == 3


def test_lora_resume_refuses_a_mola_checkpoint(data, stopped_run):
    # It failed later, in the optimizer's state, with "a parameter group that doesn't match".
    with pytest.raises(ValueError, match="adapter: MoLA in the checkpoint, LoRA now"):
        train(get_lora_model(tiny_model("llama")), TOKENIZER, data, config=TrainConfig(**RESUMED), resume_from=stopped_run)


def test_resume_refuses_other_data(data, stopped_run):
    with pytest.raises(ValueError, match="examples: 64 in the checkpoint, 40 now"):
        train(fresh_model(), TOKENIZER, data[:40], config=TrainConfig(**RESUMED), resume_from=stopped_run)


def test_resume_allows_what_only_reports_or_computes_differently(data, stopped_run, tmp_path):
    # micro_batch_size: the same LM-loss gradient (accumulation); the rest reports or stores.
    changes = dict(micro_batch_size=4, log_every=2, eval_every=1, checkpoint_every=1, keep_checkpoints=0, bf16=False)
    result = train(fresh_model(), TOKENIZER, data, data[:4], TrainConfig(**{**RESUMED, **changes}), resume_from=stopped_run, checkpoint_dir=tmp_path)
    assert result.steps == 3 and [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3"]


def test_a_checkpoint_dir_is_one_runs_history(data, tmp_path):
    config = TrainConfig(**{**RESUMED, "max_steps": 2, "checkpoint_every": 1})
    train(fresh_model(), TOKENIZER, data, config=config, checkpoint_dir=tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2"]
    # A fresh run would have its checkpoints deleted by the rotation as soon as written (the
    # other run's steps are higher), and "the newest" would be the other run's.
    with pytest.raises(ValueError, match=f"checkpoint_dir {tmp_path} already holds checkpoints of another run \\(checkpoint-1, checkpoint-2\\): resume from the newest \\(resume_from={tmp_path / 'checkpoint-2'}\\)"):
        train(fresh_model(), TOKENIZER, data, config=config, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"holds checkpoints past the resume point, step 1 \(checkpoint-2\): resume from the newest"):
        train(fresh_model(), TOKENIZER, data, config=config, checkpoint_dir=tmp_path, resume_from=tmp_path / "checkpoint-1")
    assert train(fresh_model(), TOKENIZER, data, config=config, checkpoint_dir=tmp_path, resume_from=tmp_path / "checkpoint-2").steps == 2
    with pytest.raises(FileNotFoundError, match="is not a checkpoint: it has no training_state.pt"):
        train(fresh_model(), TOKENIZER, data, config=config, resume_from=tmp_path)


# ---- stopping, data and the model after training ----------------------------------------------


def test_a_stop_on_the_final_step_is_a_complete_run(data, tmp_path):
    events = []

    def stop_at_the_end(event):
        events.append((event["kind"], event["step"]))
        return event["kind"] == "train" and event["step"] == 3

    result = train(fresh_model(), TOKENIZER, data, data[:4], TrainConfig(**RESUMED), checkpoint_dir=tmp_path, callback=stop_at_the_end)
    assert result.steps == 3 and not result.stopped
    assert result.last_checkpoint == tmp_path / "checkpoint-3" and result.eval_metrics["step"] == 3
    assert events[-2:] == [("eval", 3), ("checkpoint", 3)]


def test_labels_default_to_the_input_ids(data):
    # As `mola.data.collate` does: an example without labels learns every token.
    unlabelled = [{"input_ids": ex["input_ids"]} for ex in data]
    labelled = [{"input_ids": ex["input_ids"], "labels": ex["input_ids"]} for ex in data]
    config = TrainConfig(max_steps=1, batch_size=8, micro_batch_size=4)
    losses = [train(fresh_model(dropout=0.0), TOKENIZER, examples, config=config).metrics["lm_loss"] for examples in (unlabelled, labelled)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_data_train_cannot_use_is_refused(data):
    with pytest.raises(ValueError, match=r"train_data is empty: no example left to train on \(were they all dropped when tokenized, with no trainable token within cutoff_len\?\)"):
        train(fresh_model(), TOKENIZER, [], config=TrainConfig(max_steps=1))
    long = load_training_data([{"text": "x" * 80}], TOKENIZER, cutoff_len=128)  # 81 tokens with EOS
    with pytest.raises(ValueError, match=r"train_data has an example of 81 tokens, more than cutoff_len=64: tokenize with the run's cutoff_len \(load_training_data\(..., cutoff_len=64\)\)"):
        train(fresh_model(), TOKENIZER, long, config=TrainConfig(max_steps=1, cutoff_len=64))
    with pytest.raises(ValueError, match="eval_data has an example of 81 tokens, more than cutoff_len=64"):
        train(fresh_model(), TOKENIZER, data, long, config=TrainConfig(max_steps=1, cutoff_len=64))
    with pytest.raises(ValueError, match=r"train_data\[1\] is not an example with 'input_ids'"):
        train(fresh_model(), TOKENIZER, [data[0], {"labels": [1, 2]}], config=TrainConfig(max_steps=1))
    # Hand-made examples that would fail deep inside (a reshape of 0 tokens, a shape mismatch in
    # collate) or train nothing but the balance loss while reporting an LM loss of 0.
    with pytest.raises(ValueError, match=r"train_data\[1\] has no tokens \(empty 'input_ids'\)"):
        train(fresh_model(), TOKENIZER, [data[0], {"input_ids": []}], config=TrainConfig(max_steps=1))
    with pytest.raises(ValueError, match=r"eval_data\[0\] has 2 labels for 3 input_ids: one label per token"):
        train(fresh_model(), TOKENIZER, data, [{"input_ids": [1, 2, 3], "labels": [1, 2]}], config=TrainConfig(max_steps=1))
    nothing_to_learn = [{"input_ids": [5]}, {"input_ids": [5, 6, 7], "labels": [5, -100, -100]}]
    with pytest.raises(ValueError, match="train_data has no labelled token to learn"):
        train(fresh_model(), TOKENIZER, nothing_to_learn, config=TrainConfig(max_steps=1))
    # One example with a target is enough.
    assert train(fresh_model(), TOKENIZER, [*nothing_to_learn, data[0]], config=TrainConfig(max_steps=1, batch_size=3)).steps == 1


def _poison(model) -> None:
    """One NaN in a frozen weight: every later forward's loss is NaN, as after a divergence."""
    name, weight = next((n, p) for n, p in model.named_parameters() if not p.requires_grad and ".layers.1." in n and p.dim() == 2)
    with torch.no_grad():
        weight[0, 0] = float("nan")


def test_a_run_whose_loss_turns_nan_stops_before_logging_or_saving_it(data, tmp_path):
    model, events = fresh_model(), []

    def diverge_after_step_3(event):
        events.append(event)
        if event["kind"] == "train" and event["step"] == 3:
            _poison(model)

    config = TrainConfig(max_steps=8, batch_size=8, micro_batch_size=4, checkpoint_every=2, seed=0)
    with pytest.raises(TrainingDiverged, match=r"^training diverged at step 4: lm_loss nan, aux_loss nan, grad_norm nan; lower learning_rate, keep max_grad_norm set, or train without bf16$") as raised:
        train(model, TOKENIZER, data, config=config, callback=diverge_after_step_3, checkpoint_dir=tmp_path)
    assert raised.value.step == 4 and isinstance(raised.value, FloatingPointError)
    assert [e["step"] for e in events if e["kind"] == "train"] == [1, 2, 3]  # no NaN metric
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]  # resumable from before it


def test_a_divergence_between_logged_steps_is_found_before_a_checkpoint(data, tmp_path):
    model, events = fresh_model(), []
    _poison(model)
    config = TrainConfig(max_steps=8, batch_size=8, micro_batch_size=8, log_every=4, checkpoint_every=3, seed=0)
    with pytest.raises(TrainingDiverged, match=r"at step 3: .*\(checked every log_every=4 steps: it may have started up to 3 steps earlier\)"):
        train(model, TOKENIZER, data, config=config, callback=events.append, checkpoint_dir=tmp_path)
    assert events == [] and list_checkpoints(tmp_path) == []


def test_a_frozen_model_is_refused_with_how_to_train_it(data, tmp_path):
    fresh_model().save_pretrained(tmp_path)
    frozen = load_mola_model(tiny_model("llama"), tmp_path)
    with pytest.raises(ValueError, match=r"no trainable parameters \(load_mola_model freezes the adapter unless is_trainable=True"):
        train(frozen, TOKENIZER, data, config=TrainConfig(max_steps=1))


@pytest.mark.parametrize("method", ["mola", "lora"])
def test_the_model_leaves_train_as_it_came(data, tmp_path, method):
    if method == "mola":
        model = fresh_model().eval()  # dropout 0.05
    else:
        torch.manual_seed(123)
        model = get_lora_model(tiny_model("llama"), rank=8, alpha=16, dropout=0.05).eval()
    train(model, TOKENIZER, data, config=TrainConfig(max_steps=1, batch_size=8, micro_batch_size=8, gradient_checkpointing=True))
    assert not any(module.training for module in model.modules())
    assert not any(getattr(module, "gradient_checkpointing", False) for module in model.modules())
    assert model.config.use_cache is True
    if method == "mola":
        # The in-memory model computes what its saved adapter computes once reloaded.
        model.save_pretrained(tmp_path)
        reloaded = load_mola_model(tiny_model("llama"), tmp_path).eval()
        ids = torch.tensor([data[0]["input_ids"]])
        torch.testing.assert_close(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    # A model that came in train mode, with checkpointing on, leaves with both.
    model.train()
    model.activation_checkpointing_enable()
    train(model, TOKENIZER, data, config=TrainConfig(max_steps=1, batch_size=8, micro_batch_size=8, gradient_checkpointing=True))
    assert model.training and any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


@pytest.mark.parametrize("method", ["mola", "lora"])
def test_train_restores_the_users_input_require_grads_and_checkpointing(data, method):
    torch.manual_seed(123)
    base = tiny_model("llama")
    model = get_mola_model(base, MolaConfig(experts="2468")) if method == "mola" else get_lora_model(base, rank=8, alpha=16, dropout=0.0)
    embeddings = base.get_input_embeddings()
    ids = torch.tensor([data[0]["input_ids"]])
    config = TrainConfig(max_steps=1, batch_size=8, micro_batch_size=8, gradient_checkpointing=True)

    # Input-require-grads on, checkpointing off: the hooks stay, and the user can still remove them.
    model.enable_input_require_grads()
    train(model, TOKENIZER, data, config=config)
    assert embeddings(ids).requires_grad
    model.disable_input_require_grads()
    assert not embeddings._forward_hooks and not embeddings(ids).requires_grad

    # Reentrant checkpointing of the user's own: train() checkpoints without reentry, then gives it back.
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    layers = [m for m in base.modules() if getattr(m, "gradient_checkpointing", False) is True]
    functions = [m._gradient_checkpointing_func for m in layers]
    assert layers and all(f.keywords == {"use_reentrant": True} for f in functions)
    train(model, TOKENIZER, data, config=config)
    assert [m._gradient_checkpointing_func for m in layers] == functions and all(m.gradient_checkpointing for m in layers)
    assert embeddings(ids).requires_grad  # the hook reentrant checkpointing needs
    model.activation_checkpointing_disable()
    model.disable_input_require_grads()
    assert not embeddings._forward_hooks


# ---- extra_eval ------------------------------------------------------------------------------


def test_extra_eval_adds_generated_answers_to_each_evaluation():
    from mola.data import build_example, encode_pairs
    from mola.evaluate import completion_match

    tokenizer = byte_tokenizer()
    rows = [("Q: 2+2? ", "The answer is B"), ("Q: sky? ", "The answer is A"), ("Q: cat? ", "meow"), ("Q: 3*3? ", "The answer is C")]
    pairs = encode_pairs([(p, c, False) for p, c in rows], tokenizer)
    examples = [build_example(p, c, 64) for p, c in pairs]
    torch.manual_seed(0)
    model = get_mola_model(tiny_model("llama"), MolaConfig(experts=[2, 2, 2, 2], top_k=1, dropout=0.0))
    for p in model.parameters():  # the whole model learns: four answers memorised in a few dozen steps
        p.requires_grad_(True)
    evals = []

    def answers(m):
        assert m.training  # as train() has it; completion_match evaluates in eval mode and gives it back
        scored = completion_match(m, tokenizer, pairs)
        return {"eval_exact_match": scored["exact_match"], "eval_answer_accuracy": scored["answer_accuracy"]}

    config = TrainConfig(max_steps=60, batch_size=4, micro_batch_size=4, learning_rate=3e-3, warmup_steps=0, eval_every=20, lr_schedule="constant")
    result = train(model, tokenizer, examples, examples, config, callback=lambda e: evals.append(e) if e["kind"] == "eval" else None, extra_eval=answers)
    assert [e["step"] for e in evals] == [20, 40, 60]
    assert all({"eval_loss", "eval_exact_match", "eval_answer_accuracy"} <= set(e) for e in evals)
    assert result.eval_metrics["eval_exact_match"] == 1.0 and result.eval_metrics["eval_answer_accuracy"] == 1.0
    assert not model.training  # train() gives back the mode it found (tiny_model: eval)


def test_extra_eval_without_eval_data_is_refused_not_ignored(data):
    config = TrainConfig(max_steps=1, batch_size=2, micro_batch_size=2)
    with pytest.raises(ValueError, match="extra_eval needs eval_data"):
        train(fresh_model(), byte_tokenizer(), data, None, config, extra_eval=lambda m: {"fine": 1})


def test_extra_eval_may_not_replace_the_events_own_fields(data):
    model = fresh_model()
    config = TrainConfig(max_steps=1, batch_size=2, micro_batch_size=2)
    with pytest.raises(ValueError, match=r"extra_eval returned \['eval_loss', 'step'\], names the evaluation event already has"):
        train(model, byte_tokenizer(), data, data, config, extra_eval=lambda m: {"eval_loss": 0.0, "step": 3, "fine": 1})
