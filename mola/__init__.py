"""mola: mixtures of LoRA experts with a layer-wise allocation (MoLA, arXiv 2402.08562).

Exports are imported lazily so that torch-free parts (allocation specs, `MolaConfig`, the HTTP
client) load fast and without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "MolaConfig": "mola.config",
    "DEFAULT_TARGETS": "mola.config",
    "expand_allocation": "mola.allocation",
    "expand_top_k": "mola.allocation",
    "MolaLinear": "mola.layer",
    "MolaModel": "mola.model",
    "get_mola_model": "mola.model",
    "load_mola_model": "mola.model",
    "read_adapter_config": "mola.model",
    "tiny_model": "mola.tiny",
    "byte_tokenizer": "mola.tiny",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mola' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
