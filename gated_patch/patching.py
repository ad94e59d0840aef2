"""`patch_model` / `unpatch_model`: insert or remove attention output gates in a loaded model, in place."""

from __future__ import annotations

from typing import Iterator, Union

from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from .core.config import GateConfig
from .core.errors import AlreadyPatchedError, NotPatchedError
from .families import family_for
from .gating import gate_model, gate_parameter_names, gated_attention_modules, ungate_model

GateConfigLike = Union[GateConfig, dict, None]


def _as_gate_config(config: GateConfigLike) -> GateConfig:
    if config is None:
        return GateConfig()
    return config if isinstance(config, GateConfig) else GateConfig.from_dict(config)


def base_model_of(model: nn.Module) -> nn.Module:
    """The model a PEFT model wraps (adapters stay active in it), or `model` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_patched(model: nn.Module) -> bool:
    """Whether `model` carries attention output gates."""
    return bool(gated_attention_modules(model))


def gate_config(model: nn.Module) -> GateConfig:
    """The `GateConfig` a patched model was patched with."""
    for _, module in gated_attention_modules(model):
        return module.gate_config
    raise NotPatchedError(f"{type(model).__name__} is not patched; call gated_patch.patch_model(model) first.")


def gate_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every gate parameter of `model`, names as in ``model.named_parameters()``."""
    names = set(gate_parameter_names(model))
    return ((name, parameter) for name, parameter in model.named_parameters() if name in names)


def patch_model(model: PreTrainedModel, config: GateConfigLike = None) -> PreTrainedModel:
    """Insert an attention output gate into every (or every selected) attention layer of `model`, in place.

    Patching again with an equal config is a no-op; a different config raises `AlreadyPatchedError` (call
    `unpatch_model` first). Returns `model`.
    """
    config = _as_gate_config(config)
    if is_patched(model):
        existing = gate_config(model)
        if existing == config:
            return model
        raise AlreadyPatchedError(
            f"{type(model).__name__} is already patched with {existing}; refusing to re-patch with {config}. "
            "Call gated_patch.unpatch_model(model) first to change the gate config.")
    if not isinstance(getattr(model, "config", None), PretrainedConfig):
        raise TypeError(f"patch_model expects a transformers PreTrainedModel, got {type(model).__name__}.")
    return gate_model(model, config, family_for(model))


def unpatch_model(model: PreTrainedModel) -> PreTrainedModel:
    """Remove every gate and restore the original classes: the model is exactly the unpatched model again."""
    if not is_patched(model):
        raise NotPatchedError(f"{type(model).__name__} is not patched; nothing to unpatch.")
    return ungate_model(model)


def gated_model_from_config(config: PretrainedConfig, gate: GateConfigLike = None, *, model_class=AutoModelForCausalLM,
                            **kwargs) -> PreTrainedModel:
    """A freshly initialised gated model for training from scratch; `gate` defaults to ``GateConfig(init="paper")``.

    Extra keyword arguments go to ``model_class.from_config`` (e.g. ``dtype``, ``attn_implementation``).
    """
    gate = GateConfig(init="paper") if gate is None else _as_gate_config(gate)
    return patch_model(model_class.from_config(config, **kwargs), gate)
