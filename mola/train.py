"""The training loop: a pure function of the model, the data and a `TrainConfig`.

No database, no queue, no environment reads: the worker, the CLI and a notebook all drive it the
same way and follow it through a callback. Checkpoints hold everything needed for an exact
resume (adapter, optimizer, scheduler, RNG states, step), and the data order is a function of
(seed, epoch), so a resumed run follows the same trajectory as an uninterrupted one, provided
it is the same run: a resume compares the config and data size with the checkpoint's, and a
checkpoint folder holding another run's checkpoints is refused (see `RESUME_MUST_MATCH`).
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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mola import schedule
from mola.architectures import max_positions
from mola.compile import compile_for_training
from mola.data import IGNORE_INDEX, PROMPT_TEMPLATES, collate
from mola.evaluate import evaluate_loss
from mola.logits import forward_logits_at, next_token_positions, to_device
from mola.models import bf16_by_default

logger = logging.getLogger(__name__)

Callback = Callable[[dict[str, Any]], "bool | None"]
STATE_NAME = "training_state.pt"
TRAINER_STATE_NAME = "trainer_state.json"
PROMPT_NAME = "adapter_prompt.json"  # `adapter_*`: the service packs it with the adapter's files
SCHEDULES = ("cosine", "linear", "constant")


# numpy seeds its generator with 0 <= seed < 2**32 (torch takes more), and the service's API
# takes the same range; (seed, epoch) also seeds the data order, which stays within torch's.
MAX_SEED = 2**32 - 1


def _is_finite_number(value: Any) -> bool:
    """An int or float that is not a bool, NaN or infinite (NaN passes every comparison's
    negation, so range checks alone let it through)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None, optional: bool = False) -> None:
    if optional and value is None:
        return
    in_range = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    if not in_range or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an integer {bounds}{' or None' if optional else ''}, got {value!r}")


def _check_number(name: str, value: Any, in_range: Callable[[float], bool], description: str) -> None:
    if not _is_finite_number(value) or not in_range(value):
        raise ValueError(f"{name} must be {description}, got {value!r}")


def _checked_betas(betas: Any) -> tuple[float, float]:
    """AdamW's two betas as a tuple (JSON round-trips give lists)."""
    if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(_is_finite_number(b) and 0 <= b < 1 for b in betas):
        raise ValueError(f"adam_betas must be two numbers in [0, 1), got {betas!r}")
    return (betas[0], betas[1])


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
        cutoff_len: maximum tokens per example, at least 2. The data comes to `train` already
            tokenized (`mola.data.load_training_data(..., cutoff_len=...)`), so `train` checks
            that no example is longer, and a resumed run that it is the checkpoint's.
        train_on_inputs: also learn to predict the prompt tokens. A data-loading option
            (`load_training_data(..., train_on_inputs=...)`) that `train` cannot see in the
            tokens: recorded with the run's checkpoints, and a resumed run must have the same.
        warmup_steps: linear warm-up steps; None means warmup_ratio of the total.
        warmup_ratio: warm-up as a fraction of the total steps when warmup_steps is None.
        lr_schedule: decay after warm-up: "cosine", "linear" or "constant".
        weight_decay: AdamW weight decay on the adapter parameters.
        adam_betas, adam_eps: AdamW hyper-parameters.
        max_grad_norm: gradient clipping threshold; None or 0 disables clipping.
        seed: seeds the data order, dropout and any other randomness; 0 <= seed < 2**32.
        bf16: bf16 autocast; None turns it on where CUDA supports it, off on CPU.
        gradient_checkpointing: recompute activations in backward to save memory.
        torch_compile: run the training forward passes through `torch.compile`
            (`mola.compile`): fused kernels for the routing; the first steps take longer while
            it compiles. Evaluation and the model after training stay eager.
        eval_every: evaluate on eval_data every this many steps (and always at the end).
        checkpoint_every: write a checkpoint every this many steps (needs checkpoint_dir).
        keep_checkpoints: how many of the newest checkpoints to keep (0 keeps all); the
            checkpoint with the lowest eval_loss (of those written at an evaluation) is kept too.
        Numbers must be finite; every field is checked when the config is built (ValueError
        naming the field and the value).
        log_every: report training metrics every this many steps.
        prompt_template: how a bare prompt is dressed to look like the training rows (one of
            `mola.data.PROMPT_TEMPLATES`; `mola.data.prompt_template_for(data.formats)`),
            recorded with the adapter's checkpoints (`save_adapter`) so that `mola generate`
            formats prompts alike. None records nothing.
    """

    epochs: float = 3.0
    max_steps: int | None = None
    learning_rate: float = 3e-4
    batch_size: int = 128
    micro_batch_size: int = 4
    cutoff_len: int = 256
    train_on_inputs: bool = False
    warmup_steps: int | None = None
    warmup_ratio: float = schedule.DEFAULT_WARMUP_RATIO
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
    prompt_template: str | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "micro_batch_size", "log_every"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("cutoff_len", self.cutoff_len, minimum=2)  # a token and the next to predict
        _check_int("keep_checkpoints", self.keep_checkpoints, minimum=0)
        _check_int("seed", self.seed, minimum=0, maximum=MAX_SEED)
        for name in ("max_steps", "eval_every", "checkpoint_every"):
            _check_int(name, getattr(self, name), minimum=1, optional=True)
        _check_int("warmup_steps", self.warmup_steps, minimum=0, optional=True)
        _check_number("epochs", self.epochs, lambda v: v > 0, "a positive number")
        _check_number("learning_rate", self.learning_rate, lambda v: 0 < v < 1, "in (0, 1)")
        _check_number("warmup_ratio", self.warmup_ratio, lambda v: 0 <= v < 1, "in [0, 1)")
        _check_number("weight_decay", self.weight_decay, lambda v: v >= 0, "a number >= 0")
        _check_number("adam_eps", self.adam_eps, lambda v: v > 0, "a positive number")
        if self.max_grad_norm is not None:
            _check_number("max_grad_norm", self.max_grad_norm, lambda v: v >= 0, "a number >= 0 or None")
        self.adam_betas = _checked_betas(self.adam_betas)
        if not isinstance(self.lr_schedule, str) or self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        for name in ("train_on_inputs", "gradient_checkpointing", "torch_compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.bf16 is not None and not isinstance(self.bf16, bool):
            raise ValueError(f"bf16 must be True, False or None, got {self.bf16!r}")
        if self.prompt_template is not None and self.prompt_template not in PROMPT_TEMPLATES:
            raise ValueError(f"prompt_template must be one of {PROMPT_TEMPLATES} or None, got {self.prompt_template!r}")

    @property
    def accumulation_steps(self) -> int:
        return math.ceil(self.batch_size / min(self.micro_batch_size, self.batch_size))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    steps: int  # optimizer steps completed
    total_steps: int
    stopped: bool  # True when the callback stopped the run before its final step
    metrics: dict[str, Any] = field(default_factory=dict)  # the last training metrics
    eval_metrics: dict[str, Any] = field(default_factory=dict)  # the last evaluation
    history: list[dict[str, Any]] = field(default_factory=list)
    last_checkpoint: Path | None = None
    warmup_steps: int = 0  # the warm-up the run used (warmup_steps, else warmup_ratio of the total)
    bf16: bool = False  # whether it ran under bf16 autocast (bf16=None decides by the device)


class TrainingDiverged(FloatingPointError):
    """The training loss or the gradient norm stopped being a finite number at ``step``: the
    optimizer would carry the NaN into every weight it updates, so the run stops there, before
    logging, evaluating or checkpointing that step (its checkpoints are all from before)."""

    def __init__(self, step: int, values: dict[str, float], log_every: int):
        shown = ", ".join(f"{name} {value:g}" for name, value in values.items())
        since = f" (checked every log_every={log_every} steps: it may have started up to {log_every - 1} steps earlier)" if log_every > 1 else ""
        super().__init__(
            f"training diverged at step {step}: {shown}{since}; lower learning_rate, keep max_grad_norm set, "
            "or train without bf16"
        )
        self.step = step
        self.values = values


def _finite_step_values(step: int, lm_sum: Tensor, aux_sum: Tensor, grad_norm: Tensor, log_every: int) -> tuple[float, float, float]:
    """(lm_loss, aux_loss, grad_norm) of ``step`` as numbers, in one host sync; TrainingDiverged
    when one is NaN or infinite."""
    values = torch.stack([lm_sum.float(), aux_sum.float(), grad_norm.float()]).tolist()
    if not all(math.isfinite(v) for v in values):
        raise TrainingDiverged(step, dict(zip(("lm_loss", "aux_loss", "grad_norm"), values)), log_every)
    return values[0], values[1], values[2]


# ---- schedule and data order ----------------------------------------------------------------


def total_steps_for(config: TrainConfig, num_examples: int) -> int:
    return schedule.total_steps(num_examples, config.batch_size, config.epochs, config.max_steps)


def check_schedule(config: TrainConfig, num_examples: int) -> int:
    """The run's total steps for ``num_examples`` training examples; ValueError for a schedule
    that cannot run as asked (a warmup longer than the run)."""
    total_steps = total_steps_for(config, num_examples)
    if config.warmup_steps is not None and config.warmup_steps > total_steps:
        # Known only now (epochs x examples / batch_size): the schedule would never reach its peak.
        raise ValueError(
            f"warmup_steps={config.warmup_steps} is more than the run's {total_steps} steps: the learning rate "
            f"would never reach learning_rate={config.learning_rate:g}; lower warmup_steps or leave it unset (warmup_ratio)"
        )
    return total_steps


def steps_per_epoch(config: TrainConfig, num_examples: int) -> int:
    return schedule.steps_per_epoch(num_examples, config.batch_size)


warmup_steps_for = schedule.warmup_steps


def lr_lambda(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    warmup = warmup_steps_for(config.warmup_steps, config.warmup_ratio, total_steps)

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


def save_adapter(model: nn.Module, directory: str | os.PathLike, prompt_template: str | None = None, metadata: dict[str, Any] | None = None) -> None:
    """Write ``model``'s adapter into ``directory``: a MoLA adapter in its own format (with
    ``metadata`` in its description), a peft model in peft's. peft is told to leave the
    embeddings out: the adapter never trains them (its targets are decoder modules), and its
    "auto" choice looks the base model's name up on the Hugging Face hub, which a server
    without network would wait on.

    ``prompt_template`` (see `TrainConfig.prompt_template`) goes into `PROMPT_NAME` beside
    the adapter's files: a file of its own because peft warns about, and other tools may
    refuse, a key it does not know in its `adapter_config.json`."""
    directory = Path(directory)
    if hasattr(model, "peft_config"):
        if metadata:
            raise ValueError("metadata is recorded in MoLA adapters only")
        model.save_pretrained(str(directory), save_embedding_layers=False)
    else:
        model.save_pretrained(directory, metadata=metadata)
    if prompt_template is not None:
        if prompt_template not in PROMPT_TEMPLATES:
            raise ValueError(f"prompt_template must be one of {PROMPT_TEMPLATES}, got {prompt_template!r}")
        (directory / PROMPT_NAME).write_text(json.dumps({"template": prompt_template}) + "\n")


def recorded_prompt_template(directory: str | os.PathLike) -> str | None:
    """The prompt template `save_adapter` recorded in ``directory``, or None (an adapter saved
    without one, or before adapters recorded it)."""
    path = Path(directory) / PROMPT_NAME
    if not path.is_file():
        return None
    template = json.loads(path.read_text()).get("template")
    return template if template in PROMPT_TEMPLATES else None


def save_checkpoint(
    model,
    optimizer,
    scheduler,
    step: int,
    total_steps: int,
    metrics: dict,
    checkpoint_dir: Path,
    config: TrainConfig,
    num_examples: int | None = None,
    eval_metrics: dict | None = None,
) -> Path:
    """Write `checkpoint-<step>/` atomically (a temporary folder renamed into place), then
    delete the checkpoints `keep_checkpoints` does not keep. ``eval_metrics``: the evaluation
    at this step, if there was one (what the best checkpoint is chosen by)."""
    final = checkpoint_dir / f"checkpoint-{step}"
    tmp = checkpoint_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_adapter(model, tmp, config.prompt_template)
    torch.save(
        {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
        tmp / STATE_NAME,
    )
    trainer_state = {"step": step, "total_steps": total_steps, "num_examples": num_examples, "metrics": metrics, "config": config.to_dict()}
    if eval_metrics is not None:
        trainer_state["eval_metrics"] = eval_metrics
    (tmp / TRAINER_STATE_NAME).write_text(json.dumps(trainer_state, indent=2, default=str) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if config.keep_checkpoints:
        found = list_checkpoints(checkpoint_dir)
        kept = set(found[-config.keep_checkpoints :])
        best = best_checkpoint(found)
        if best is not None:
            kept.add(best)
        for old in found:
            if old not in kept:
                shutil.rmtree(old, ignore_errors=True)
    return final


def _eval_loss(checkpoint: Path) -> float | None:
    """The eval_loss recorded with a checkpoint; None when it was not written at an evaluation."""
    try:
        state = json.loads((checkpoint / TRAINER_STATE_NAME).read_text())
    except (OSError, ValueError):
        return None
    loss = (state.get("eval_metrics") or {}).get("eval_loss")
    return float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else None


def best_checkpoint(checkpoints: Sequence[Path]) -> Path | None:
    """Of ``checkpoints`` (from `list_checkpoints`), the one with the lowest eval_loss (the
    earliest of equals); None when none was written at an evaluation."""
    scored = [(loss, _checkpoint_step(path), path) for path in checkpoints if (loss := _eval_loss(path)) is not None]
    return min(scored)[2] if scored else None


def _checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[-1])


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``checkpoint_dir``, oldest first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("checkpoint-*") if p.is_dir() and (p / STATE_NAME).is_file() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=_checkpoint_step)


def load_adapter_weights(model: nn.Module, directory: Path) -> None:
    if hasattr(model, "load_adapter_weights"):  # MolaModel
        model.load_adapter_weights(directory)
        return
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(directory / "adapter_model.safetensors")))


# ---- resuming -------------------------------------------------------------------------------

# What a resumed run must share with its checkpoint: what shapes the learning-rate schedule, the
# data order and the update. A different value would not fail: it would mix two runs (step 7 of
# 8 at the learning rate 0 that ended a 6-step schedule), or be ignored without a word, since the
# optimizer's and scheduler's saved states bring back the checkpoint's learning rate, betas, eps
# and weight decay. cutoff_len and train_on_inputs say what the data is. Compared through what
# they give: epochs and max_steps (the total steps, with the number of examples), warmup_steps
# and warmup_ratio (the warm-up length).
# May differ: micro_batch_size (accumulation gives the same LM-loss gradient, tested, so a run
# may resume on a smaller GPU; only the balance loss, averaged per micro-batch, moves slightly);
# how a step is computed (bf16, gradient_checkpointing, torch_compile); what is only reported or
# kept (log_every, eval_every, checkpoint_every, keep_checkpoints).
RESUME_MUST_MATCH = (
    "batch_size", "seed", "learning_rate", "lr_schedule", "weight_decay", "adam_betas", "adam_eps",
    "max_grad_norm", "cutoff_len", "train_on_inputs",
)


def _comparable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value  # JSON gives lists for tuples


def _resume_differences(saved: dict[str, Any], config: TrainConfig, total_steps: int, num_examples: int) -> list[str]:
    """``"what: X in the checkpoint, Y now"`` for each value in ``saved`` (a checkpoint's trainer
    state) that this run would have otherwise. Values an older checkpoint lacks are not compared."""
    before, now = saved.get("config") or {}, config.to_dict()
    differences = [
        f"{name}: {before[name]!r} in the checkpoint, {now[name]!r} now"
        for name in RESUME_MUST_MATCH
        if name in before and _comparable(before[name]) != _comparable(now[name])
    ]
    if saved.get("num_examples") not in (None, num_examples):
        differences.append(f"examples: {saved['num_examples']} in the checkpoint, {num_examples} now")
    saved_total = saved.get("total_steps")
    if saved_total is not None and saved_total != total_steps:
        differences.append(
            f"total steps: {saved_total} in the checkpoint, {total_steps} now (max_steps "
            f"{before.get('max_steps')!r} -> {config.max_steps!r}, epochs {before.get('epochs')!r} -> {config.epochs!r})"
        )
    if saved_total is not None and "warmup_ratio" in before:
        warmup_before = warmup_steps_for(before.get("warmup_steps"), before["warmup_ratio"], saved_total)
        warmup_now = warmup_steps_for(config.warmup_steps, config.warmup_ratio, total_steps)
        if warmup_before != warmup_now:
            differences.append(f"warm-up steps (warmup_steps, else warmup_ratio of the total): {warmup_before} in the checkpoint, {warmup_now} now")
    return differences


# What the resumed model's adapter must share with the checkpoint's. Shapes alone are not
# enough: a MoLA model built with another top_k, alpha, dropout or balance-loss weight (or a
# LoRA with another alpha) loads the checkpoint's weights without error and trains them as
# something else, and peft loads a LoRA state dict without complaining about missing modules.
MOLA_ADAPTER_MUST_MATCH = ("experts_per_layer", "top_k_per_layer", "rank", "alpha", "dropout", "aux_loss_coef")
LORA_ADAPTER_MUST_MATCH = ("target_modules", "r", "lora_alpha", "lora_dropout", "rank_pattern", "alpha_pattern")


def _adapter_comparable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return tuple(sorted(value))
    return _comparable(value)


def _adapter_differences(model: nn.Module, resume_path: Path) -> list[str]:
    """``"adapter what: X in the checkpoint, Y now"`` for each adapter option of ``model`` (a
    `MolaModel` or a peft LoRA model) that differs from the checkpoint's saved adapter."""
    if hasattr(model, "describe") and hasattr(model, "mola_modules"):  # MolaModel
        from mola.model import read_adapter_config

        saved, now, fields = read_adapter_config(resume_path), model.describe(), MOLA_ADAPTER_MUST_MATCH
    else:
        peft_configs = getattr(model, "peft_config", None)
        path = resume_path / "adapter_config.json"
        if not isinstance(peft_configs, dict) or not peft_configs or not path.is_file():
            return []
        active = getattr(model, "active_adapter", None)
        now = (peft_configs.get(active) or next(iter(peft_configs.values()))).to_dict()
        saved, fields = json.loads(path.read_text()), LORA_ADAPTER_MUST_MATCH
        if saved.get("adapter_type") == "mola":
            return ["adapter: MoLA in the checkpoint, LoRA now"]
        if "target_modules" in saved and isinstance(saved["target_modules"], list):
            saved = {**saved, "target_modules": set(saved["target_modules"])}
    return [
        f"adapter {name}: {saved[name]!r} in the checkpoint, {now.get(name)!r} now"
        for name in fields
        if name in saved and _adapter_comparable(saved[name]) != _adapter_comparable(now.get(name))
    ]


def _read_resume_state(
    resume_path: Path, config: TrainConfig, total_steps: int, num_examples: int, model: nn.Module | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(training state, trainer state)`` of the checkpoint at ``resume_path``, once it is
    known that this run continues the one that wrote it, with ``model``'s adapter (ValueError
    naming what differs)."""
    if not (resume_path / STATE_NAME).is_file():
        raise FileNotFoundError(f"{resume_path} is not a checkpoint: it has no {STATE_NAME}")
    saved: dict[str, Any] = {}
    if (resume_path / TRAINER_STATE_NAME).is_file():
        saved = json.loads((resume_path / TRAINER_STATE_NAME).read_text())
    else:
        logger.warning("%s has no %s: cannot check that this run's config is the checkpoint's", resume_path, TRAINER_STATE_NAME)
    differences = _resume_differences(saved, config, total_steps, num_examples)
    if model is not None:
        differences += _adapter_differences(model, resume_path)
    if differences:
        raise ValueError(
            f"cannot resume from {resume_path}: this run's schedule, data or adapter differ from the checkpoint's "
            f"({'; '.join(differences)}); resume with the checkpoint's config, data and adapter, or start a new run"
        )
    return torch.load(resume_path / STATE_NAME, map_location="cpu", weights_only=False), saved


def _check_checkpoint_dir(checkpoint_root: Path, resume_step: int | None) -> None:
    """Refuse a ``checkpoint_dir`` holding checkpoints of another run: any, for a fresh run; any
    newer than the resume point, for a resumed one.

    Left there, they would mix with this run's: `keep_checkpoints` deletes the oldest steps, so
    the other run's higher steps would stay while this run's checkpoints are deleted as soon as
    they are written, and "resume from the newest" would pick one of theirs. They are refused
    rather than deleted: they may be the only copy of a run that someone still wants.
    """
    found = list_checkpoints(checkpoint_root)
    others = [p for p in found if resume_step is None or _checkpoint_step(p) > resume_step]
    if not others:
        return
    names = ", ".join(p.name for p in others)
    if resume_step is None:
        raise ValueError(
            f"checkpoint_dir {checkpoint_root} already holds checkpoints of another run ({names}): "
            f"resume from the newest (resume_from={found[-1]}) or train into an empty folder"
        )
    raise ValueError(
        f"checkpoint_dir {checkpoint_root} holds checkpoints past the resume point, step {resume_step} ({names}): "
        f"resume from the newest ({found[-1]}) or move them away"
    )


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


def _labelled_targets(example: dict[str, Sequence[int]]) -> int:
    """Tokens the loss is on: labels other than -100 after the first (position 0 predicts
    nothing). Labels default to the input ids, as `mola.data.collate` makes them."""
    labels = example.get("labels", example["input_ids"])
    return sum(1 for t in labels[1:] if t != IGNORE_INDEX)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _longest_example(name: str, data: Sequence[dict]) -> int:
    for index, example in enumerate(data):
        if not isinstance(example, dict) or "input_ids" not in example:
            raise ValueError(f"{name}[{index}] is not an example with 'input_ids' (see mola.data.load_training_data)")
        if len(example["input_ids"]) == 0:
            raise ValueError(f"{name}[{index}] has no tokens (empty 'input_ids')")
        if "labels" in example and len(example["labels"]) != len(example["input_ids"]):
            raise ValueError(
                f"{name}[{index}] has {len(example['labels'])} labels for {len(example['input_ids'])} input_ids: "
                "one label per token (-100 where the loss is off)"
            )
    return max((len(example["input_ids"]) for example in data), default=0)


def _check_data(model: nn.Module, train_data: Sequence[dict], eval_data: Sequence[dict] | None, config: TrainConfig) -> None:
    """Clear errors for data `train` cannot use: none, or an example longer than the model's
    positions (else an index error deep in the position embeddings, or a device-side assert on a
    GPU) or than ``config.cutoff_len`` (the data was tokenized with another cutoff than the one
    the run records and a resume compares)."""
    if not train_data:
        raise ValueError(
            "train_data is empty: no example left to train on (were they all dropped when tokenized, "
            "with no trainable token within cutoff_len?)"
        )
    positions = max_positions(model)
    for name, data in (("train_data", train_data), ("eval_data", eval_data or ())):
        longest = _longest_example(name, data)
        if positions is not None and longest > positions:
            raise ValueError(
                f"{name} has an example of {longest} tokens but the model has {positions} positions: "
                f"tokenize with cutoff_len <= {positions}"
            )
        if longest > config.cutoff_len:
            raise ValueError(
                f"{name} has an example of {longest} tokens, more than cutoff_len={config.cutoff_len}: "
                f"tokenize with the run's cutoff_len (load_training_data(..., cutoff_len={config.cutoff_len})) "
                f"or set TrainConfig.cutoff_len to the one the data was tokenized with"
            )
    # Stops at the first example with a target: cheap for real data. Without any, every step
    # would train the balance loss alone and report an LM loss of 0.
    if not any(_labelled_targets(example) for example in train_data):
        raise ValueError(
            "train_data has no labelled token to learn: every label after the first token of each example is -100 "
            "(the first token predicts nothing)"
        )


# Where transformers keeps a model's activation-checkpointing and input-require-grads state: on
# each module, the flag and checkpoint function (`_set_gradient_checkpointing`), and on the
# model, the handles of `enable_input_require_grads`'s hooks. Enabling checkpointing replaces the
# handles of hooks the user had enabled (they stay registered, but the user's own
# `disable_input_require_grads()` could no longer remove them), so `train` saves and restores
# these attributes rather than switching features back on and off.
_CHECKPOINTING_STATE = ("gradient_checkpointing", "_gradient_checkpointing_func", "_require_grads_hooks", "_require_grads_hook")


def _checkpointing_state(model: nn.Module) -> list[tuple[nn.Module, dict[str, Any]]]:
    return [(module, {k: module.__dict__[k] for k in _CHECKPOINTING_STATE if k in module.__dict__}) for module in model.modules()]


def _restore_checkpointing_state(state: list[tuple[nn.Module, dict[str, Any]]]) -> None:
    for module, saved in state:
        for key in _CHECKPOINTING_STATE:
            if key in saved:
                setattr(module, key, saved[key])
            elif key in module.__dict__:
                delattr(module, key)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of each decoder layer, as ``TrainConfig(gradient_checkpointing=True)``
    runs it (bench/step_bench.py uses it too), without the input-require-grads hooks that
    transformers adds with it (only reentrant checkpointing needs them, and torch.compile would
    break its graph there); hooks the user had enabled stay."""
    options = {"use_reentrant": False}
    # transformers 5 renamed the switch and its argument; older releases have the old ones.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()  # removes the hooks enabling just added, not older ones


@contextmanager
def _training_mode(model: nn.Module, gradient_checkpointing: bool) -> Iterator[None]:
    """Train mode, and activation checkpointing without a KV cache when asked, inside the block;
    afterwards the model as it came: each module's own mode (a model left training keeps its
    dropout on, so its logits differ from the saved adapter's), its checkpointing state (off,
    or on with the user's own options) and input-require-grads hooks, and its
    ``config.use_cache``."""
    modes = [(module, module.training) for module in model.modules()]
    model_config = getattr(model, "config", None)
    use_cache = getattr(model_config, "use_cache", None)
    checkpointing = _checkpointing_state(model)
    try:
        if gradient_checkpointing:
            enable_activation_checkpointing(model)
            model_config.use_cache = False
        model.train()
        yield
    finally:
        for module, training in modes:
            module.training = training
        if gradient_checkpointing:
            _restore_checkpointing_state(checkpointing)
        if use_cache is not None:
            model_config.use_cache = use_cache


def _accumulate_gradients(
    forward_model: nn.Module, aux_loss_coef: float, batch: list[dict], micro: int, pad_id: int, device: torch.device, autocast_dtype: torch.dtype | None
) -> tuple[Tensor, Tensor, int]:
    """Forward and backward over ``batch`` in micro-batches of ``micro`` examples; returns the
    batch's LM loss and balance loss (detached) and its count of input tokens."""
    # Normalise by the labelled tokens of the whole batch, so accumulation over
    # micro-batches gives exactly the gradient of one big batch.
    label_tokens = sum(_labelled_targets(example) for example in batch)
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
                loss = lm + aux_loss_coef * aux
                aux_sum += aux.detach()
        loss.backward()
        lm_sum += lm.detach()
    return lm_sum, aux_sum, input_tokens


def train(
    model: nn.Module,
    tokenizer: Any,
    train_data: Sequence[dict[str, list[int]]],
    eval_data: Sequence[dict[str, list[int]]] | None = None,
    config: TrainConfig | None = None,
    callback: Callback | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
    extra_eval: Callable[[nn.Module], dict[str, Any]] | None = None,
) -> TrainResult:
    """Train the adapter of ``model`` (a `MolaModel` or a peft LoRA model) on tokenized data.

    ``train_data``/``eval_data``: sequences of ``{"input_ids", "labels"}`` (see
    `mola.data.load_training_data`; labels default to the input ids), none longer than
    ``config.cutoff_len``. ``callback`` receives one dict per event (``kind`` = "train", "eval"
    or "checkpoint"); returning True stops the run after the current step, writing a checkpoint
    first when ``checkpoint_dir`` is set (True on the final step changes nothing: the run is
    complete and ends as usual, with its final evaluation and checkpoint). ``checkpoint_dir``
    must not hold another run's checkpoints. ``resume_from``: a checkpoint folder written by an
    earlier run with the same data and config (what must match: `RESUME_MUST_MATCH`).
    ``extra_eval(model)``, with ``eval_data``: more metrics for each evaluation event (e.g.
    generated answers scored by `mola.evaluate.completion_match`), called under the run's
    autocast; the model is in its training mode and must be left so (the evaluate functions do).
    The model leaves in the train/eval mode it came in, with its activation checkpointing and
    KV-cache settings.
    """
    config = config or TrainConfig()
    if extra_eval is not None and eval_data is None:
        # Its metrics go into evaluation events, and there are none without eval_data.
        raise ValueError("extra_eval needs eval_data: its metrics are added to the evaluations of eval_data")
    _check_data(model, train_data, eval_data, config)
    total_steps = check_schedule(config, len(train_data))
    per_epoch = steps_per_epoch(config, len(train_data))
    resume_state, saved = None, {}
    if resume_from is not None:
        resume_state, saved = _read_resume_state(Path(resume_from), config, total_steps, len(train_data), model)
    checkpoint_root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if checkpoint_root is not None:
        _check_checkpoint_dir(checkpoint_root, int(resume_state["step"]) if resume_state else None)
    device = next(p for p in model.parameters()).device
    use_bf16 = config.bf16 if config.bf16 is not None else bf16_by_default(device)
    autocast_dtype = torch.bfloat16 if use_bf16 else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    micro = min(config.micro_batch_size, config.batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "the model has no trainable parameters (load_mola_model freezes the adapter unless "
            "is_trainable=True; get_mola_model and get_lora_model train theirs)"
        )
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=config.adam_betas, eps=config.adam_eps, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))
    aux_loss_coef = getattr(getattr(model, "mola_config", None), "aux_loss_coef", 0.0)

    with _training_mode(model, config.gradient_checkpointing):
        forward_model = compile_for_training(model) if config.torch_compile else model
        start_step = 0
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed)
        resumed_metrics: dict[str, Any] = {}
        if resume_state is not None:
            load_adapter_weights(model, Path(resume_from))
            optimizer.load_state_dict(resume_state["optimizer"])
            scheduler.load_state_dict(resume_state["scheduler"])
            _set_rng_state(resume_state["rng"])
            start_step = int(resume_state["step"])
            # Until a step runs here, the last training metrics are the checkpoint's: a run resumed
            # from its final checkpoint (its process died before it reported) still has them.
            resumed_metrics = dict(saved.get("metrics") or {})
            logger.info("resumed from %s at step %d of %d", resume_from, start_step, total_steps)

        result = TrainResult(
            steps=start_step,
            total_steps=total_steps,
            stopped=False,
            metrics=resumed_metrics,
            warmup_steps=warmup_steps_for(config.warmup_steps, config.warmup_ratio, total_steps),
            bf16=use_bf16,
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def emit(event: dict[str, Any]) -> bool:
            return bool(callback(event)) if callback is not None else False

        def run_eval(step: int) -> bool:
            metrics = evaluate_loss(model, eval_data, pad_id, batch_size=micro, autocast_dtype=autocast_dtype)
            if extra_eval is not None:
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    extra = extra_eval(model)
                clashes = sorted(set(extra) & {*metrics, "kind", "step", "total_steps", "epoch"})
                if clashes:
                    raise ValueError(f"extra_eval returned {clashes}, names the evaluation event already has")
                metrics.update(extra)
            event = {"kind": "eval", "step": step, "total_steps": total_steps, "epoch": step / per_epoch, **metrics}
            result.eval_metrics = event
            return emit(event)

        def checkpoint(step: int, metrics: dict) -> bool:
            evaluated = result.eval_metrics if result.eval_metrics and result.eval_metrics["step"] == step else None
            path = save_checkpoint(
                model, optimizer, scheduler, step, total_steps, metrics, checkpoint_root, config, num_examples=len(train_data), eval_metrics=evaluated
            )
            result.last_checkpoint = path
            return emit({"kind": "checkpoint", "step": step, "total_steps": total_steps, "epoch": step / per_epoch, "path": str(path)})

        metrics: dict[str, Any] = {}
        for step in range(start_step, total_steps):
            started = time.perf_counter()
            batch = [train_data[i] for i in batch_indices(config, len(train_data), step)]
            lm_sum, aux_sum, input_tokens = _accumulate_gradients(forward_model, aux_loss_coef, batch, micro, pad_id, device, autocast_dtype)
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

            logged = done % config.log_every == 0 or done == total_steps
            evaluating = bool(eval_data and config.eval_every and done % config.eval_every == 0 and done < total_steps)
            saving = checkpoint_root is not None and done < total_steps and bool(config.checkpoint_every and done % config.checkpoint_every == 0)
            # Every step whose state leaves the loop is checked first (a stop's checkpoint follows
            # a logged or evaluated step): no NaN is reported as a metric or saved as a checkpoint.
            if logged or evaluating or saving:
                lm_value, aux_value, grad_norm_value = _finite_step_values(done, lm_sum, aux_sum, grad_norm, config.log_every)
            stop = False
            if logged:
                elapsed = time.perf_counter() - started
                metrics = {
                    "kind": "train",
                    "step": done,
                    "total_steps": total_steps,
                    "epoch": done / per_epoch,
                    "loss": lm_value + aux_loss_coef * aux_value,
                    "lm_loss": lm_value,
                    "aux_loss": aux_value,
                    "lr": lr,
                    "grad_norm": grad_norm_value,
                    "tokens_per_s": input_tokens / elapsed if elapsed > 0 else None,
                    "step_time_s": elapsed,
                    "peak_memory_mb": _peak_memory_mb(device),
                }
                result.metrics = metrics
                result.history.append(metrics)
                stop = emit(metrics)
            if evaluating:
                stop = run_eval(done) or stop
            if checkpoint_root is not None and done < total_steps and (stop or saving):
                stop = checkpoint(done, metrics) or stop
            # A stop on the final step is no early stop: the run has done all its steps, so it
            # ends below as every complete run does, with its final evaluation and checkpoint.
            if stop and done < total_steps:
                result.stopped = True
                logger.info("training stopped by the callback at step %d of %d", done, total_steps)
                return result

        if eval_data:
            run_eval(result.steps)
        if checkpoint_root is not None and start_step < total_steps:
            checkpoint(result.steps, metrics)
    return result
