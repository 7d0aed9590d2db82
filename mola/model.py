"""Inject MoLA into a Hugging Face causal LM, and save / load the adapter.

`get_mola_model` freezes the base model, swaps each targeted linear module for a `MolaLinear`
and wraps the model in a `MolaModel`, whose forward adds the load-balancing loss. The adapter is
saved as `adapter_config.json` (self-describing: experts and top-k per layer, targets, rank, ...)
plus `adapter_model.safetensors` holding only the adapter's tensors.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from mola.architectures import find_target_modules, num_decoder_layers, set_submodule
from mola.config import MolaConfig
from mola.layer import MolaLinear, RoutingRecorder
from mola.router import load_balancing_loss

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1
# The weights file carries its own copy of the description: it is replaced in one rename, so
# weights and description can never disagree, even when a save dies between the two files.
EMBEDDED_CONFIG_KEY = "mola_adapter_config"
# What the weights' own copy decides. Other fields (base_model_name_or_path, metadata) may be
# edited by hand in adapter_config.json, e.g. to point at a local copy of the base model.
WEIGHT_DEFINING_FIELDS = ("experts_per_layer", "top_k_per_layer", "rank", "alpha", "target_modules", "modules")


# transformers 5.24 renamed the key-value cache output from `past_key_values` to `cache`; the
# output below carries it under whichever name the installed release uses.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class MolaCausalLMOutput(CausalLMOutputWithPast):
    """A causal-LM output (loss, logits, cache, hidden states, attentions, as the base model's)
    with the language-model and load-balancing losses also reported separately.

    ``loss`` = ``lm_loss`` + ``aux_loss_coef`` * ``aux_loss`` when labels were given.
    """

    lm_loss: Tensor | None = None
    aux_loss: Tensor | None = None


def _readable_like_a_new_file(path: Path) -> None:
    """safetensors creates its files owner-only (0600); give the weights the permissions any
    new file gets (0666 less the umask, usually 0644), like the config written beside them."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    # Linux reports it without changing it; os.umask can only read it by setting it, which for
    # a moment changes it for every thread of the process.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


class MolaModel(nn.Module):
    """A causal LM whose targeted linear layers are `MolaLinear` modules.

    Attribute access falls through to the wrapped model, so ``model.config``,
    ``model.generate(...)`` and ``model.gradient_checkpointing_enable()`` work as usual.
    """

    def __init__(
        self,
        base_model: nn.Module,
        config: MolaConfig,
        experts: list[int],
        top_k: list[int],
        recorder: RoutingRecorder,
        trainable_before: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__()
        self.base_model = base_model
        self.mola_config = config
        self.experts_per_layer = experts
        self.top_k_per_layer = top_k
        self.recorder = recorder
        # Names of the base model's parameters that trained before injection froze them:
        # `unload` gives them their flag back.
        self.trainable_before = trainable_before

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model, name)

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, labels: Tensor | None = None, **kwargs: Any) -> MolaCausalLMOutput | tuple:
        return_dict = kwargs.pop("return_dict", None)  # the base model's output must be dict-like
        token_mask = None
        embeds = kwargs.get("inputs_embeds")
        tokens = input_ids.shape if input_ids is not None else embeds.shape[:-1] if embeds is not None else None  # (B, T)
        if attention_mask is not None and tokens is not None and attention_mask.shape == tokens:
            token_mask = attention_mask.reshape(-1)  # (B*T,): padding left out of the balance loss
        self.recorder.start(token_mask)
        try:
            out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, return_dict=True, **kwargs)
        finally:
            stats = self.recorder.stop()
        aux = self.aux_loss_from(stats)
        lm_loss = out.get("loss")
        loss = None
        if lm_loss is not None:
            loss = lm_loss + self.mola_config.aux_loss_coef * aux if aux is not None else lm_loss
        output = MolaCausalLMOutput(
            loss=loss,
            lm_loss=lm_loss,
            aux_loss=aux,
            logits=out.get("logits"),
            **{CACHE_FIELD: out.get(CACHE_FIELD)},
            hidden_states=out.get("hidden_states"),
            attentions=out.get("attentions"),
        )
        return output.to_tuple() if return_dict is False else output

    def aux_loss_from(self, records: list) -> Tensor | None:
        """Sum over decoder layers of each layer's load-balancing loss (unweighted), pooling
        the routing decisions of all MoLA modules of a layer."""
        if not records:
            return None
        by_layer: dict[int, list] = {}
        for module, stats in records:
            by_layer.setdefault(module.layer_index, []).append(stats)
        losses = [load_balancing_loss(by_layer[j], self.top_k_per_layer[j]) for j in sorted(by_layer)]
        return torch.stack(losses).sum()

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.generate(*args, **kwargs)

    # ---- introspection ---------------------------------------------------------------------
    def mola_modules(self) -> list[tuple[str, MolaLinear]]:
        """(name inside the base model, module) of every MoLA layer, in model order."""
        return [(n, m) for n, m in self.base_model.named_modules() if isinstance(m, MolaLinear)]

    def adapter_state_dict(self) -> dict[str, Tensor]:
        state = {}
        for name, module in self.mola_modules():
            state[f"{name}.router.weight"] = module.router.weight
            state[f"{name}.lora_A"] = module.lora_A
            state[f"{name}.lora_B"] = module.lora_B
        return state

    def trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def describe(self) -> dict[str, Any]:
        """The self-describing adapter configuration written next to the weights."""
        from mola import __version__

        cfg = self.mola_config
        modules = {
            name: {
                "layer": m.layer_index,
                "in_features": m.in_features,
                "out_features": m.out_features,
                "num_experts": m.num_experts,
                "top_k": m.top_k,
            }
            for name, m in self.mola_modules()
        }
        targets = sorted({m.rsplit(".", 1)[-1] for m in modules}) if cfg.target_modules is None else cfg.target_modules
        return {
            "adapter_type": "mola",
            "format_version": FORMAT_VERSION,
            "mola_version": __version__,
            "base_model_name_or_path": cfg.base_model_name_or_path,
            "model_type": getattr(self.base_model.config, "model_type", None),
            "num_layers": len(self.experts_per_layer),
            "experts_per_layer": list(self.experts_per_layer),
            "top_k_per_layer": list(self.top_k_per_layer),
            "total_experts": sum(self.experts_per_layer),
            "target_modules": list(targets),
            "rank": cfg.rank,
            "alpha": cfg.alpha,
            "scaling": cfg.scaling,
            "dropout": cfg.dropout,
            "aux_loss_coef": cfg.aux_loss_coef,
            "trainable_parameters": sum(t.numel() for t in self.adapter_state_dict().values()),
            "modules": modules,
        }

    def unload(self) -> nn.Module:
        """Take the adapter off: every `MolaLinear` is replaced by the base module it wraps and
        the parameters frozen by injection train again, so the base model is as it was and can
        carry another adapter (`get_mola_model`, `load_mola_model`). Returns the base model;
        this wrapper is of no further use."""
        for name, module in self.mola_modules():
            set_submodule(self.base_model, name, module.base_layer)
        for name, parameter in self.base_model.named_parameters():
            if name in self.trainable_before:
                parameter.requires_grad_(True)
        return self.base_model

    # ---- persistence -----------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
        """Write `adapter_config.json` and `adapter_model.safetensors` into ``directory``.

        The files are written under temporary names and renamed, so a crash never leaves a
        half-written file. The weights file also holds the description (safetensors metadata),
        and `read_adapter_config` prefers that copy, so a crash between the two renames cannot
        pair new weights with an old description.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        description = self.describe()
        if metadata:
            description["metadata"] = metadata
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.adapter_state_dict().items()}
        tmp_weights = directory / (WEIGHTS_NAME + ".tmp")
        save_file(
            tensors,
            str(tmp_weights),
            metadata={"format": "pt", "adapter_type": "mola", EMBEDDED_CONFIG_KEY: json.dumps(description)},
        )
        _readable_like_a_new_file(tmp_weights)
        tmp_config = directory / (CONFIG_NAME + ".tmp")
        tmp_config.write_text(json.dumps(description, indent=2) + "\n")
        os.replace(tmp_weights, directory / WEIGHTS_NAME)
        os.replace(tmp_config, directory / CONFIG_NAME)
        return directory

    def load_adapter_weights(self, directory: str | os.PathLike) -> None:
        tensors = load_file(str(Path(directory) / WEIGHTS_NAME))
        own = self.adapter_state_dict()
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"adapter weights in {directory} do not fit this model: "
                f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
            )
        # Every shape is checked before anything is copied: a refusal leaves the model as it was.
        for name, param in own.items():
            if tensors[name].shape != param.shape:
                raise ValueError(f"{name}: saved shape {tuple(tensors[name].shape)} != model {tuple(param.shape)}")
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(tensors[name].to(param.dtype))


def get_mola_model(model: nn.Module, config: MolaConfig) -> MolaModel:
    """Freeze ``model`` and replace its targeted linear layers with `MolaLinear` modules."""
    if isinstance(model, MolaModel) or any(isinstance(m, MolaLinear) for m in model.modules()):
        raise ValueError("the model already carries MoLA layers")
    if not isinstance(config, MolaConfig):
        raise TypeError(f"config must be a MolaConfig, got {type(config).__name__}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    num_layers = num_decoder_layers(model)
    experts, top_k = config.resolve(num_layers)
    targets = find_target_modules(model, config.targets_for(model_type))
    if config.base_model_name_or_path is None:
        # A copy: one config may serve several models, each recording its own base.
        config = dataclasses.replace(config, base_model_name_or_path=getattr(model.config, "_name_or_path", None) or None)
    trainable_before = frozenset(name for name, p in model.named_parameters() if p.requires_grad)
    model.requires_grad_(False)
    recorder = RoutingRecorder()
    for target in targets:
        j = target.layer_index
        layer = MolaLinear(target.module, experts[j], top_k[j], config.rank, config.alpha, config.dropout, j, recorder)
        # A new module trains by default: in a model loaded in eval mode its dropout would
        # then be on, and its forward would record routing, while the rest of the model is eval.
        layer.train(target.module.training)
        set_submodule(model, target.name, layer)
    logger.info("MoLA: %d modules in %d layers, experts per layer %s", len(targets), num_layers, experts)
    mola_model = MolaModel(model, config, experts, top_k, recorder, trainable_before)
    mola_model.training = model.training  # the wrapper's own flag only: the model's modes stay
    return mola_model


def _embedded_description(weights: Path) -> dict[str, Any] | None:
    """The description saved inside the weights file (reads only its header), if any."""
    if not weights.is_file():
        return None
    with safe_open(str(weights), framework="pt") as f:
        text = (f.metadata() or {}).get(EMBEDDED_CONFIG_KEY)
    return json.loads(text) if text else None


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    description = json.loads(path.read_text()) if path.is_file() else None
    embedded = _embedded_description(Path(directory) / WEIGHTS_NAME)
    if embedded is not None and (
        description is None or any(description.get(k) != embedded.get(k) for k in WEIGHT_DEFINING_FIELDS)
    ):
        if description is not None:
            logger.warning(
                "%s does not describe the weights beside it (a save interrupted between the two "
                "files?); using the description stored in %s", path, WEIGHTS_NAME
            )
        description = embedded
    if description is None:
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
    if description.get("adapter_type") != "mola":
        raise ValueError(f"{path} does not describe a MoLA adapter")
    if description.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} has format version {description['format_version']}; this mola reads up to {FORMAT_VERSION}")
    return description


def config_from_description(description: dict[str, Any]) -> MolaConfig:
    return MolaConfig(
        experts=list(description["experts_per_layer"]),
        top_k=list(description["top_k_per_layer"]),
        rank=description["rank"],
        alpha=description["alpha"],
        dropout=description["dropout"],
        target_modules=list(description["target_modules"]),
        aux_loss_coef=description["aux_loss_coef"],
        base_model_name_or_path=description.get("base_model_name_or_path"),
    )


def load_mola_model(model: nn.Module, directory: str | os.PathLike, is_trainable: bool = False) -> MolaModel:
    """Rebuild a saved adapter on ``model`` (the same base model) and load its weights.

    Returns the model in eval mode unless ``is_trainable``; then the adapter's parameters train.
    """
    description = read_adapter_config(directory)
    config = config_from_description(description)
    wanted = description.get("base_model_name_or_path")
    actual = getattr(getattr(model, "config", None), "_name_or_path", None)
    if wanted and actual and wanted != actual:
        logger.warning("adapter was trained on %s, loading onto %s", wanted, actual)
    mola_model = get_mola_model(model, config)
    try:
        mola_model.load_adapter_weights(directory)
    except Exception:
        mola_model.unload()  # weights that do not fit leave ``model`` as it came
        raise
    if not is_trainable:
        mola_model.requires_grad_(False)
        mola_model.eval()
    return mola_model
