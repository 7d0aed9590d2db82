"""The base-model catalogue: what `GET /models` lists and what job requests are checked against.

The API cannot load models, so `sync` (run by `mola models sync` and at `mola serve` start-up, in
a process that may import torch) asks the library to describe each configured model and stores
the description.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.models import BaseModelEntry, utcnow

logger = logging.getLogger(__name__)

FIELDS = ("model_type", "num_layers", "hidden_size", "target_modules", "linear_modules")
OPTIONAL_FIELDS = ("module_paths", "max_positions", "module_shapes")  # unknown for some models: null


def _describe(name: str) -> dict[str, Any]:
    from mola.models import describe_base_model  # imports torch/transformers: CLI and worker only

    return describe_base_model(name)


def sync(
    session: Session, names: list[str], describe: Callable[[str], dict[str, Any]] | None = None
) -> tuple[list[str], dict[str, str]]:
    """Describe every model in ``names`` and upsert it; rows of models no longer configured are
    removed. Returns (synced names, {name: error} for those that could not be described)."""
    describe = describe or _describe
    synced: list[str] = []
    errors: dict[str, str] = {}
    for name in names:
        try:
            info = describe(name)
        except Exception as exc:  # a model missing from this machine must not stop the others
            logger.warning("cannot describe base model %s: %s", name, exc)
            errors[name] = f"{type(exc).__name__}: {exc}"
            continue
        upsert(session, name, info)
        synced.append(name)
    for entry in session.scalars(select(BaseModelEntry).where(BaseModelEntry.name.not_in(names))):
        session.delete(entry)
    session.flush()
    return synced, errors


def upsert(session: Session, name: str, info: dict[str, Any]) -> BaseModelEntry:
    entry = session.get(BaseModelEntry, name) or BaseModelEntry(name=name)
    for field in FIELDS:
        setattr(entry, field, info[field])
    for field in OPTIONAL_FIELDS:
        setattr(entry, field, info.get(field))
    entry.synced_at = utcnow()
    session.add(entry)
    session.flush()
    return entry


def list_models(session: Session) -> list[BaseModelEntry]:
    return list(session.scalars(select(BaseModelEntry).order_by(BaseModelEntry.name)))
