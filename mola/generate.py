"""Trying a trained adapter: load it onto its base model and generate from prompts.

An adapter is a folder (`adapter_config.json` + `adapter_model.safetensors`) or the `.tar.gz`
the service serves for a job, MoLA or (a ``lora`` job's) peft LoRA. Prompts are formatted by
`mola.data.render`, the code that formatted the training data, so a prompt asked here looks to
the model exactly like the prompts it was trained on:

    with open_adapter("job_01a2-adapter.tar.gz") as adapter:
        texts = generate(adapter.model, adapter.tokenizer, [prompt("Name a prime.", adapter.tokenizer)])
"""

from __future__ import annotations

import json
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mola.architectures import max_positions
from mola.data import PROMPT_TEMPLATES, iter_encoded_pairs, render
from mola.evaluate import generate_ids, pad_token_id
from mola.train import recorded_prompt_template

CONFIG_NAME = "adapter_config.json"
TEMPLATES = PROMPT_TEMPLATES  # see mola.data: alpaca, chat, raw


@dataclass
class LoadedAdapter:
    """An adapter on its base model, in eval mode. ``kind``: "mola" or "lora"; ``base_model``:
    the name or folder the base was loaded from; ``description``: its `adapter_config.json`;
    ``prompt_template``: how its training rows' prompts were dressed (`TEMPLATES`), None when
    the adapter does not record it (saved before adapters did, or by hand)."""

    model: nn.Module
    tokenizer: Any
    kind: str
    base_model: str
    description: dict[str, Any]
    prompt_template: str | None = None


@contextmanager
def adapter_folder(path: str | Path) -> Iterator[Path]:
    """The folder holding an adapter's files: ``path`` itself, or a `.tar.gz` (the service's
    download) unpacked into a temporary folder that is removed afterwards."""
    path = Path(path)
    if path.is_dir():
        yield path
        return
    if not path.exists():
        raise FileNotFoundError(f"no adapter at {path}")
    if not tarfile.is_tarfile(path):
        raise ValueError(f"{path} is neither an adapter folder nor a .tar.gz of one")
    with tempfile.TemporaryDirectory(prefix="mola-adapter-") as folder, tarfile.open(path, "r:*") as tar:
        members = tar.getmembers()
        # Only plain files at the top level: what the service packs. Anything else (a path
        # climbing out, a link) is not an adapter archive and is not unpacked.
        if any(not m.isfile() or "/" in m.name.strip("./") or m.name.startswith(("/", "..")) for m in members):
            raise ValueError(f"{path}: the archive holds more than an adapter's files")
        for member in members:
            source = tar.extractfile(member)
            assert source is not None  # a regular file, checked above
            (Path(folder) / Path(member.name).name).write_bytes(source.read())
        yield Path(folder)


def adapter_kind(folder: str | Path) -> str:
    """"mola" or "lora" from the folder's `adapter_config.json`."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}: not an adapter")
    config = json.loads(path.read_text())
    if config.get("adapter_type") == "mola":
        return "mola"
    if str(config.get("peft_type", "")).upper() == "LORA":
        return "lora"
    raise ValueError(f"{path} describes neither a MoLA nor a LoRA adapter")


@contextmanager
def open_adapter(
    path: str | Path,
    model: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    cache_dir: str | Path | None = None,
) -> Iterator[LoadedAdapter]:
    """Load the adapter at ``path`` (folder or `.tar.gz`) onto its base model: ``model`` (a
    name `mola.models.load_base_model` knows, or a local folder), by default the one the
    adapter records. The model is moved to ``device`` (and ``dtype``) in eval mode. It stays
    usable after the ``with`` block, which only removes an unpacked archive's folder."""
    from mola.models import load_base_model

    with adapter_folder(path) as folder:
        base_name = model or _describe(folder)[1].get("base_model_name_or_path")
        if not base_name:
            raise ValueError(f"{path}: the adapter does not record its base model; name it (--model)")
        base, tokenizer = load_base_model(base_name, cache_dir=cache_dir)
        yield _put_on(folder, base.to(device=device), tokenizer, base_name, dtype)


@contextmanager
def attach_adapter(path: str | Path, base: nn.Module, tokenizer: Any, base_name: str, dtype: torch.dtype | None = None) -> Iterator[LoadedAdapter]:
    """The adapter at ``path`` (folder or `.tar.gz`) on an already loaded ``base`` model (named
    ``base_name``), in eval mode, for the ``with`` block; then taken off again, leaving ``base``
    as it was (in eval mode) for the next adapter. So a program trying many adapters of one
    base model loads it once. The adapter goes to the base's device, cast to ``dtype`` (None:
    as loaded) with the rest of the model."""
    if carries_adapter(base):
        raise ValueError("the base model already carries an adapter")
    with adapter_folder(path) as folder:
        adapter = _put_on(folder, base, tokenizer, base_name, dtype)
        try:
            yield adapter
        finally:
            adapter.model.unload()


def _put_on(folder: Path, base: nn.Module, tokenizer: Any, base_name: str, dtype: torch.dtype | None) -> LoadedAdapter:
    """The adapter in ``folder`` injected into ``base`` (MoLA, or peft for LoRA), on the base's
    device in ``dtype``, in eval mode."""
    kind, description = _describe(folder)
    if kind == "mola":
        from mola.model import load_mola_model

        loaded = load_mola_model(base, folder)
    else:
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(base, str(folder))
    try:
        loaded.to(device=next(base.parameters()).device, dtype=dtype).eval()
    except BaseException:
        loaded.unload()
        raise
    return LoadedAdapter(loaded, tokenizer, kind, base_name, description, recorded_prompt_template(folder))


def carries_adapter(model: nn.Module) -> bool:
    """Whether MoLA or peft adapter layers are in ``model`` (a base model to reuse must not)."""
    from mola.layer import MolaLinear

    peft_layer = _peft_layer_type()
    return any(isinstance(m, MolaLinear) or (peft_layer is not None and isinstance(m, peft_layer)) for m in model.modules())


def _peft_layer_type() -> type | None:
    # peft's layers can only be in a model if peft was imported; do not import it to find out.
    if "peft" not in sys.modules:
        return None
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer


def _describe(folder: Path) -> tuple[str, dict[str, Any]]:
    """(kind, description) of the adapter in ``folder``: its `adapter_config.json` (a MoLA
    adapter's as `mola.model.read_adapter_config` reads it)."""
    from mola.model import read_adapter_config

    kind = adapter_kind(folder)
    return kind, read_adapter_config(folder) if kind == "mola" else json.loads((folder / CONFIG_NAME).read_text())


def prompt(text: str, tokenizer: Any, template: str = "alpaca", input: str | None = None) -> tuple[str, bool]:
    """``(prompt text, has its special tokens)`` for a bare ``text``, rendered as training
    rendered a row of the matching format (see `TEMPLATES`; ``input`` is the Alpaca input)."""
    if template == "alpaca":
        record: dict[str, Any] = {"instruction": text, "input": input or "", "output": ""}
        fmt = "alpaca"
    elif input is not None:
        raise ValueError(f"an input goes with the alpaca template only, not {template!r}")
    elif template == "chat":
        record = {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]}
        fmt = "chat"
    elif template == "raw":
        record = {"prompt": text, "completion": ""}
        fmt = "completion"
    else:
        raise ValueError(f"unknown template {template!r}; one of {', '.join(TEMPLATES)}")
    # The format is known: the record is built here, not a data row to check (an empty prompt
    # is no malformed row, and its empty completion is the one to generate).
    rendered, _, special = render(record, tokenizer, fmt)
    return rendered, special


@dataclass
class ReferenceRow:
    """A data row to generate from and score: ``prompt`` rendered as training rendered it
    (``special``: it holds its special tokens), ``reference`` the completion it was given, and
    ``row`` its number among the records (1 for the first)."""

    row: int
    prompt: str
    special: bool
    reference: str


def reference_rows(records: Sequence[dict], tokenizer: Any) -> list[ReferenceRow]:
    """The records (`mola.data.read_records`) that have a prompt, each rendered as training
    rendered it, with its reference completion. Text rows have no prompt and are left out (the
    count left out is ``len(records) - len(rows)``). A record the tokenizer's chat template
    refuses raises ``ValueError("row N: cannot render the record: ...")``."""
    rows = []
    for number, record in enumerate(records, start=1):
        try:
            text, reference, special = render(record, tokenizer)
        except Exception as error:  # a chat template may refuse a conversation (a role, say)
            raise ValueError(f"row {number}: cannot render the record: {error}") from error
        if text:
            rows.append(ReferenceRow(number, text, special, reference))
    return rows


def encode_prompts(prompts: Sequence[tuple[str, bool]], tokenizer: Any) -> list[list[int]]:
    """Token ids of rendered prompts, tokenized by training's own code: special tokens added
    as it added them (not to a prompt that already holds them: a rendered chat template)."""
    return [prompt_ids for prompt_ids, _ in iter_encoded_pairs([(text, "", special) for text, special in prompts], tokenizer)]


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[tuple[str, bool]],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    batch_size: int = 8,
    names: Sequence[str] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """The completions of rendered ``prompts`` (`prompt`, or `mola.data.render` of a record):
    greedy by default, sampled with ``temperature`` > 0 (``seed`` makes it repeatable). A
    completion ends at EOS, after ``max_new_tokens``, or where the model's positions end.
    A prompt that fills the model's positions raises ``ValueError`` naming it by ``names``
    (default "prompt 0", "prompt 1", ...). ``on_progress(done, total)``: after each batch."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    encoded = encode_prompts(prompts, tokenizer)
    positions = max_positions(model)
    budgets = [max_new_tokens if positions is None else min(max_new_tokens, positions - len(ids)) for ids in encoded]
    for i, budget in enumerate(budgets):
        if budget < 1:
            name = names[i] if names is not None else f"prompt {i}"
            raise ValueError(f"{name} has {len(encoded[i])} tokens: it leaves no room in the model's {positions} positions")
    if seed is not None:
        torch.manual_seed(seed)
    new = generate_ids(model, encoded, budgets, pad_token_id(tokenizer), tokenizer.eos_token_id, batch_size, temperature=temperature, top_p=top_p, on_progress=on_progress)
    return tokenizer.batch_decode(new, skip_special_tokens=True)
