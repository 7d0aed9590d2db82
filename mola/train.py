"""The training loop: a pure function of the model, the data and a `TrainConfig`.

No database, no queue, no environment reads: the worker, the CLI and a notebook all drive it the
same way and follow it through a callback. Checkpoints hold everything needed for an exact
resume (adapter, optimizer, scheduler, RNG states, step), and the data order is a function of
(seed, epoch), so a resumed run follows the same trajectory as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import resource
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mola.architectures import max_positions
from mola.compile import compile_for_training
from mola.data import collate
from mola.evaluate import evaluate_loss
from mola.logits import forward_logits_at, next_token_positions, to_device

logger = logging.getLogger(__name__)

Callback = Callable[[dict[str, Any]], "bool | None"]
STATE_NAME = "training_state.pt"
TRAINER_STATE_NAME = "trainer_state.json"
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    """Options of a training run (defaults follow the MoLA paper where it gives them).

    Attributes:
        epochs: passes over the training data (fractions allowed); ignored when max_steps is set.
        max_steps: optimizer steps to run; overrides epochs.
        learning_rate: AdamW peak learning rate.
        batch_size: examples per optimizer step (the paper uses 128).
        micro_batch_size: examples per forward pass; gradients accumulate over
            ceil(batch_size / micro_batch_size) micro-batches.
        cutoff_len: maximum tokens per example (applied when the data is tokenized).
        train_on_inputs: also learn to predict the prompt tokens (applied at tokenization).
        warmup_steps: linear warm-up steps; None means warmup_ratio of the total.
        warmup_ratio: warm-up as a fraction of the total steps when warmup_steps is None.
        lr_schedule: decay after warm-up: "cosine", "linear" or "constant".
        weight_decay: AdamW weight decay on the adapter parameters.
        adam_betas, adam_eps: AdamW hyper-parameters.
        max_grad_norm: gradient clipping threshold; None or 0 disables clipping.
        seed: seeds the data order, dropout and any other randomness.
        bf16: bf16 autocast; None turns it on where CUDA supports it, off on CPU.
        gradient_checkpointing: recompute activations in backward to save memory.
        torch_compile: run the training forward passes through `torch.compile`
            (`mola.compile`): fused kernels for the routing; the first steps take longer while
            it compiles. Evaluation and the model after training stay eager.
        eval_every: evaluate on eval_data every this many steps (and always at the end).
        checkpoint_every: write a checkpoint every this many steps (needs checkpoint_dir).
        keep_checkpoints: how many of the newest checkpoints to keep (0 keeps all).
        log_every: report training metrics every this many steps.
    """

    epochs: float = 3.0
    max_steps: int | None = None
    learning_rate: float = 3e-4
    batch_size: int = 128
    micro_batch_size: int = 4
    cutoff_len: int = 256
    train_on_inputs: bool = False
    warmup_steps: int | None = None
    warmup_ratio: float = 0.03
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    seed: int = 42
    bf16: bool | None = None
    gradient_checkpointing: bool = False
    torch_compile: bool = False
    eval_every: int | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    log_every: int = 1

    def __post_init__(self) -> None:
        positive_ints = ["batch_size", "micro_batch_size", "cutoff_len", "log_every"]
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_steps", "eval_every", "checkpoint_every", "warmup_steps"):
            value = getattr(self, name)
            minimum = 0 if name == "warmup_steps" else 1
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
                raise ValueError(f"{name} must be an integer >= {minimum} or None, got {value!r}")
        if not isinstance(self.epochs, (int, float)) or self.epochs <= 0:
            raise ValueError(f"epochs must be a positive number, got {self.epochs!r}")
        if not isinstance(self.learning_rate, (int, float)) or not 0 < self.learning_rate < 1:
            raise ValueError(f"learning_rate must be in (0, 1), got {self.learning_rate!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 or None, got {self.max_grad_norm!r}")
        if self.keep_checkpoints < 0:
            raise ValueError(f"keep_checkpoints must be >= 0, got {self.keep_checkpoints!r}")
        self.adam_betas = tuple(self.adam_betas)  # JSON round-trips give lists

    @property
    def accumulation_steps(self) -> int:
        return math.ceil(self.batch_size / min(self.micro_batch_size, self.batch_size))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    steps: int  # optimizer steps completed
    total_steps: int
    stopped: bool  # True when the callback stopped the run early
    metrics: dict[str, Any] = field(default_factory=dict)  # the last training metrics
    eval_metrics: dict[str, Any] = field(default_factory=dict)  # the last evaluation
    history: list[dict[str, Any]] = field(default_factory=list)
    last_checkpoint: Path | None = None


# ---- schedule and data order ----------------------------------------------------------------


def total_steps_for(config: TrainConfig, num_examples: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil(steps_per_epoch(config, num_examples) * config.epochs))


def steps_per_epoch(config: TrainConfig, num_examples: int) -> int:
    return max(1, math.ceil(num_examples / config.batch_size))


def lr_lambda(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    warmup = config.warmup_steps if config.warmup_steps is not None else round(config.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if config.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def batch_indices(config: TrainConfig, num_examples: int, step: int) -> list[int]:
    """Example indices of optimizer step ``step``: a fixed permutation per (seed, epoch)."""
    per_epoch = steps_per_epoch(config, num_examples)
    epoch, position = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    order = torch.randperm(num_examples, generator=generator)
    start = position * config.batch_size
    return order[start : start + config.batch_size].tolist()


# ---- checkpoints ----------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_adapter(model: nn.Module, directory: Path) -> None:
    model.save_pretrained(str(directory))


def save_checkpoint(model, optimizer, scheduler, step: int, total_steps: int, metrics: dict, checkpoint_dir: Path, config: TrainConfig) -> Path:
    """Write `checkpoint-<step>/` atomically (a temporary folder renamed into place)."""
    final = checkpoint_dir / f"checkpoint-{step}"
    tmp = checkpoint_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_adapter(model, tmp)
    torch.save(
        {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
        tmp / STATE_NAME,
    )
    trainer_state = {"step": step, "total_steps": total_steps, "metrics": metrics, "config": config.to_dict()}
    (tmp / TRAINER_STATE_NAME).write_text(json.dumps(trainer_state, indent=2, default=str) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if config.keep_checkpoints:
        for old in list_checkpoints(checkpoint_dir)[: -config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``checkpoint_dir``, oldest first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("checkpoint-*") if p.is_dir() and (p / STATE_NAME).is_file() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def load_adapter_weights(model: nn.Module, directory: Path) -> None:
    if hasattr(model, "load_adapter_weights"):  # MolaModel
        model.load_adapter_weights(directory)
        return
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(directory / "adapter_model.safetensors")))


# ---- the loop -------------------------------------------------------------------------------


def _forward_lm_loss_sum(model: nn.Module, batch: dict[str, Tensor], device: torch.device) -> tuple[Any, Tensor]:
    """``(output, summed next-token cross-entropy over the labelled tokens)`` for a collated
    host ``batch``. The output layer runs on the labelled positions alone (`mola.logits`): with
    the loss on responses only, most of a prompt-heavy batch's (B, T, V) logits would be computed
    to be ignored. The positions are found on the host, so the device is never waited for."""
    positions, targets = next_token_positions(batch["labels"])  # (B, T), (n,) on the host
    inputs = {k: to_device(batch[k], device) for k in ("input_ids", "attention_mask")}
    # No key-value cache: training never decodes, and a cache object in every layer's call
    # would also make a compiled model recompile.
    out, logits = forward_logits_at(model, positions, use_cache=False, **inputs)  # (n, V)
    return out, F.cross_entropy(logits.float(), to_device(targets, device), reduction="sum")


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _check_lengths(model: nn.Module, train_data: Sequence[dict], eval_data: Sequence[dict] | None) -> None:
    """A clear error instead of an index error deep in the position embeddings (or a device-side
    assert on a GPU) when an example is longer than the model's positions."""
    limit = max_positions(model)
    if limit is None:
        return
    for name, data in (("train_data", train_data), ("eval_data", eval_data or ())):
        longest = max((len(example["input_ids"]) for example in data), default=0)
        if longest > limit:
            raise ValueError(
                f"{name} has an example of {longest} tokens but the model has {limit} positions: "
                f"tokenize with cutoff_len <= {limit}"
            )


def train(
    model: nn.Module,
    tokenizer: Any,
    train_data: Sequence[dict[str, list[int]]],
    eval_data: Sequence[dict[str, list[int]]] | None = None,
    config: TrainConfig | None = None,
    callback: Callback | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
) -> TrainResult:
    """Train the adapter of ``model`` (a `MolaModel` or a peft LoRA model) on tokenized data.

    ``train_data``/``eval_data``: sequences of ``{"input_ids", "labels"}`` (see
    `mola.data.load_training_data`). ``callback`` receives one dict per event
    (``kind`` = "train", "eval" or "checkpoint"); returning True stops the run after the
    current step, writing a checkpoint first when ``checkpoint_dir`` is set. ``resume_from``:
    a checkpoint folder written by an earlier run with the same data and config.
    """
    config = config or TrainConfig()
    if not train_data:
        raise ValueError("train_data is empty")
    _check_lengths(model, train_data, eval_data)
    device = next(p for p in model.parameters()).device
    use_bf16 = config.bf16 if config.bf16 is not None else (device.type == "cuda" and torch.cuda.is_bf16_supported())
    autocast_dtype = torch.bfloat16 if use_bf16 else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    checkpoint_root = Path(checkpoint_dir) if checkpoint_dir is not None else None

    total_steps = total_steps_for(config, len(train_data))
    per_epoch = steps_per_epoch(config, len(train_data))
    micro = min(config.micro_batch_size, config.batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=config.adam_betas, eps=config.adam_eps, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))

    if config.gradient_checkpointing:
        # transformers 5 renamed the switch and its argument; older releases have the old ones.
        options = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
        # transformers also makes the embeddings' output require grad, which only reentrant
        # checkpointing needs; torch.compile would break its graph there.
        if hasattr(model, "disable_input_require_grads"):
            model.disable_input_require_grads()
        model.config.use_cache = False
    forward_model = compile_for_training(model) if config.torch_compile else model

    start_step = 0
    resumed_metrics: dict[str, Any] = {}
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed % 2**32)
    if resume_from is not None:
        resume_path = Path(resume_from)
        state = torch.load(resume_path / STATE_NAME, map_location="cpu", weights_only=False)
        load_adapter_weights(model, resume_path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start_step = int(state["step"])
        # Until a step runs here, the last training metrics are the checkpoint's: a run resumed
        # from its final checkpoint (its process died before it reported) still has them.
        trainer_state = resume_path / TRAINER_STATE_NAME
        if trainer_state.is_file():
            resumed_metrics = dict(json.loads(trainer_state.read_text()).get("metrics") or {})
        logger.info("resumed from %s at step %d of %d", resume_path, start_step, total_steps)

    result = TrainResult(steps=start_step, total_steps=total_steps, stopped=False, metrics=resumed_metrics)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def emit(event: dict[str, Any]) -> bool:
        return bool(callback(event)) if callback is not None else False

    def run_eval(step: int) -> bool:
        metrics = evaluate_loss(model, eval_data, pad_id, batch_size=micro, autocast_dtype=autocast_dtype)
        event = {"kind": "eval", "step": step, "total_steps": total_steps, "epoch": step / per_epoch, **metrics}
        result.eval_metrics = event
        return emit(event)

    def checkpoint(step: int, metrics: dict) -> bool:
        path = save_checkpoint(model, optimizer, scheduler, step, total_steps, metrics, checkpoint_root, config)
        result.last_checkpoint = path
        return emit({"kind": "checkpoint", "step": step, "total_steps": total_steps, "epoch": step / per_epoch, "path": str(path)})

    model.train()
    metrics: dict[str, Any] = {}
    for step in range(start_step, total_steps):
        started = time.perf_counter()
        indices = batch_indices(config, len(train_data), step)
        batch = [train_data[i] for i in indices]
        # Normalise by the labelled tokens of the whole batch, so accumulation over
        # micro-batches gives exactly the gradient of one big batch.
        label_tokens = sum(sum(1 for t in ex["labels"][1:] if t != -100) for ex in batch)
        lm_sum = torch.zeros((), device=device)
        aux_sum = torch.zeros((), device=device)
        input_tokens = 0
        chunks = [batch[i : i + micro] for i in range(0, len(batch), micro)]
        for chunk in chunks:
            batch_cpu = collate(chunk, pad_id)
            input_tokens += int(batch_cpu["attention_mask"].sum())
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out, lm_sum_chunk = _forward_lm_loss_sum(forward_model, batch_cpu, device)
                lm = lm_sum_chunk / max(1, label_tokens)
                aux = getattr(out, "aux_loss", None)
                loss = lm
                if aux is not None:
                    aux = aux / len(chunks)
                    loss = lm + model.mola_config.aux_loss_coef * aux
                    aux_sum += aux.detach()
            loss.backward()
            lm_sum += lm.detach()
        if config.max_grad_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        result.steps = done

        stop = False
        if done % config.log_every == 0 or done == total_steps:
            elapsed = time.perf_counter() - started
            coef = getattr(getattr(model, "mola_config", None), "aux_loss_coef", 0.0)
            lm_value, aux_value = float(lm_sum), float(aux_sum)
            metrics = {
                "kind": "train",
                "step": done,
                "total_steps": total_steps,
                "epoch": done / per_epoch,
                "loss": lm_value + coef * aux_value,
                "lm_loss": lm_value,
                "aux_loss": aux_value,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": input_tokens / elapsed if elapsed > 0 else None,
                "step_time_s": elapsed,
                "peak_memory_mb": _peak_memory_mb(device),
            }
            result.metrics = metrics
            result.history.append(metrics)
            stop = emit(metrics)
        if eval_data and config.eval_every and done % config.eval_every == 0 and done < total_steps:
            stop = run_eval(done) or stop
        if checkpoint_root is not None and done < total_steps and (stop or (config.checkpoint_every and done % config.checkpoint_every == 0)):
            stop = checkpoint(done, metrics) or stop
        if stop:
            result.stopped = True
            logger.info("training stopped by the callback at step %d of %d", done, total_steps)
            return result

    if eval_data:
        run_eval(result.steps)
    if checkpoint_root is not None and start_step < total_steps:
        checkpoint(result.steps, metrics)
    return result
