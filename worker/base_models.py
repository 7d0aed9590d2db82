"""The base model of a worker's last generation, kept a while for the next one.

Loading a base model takes seconds to minutes for a real one, far longer than a few
completions, and whoever tries a job's adapter usually asks again soon. So a worker keeps the
last base model a generation loaded, idle, for `MOLA_GENERATION_KEEP_BASE_SECONDS`, and the
next generation on that model puts its adapter on it (`mola.generate.attach_adapter`, which
takes the adapter off again). Training comes first: a run in the same process lets the model
go before it starts (`release`), so a kept model never holds memory a run needs.

One model is kept, never two: asking for another base model lets the idle one go before the
new one loads. A model is kept only when it carries no adapter after use; if anything went
wrong while an adapter was on it, it is dropped rather than trusted.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class _Kept:
    key: tuple[str, str, str]  # (base model name, device, dtype)
    model: Any
    tokenizer: Any


def load_for_generation(name: str, device: str, dtype: Any) -> tuple[Any, Any]:
    """(model, tokenizer) of the base model ``name`` on ``device`` in ``dtype``, in eval mode."""
    from mola.models import load_base_model

    model, tokenizer = load_base_model(name)
    model.to(device=device, dtype=dtype).eval()
    return model, tokenizer


class BaseModelCache:
    """At most one idle base model, lent to one generation at a time."""

    def __init__(self, loader: Callable[[str, str, Any], tuple[Any, Any]] = load_for_generation) -> None:
        self._loader = loader
        self._lock = threading.Lock()
        self._idle: _Kept | None = None
        self._timer: threading.Timer | None = None

    @contextmanager
    def lend(self, name: str, device: str, dtype: Any, keep_seconds: float) -> Iterator[tuple[Any, Any]]:
        """(model, tokenizer) for the ``with`` block: the idle one if it is this model on this
        device in this dtype, else freshly loaded. Afterwards it is kept ``keep_seconds``
        (0: not kept). A generation running meanwhile in another thread gets its own."""
        from mola.generate import carries_adapter

        key = (name, str(device), str(dtype))
        with self._lock:
            kept, self._idle = self._idle, None
            self._cancel_timer()
        if kept is not None and kept.key != key:
            logger.info("letting base model %s go for %s", kept.key[0], name)
            _let_go(kept)
            kept = None
        if kept is None:
            kept = _Kept(key, *self._loader(name, str(device), dtype))
        else:
            logger.info("base model %s kept from the last generation", name)
        try:
            yield kept.model, kept.tokenizer
        finally:
            if keep_seconds > 0 and not carries_adapter(kept.model):
                self._keep(kept, keep_seconds)
            else:
                _let_go(kept)

    def release(self) -> None:
        """Let the idle model go now (a training run is about to start)."""
        with self._lock:
            kept, self._idle = self._idle, None
            self._cancel_timer()
        if kept is not None:
            logger.info("letting base model %s go: a training run needs the memory", kept.key[0])
            _let_go(kept)

    @property
    def idle(self) -> str | None:
        """The name of the base model kept idle, if any."""
        kept = self._idle
        return kept.key[0] if kept is not None else None

    def _keep(self, kept: _Kept, seconds: float) -> None:
        with self._lock:
            older, self._idle = self._idle, kept
            self._cancel_timer()
            self._timer = threading.Timer(seconds, self._expire, args=(kept,))
            self._timer.daemon = True
            self._timer.start()
        if older is not None:  # another thread's generation kept one meanwhile: one is enough
            _let_go(older)

    def _expire(self, kept: _Kept) -> None:
        with self._lock:
            if self._idle is not kept:
                return
            self._idle, self._timer = None, None
        logger.info("letting base model %s go: idle for MOLA_GENERATION_KEEP_BASE_SECONDS", kept.key[0])
        _let_go(kept)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _let_go(kept: _Kept) -> None:
    """Drop the model and hand its GPU memory back to the device, not to torch's cache."""
    kept.model = kept.tokenizer = None
    gc.collect()
    torch = sys.modules.get("torch")  # no model was ever loaded without it
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# One per worker process: generations and training runs of a process share its device.
BASE_MODELS = BaseModelCache()
