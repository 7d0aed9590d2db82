"""The quick task behind an upload's token counts: re-read the dataset row, fetch the file from
storage, run `mola.data.inspect_dataset` with each catalogue model's tokenizer (tokenizers only,
no weights) and store the per-model statistics on the row with a status.

Models whose tokenizers are the same (the tiny models share the byte-level tokenizer) share one
pass over the data. The counts use the default `cutoff_len` of a job, so `over_cutoff` says how
many rows a job with default hyperparameters would cut.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from service import catalogue
from service import datasets as dataset_service
from service.db import session_scope
from service.models import Dataset
from service.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_CUTOFF_LEN = 256  # the `cutoff_len` default of a job's hyperparameters (api/schemas.py)


def tokenizer_fingerprint(tokenizer: Any) -> tuple:
    """Equal for tokenizers that encode and render alike (the same kind, vocabulary, special
    tokens and chat template), so their models can share one count; a different load path of
    the same tokenizer (the tiny models' byte-level one) does not matter."""
    vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    return (
        type(tokenizer).__qualname__,
        vocab,
        getattr(tokenizer, "chat_template", None),
        tokenizer.bos_token,
        tokenizer.eos_token,
        tokenizer.pad_token,
    )


def count_for_models(path: Path, names: list[str], cutoff_len: int = DEFAULT_CUTOFF_LEN) -> tuple[dict[str, Any], dict[str, str]]:
    """({model: statistics} for the models counted, {model: error} for the others)."""
    from mola.data import inspect_dataset
    from mola.models import load_tokenizer

    counts: dict[str, Any] = {}
    errors: dict[str, str] = {}
    done: dict[tuple, dict[str, Any]] = {}
    for name in names:
        try:
            tokenizer = load_tokenizer(name)
            key = tokenizer_fingerprint(tokenizer)
            if key not in done:
                report = inspect_dataset(path, tokenizer=tokenizer, cutoff_len=cutoff_len)
                done[key] = {field: getattr(report, field) for field in dataset_service.TOKEN_COUNT_FIELDS}
            counts[name] = dict(done[key])
        except Exception as exc:  # one model's tokenizer missing here must not hide the others
            logger.warning("token count of %s with %s failed: %s", path, name, exc)
            errors[name] = f"{type(exc).__name__}: {exc}"
    return counts, errors


def count_tokens(dataset_id: str, settings: Settings, sessions, storage) -> str:
    """Count the tokens of ``dataset_id`` for every catalogue model and record them; returns the
    status written ("ready" or "failed"), "gone" for a deleted dataset, or "done" when an earlier
    message already counted it."""
    with session_scope(sessions) as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None or dataset.deleted_at is not None:
            logger.info("dataset %s is gone; no token count", dataset_id)
            return "gone"
        if dataset.token_counts_status != "pending":
            # The reconciler asks again for a count that waited long, and a busy quick queue
            # may then hold several messages for one dataset: the first does the work.
            logger.info("dataset %s: token counts already %s", dataset_id, dataset.token_counts_status)
            return "done"
        key = dataset.storage_key
        names = [m.name for m in catalogue.list_models(session)] or list(settings.models)
    settings.scratch_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(dir=settings.scratch_dir, prefix="count-") as work:
            path = storage.get_file(key, Path(work) / "dataset.jsonl")
            counts, errors = count_for_models(path, names)
        error = "; ".join(f"{name}: {message}" for name, message in errors.items()) or None
    except Exception as exc:  # the file is unreadable or gone from storage: say so on the row
        logger.exception("token count of dataset %s failed", dataset_id)
        error = f"{type(exc).__name__}: {exc}"
    status = "failed" if error else "ready"
    with session_scope(sessions) as session:
        dataset_service.record_token_counts(session, dataset_id, counts, status, error)
    logger.info("dataset %s: token counts %s for %s", dataset_id, status, ", ".join(counts) or "no model")
    return status
