"""`patch_model` / `unpatch_model`: insert or remove attention output gates in a loaded model, in place."""

from __future__ import annotations

import operator
from typing import Iterator, Union

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from .compat import check_attention_structure, check_transformers_version, refresh_output_recording
from .core.attention import (
    GATE_MODULE_NAME,
    GatedAttentionMixin,
    GatedPreTrainedMixin,
    attach_gate,
    detach_gate,
    gated_pretrained_class,
    original_class,
)
from .core.config import GateConfig
from .core.errors import AlreadyPatchedError, NotPatchedError
from .fused import is_fused, unfuse_gates
from .registry import ModelFamily, get_model_family

#: Attribute of `model.config` that records the gate config of a patched model (round-trips through config.json).
CONFIG_ATTRIBUTE = "attn_output_gate"

GateConfigLike = Union[GateConfig, dict, None]


def _as_gate_config(config: GateConfigLike) -> GateConfig:
    if config is None:
        return GateConfig()
    if isinstance(config, GateConfig):
        return config
    return GateConfig.from_dict(config)


def _decoder_layers(model: nn.Module, family: ModelFamily) -> nn.ModuleList:
    try:
        layers = operator.attrgetter(family.decoder_layers)(model)
    except AttributeError as exc:
        raise NotPatchedError(
            f"{type(model).__name__} has no `{family.decoder_layers}` (registered decoder_layers path for "
            f"model_type {family.model_type!r}). Pass a causal-LM or base model of this family, e.g. "
            "AutoModelForCausalLM.from_pretrained(...)."
        ) from exc
    return layers


def _model_family(model: nn.Module) -> ModelFamily:
    config = getattr(model, "config", None)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"patch_model expects a transformers PreTrainedModel, got {type(model).__name__}.")
    return get_model_family(config.model_type)


def _gated_attention_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, GatedAttentionMixin):
            yield name, module


def _gate_device(projection: nn.Module) -> torch.device:
    """Where the gate of this output projection lives: with its weight, or, when accelerate has offloaded the weight
    (meta tensor plus a hook that loads it at call time), on the hook's execution device. The gate is small and
    stays resident there; a model built entirely on the meta device keeps meta gates."""
    device = projection.weight.device
    hook = getattr(projection, "_hf_hook", None)
    execution_device = getattr(hook, "execution_device", None)
    if device.type == "meta" and execution_device is not None:
        return torch.device(execution_device)
    return device


def _rebind_accelerate_forward(attention: nn.Module) -> None:
    """accelerate's hooks store the bound forward of the class at dispatch time in ``_old_forward``; after a class
    swap it must point at the new class's forward, or the hook would silently bypass (or keep) the gate."""
    if "_old_forward" in attention.__dict__:
        attention._old_forward = type(attention).forward.__get__(attention)


def is_patched(model: nn.Module) -> bool:
    """Whether `model` carries attention output gates inserted by `patch_model`."""
    return any(True for _ in _gated_attention_modules(model))


def gate_config(model: nn.Module) -> GateConfig:
    """The `GateConfig` a patched model was patched with."""
    for _, module in _gated_attention_modules(model):
        return module.gate_config
    raise NotPatchedError(f"{type(model).__name__} is not patched; call gated_patch.patch_model(model) first.")


def gate_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every gate parameter of `model`, names as in ``model.named_parameters()``."""
    marker = f".{GATE_MODULE_NAME}."
    for name, parameter in model.named_parameters():
        if marker in f".{name}":
            yield name, parameter


def patch_model(model: PreTrainedModel, config: GateConfigLike = None) -> PreTrainedModel:
    """Insert an attention output gate into every (or every selected) attention layer of `model`, in place.

    Patching the same model again with an equal config is a no-op; a different config raises
    `AlreadyPatchedError` (call `unpatch_model` first). Returns `model`.
    """
    config = _as_gate_config(config)
    if is_patched(model):
        existing = gate_config(model)
        if existing == config:
            return model
        raise AlreadyPatchedError(
            f"{type(model).__name__} is already patched with {existing}; refusing to re-patch with {config}. "
            "Call gated_patch.unpatch_model(model) first to change the gate config."
        )
    check_transformers_version()
    family = _model_family(model)
    layers = _decoder_layers(model, family)
    indices = config.layer_indices(len(layers))
    text_config = model.config.get_text_config()
    attentions = []
    for index in indices:
        attention = getattr(layers[index], family.attention, None)
        where = f"{family.decoder_layers}[{index}].{family.attention}"
        if attention is None:
            raise NotPatchedError(f"Decoder layer {index} has no `{family.attention}` module; check the registration.")
        check_attention_structure(attention, family, where)
        attentions.append(attention)

    init_std = getattr(text_config, "initializer_range", None) or 0.02
    for attention in attentions:
        attach_gate(
            attention,
            config,
            hidden_size=text_config.hidden_size,
            init_std=init_std,
            output_projection=family.output_projection,
            device=_gate_device(attention._modules[family.output_projection]),
        )
        _rebind_accelerate_forward(attention)

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.__class__ = gated_pretrained_class(type(module))
            refresh_output_recording(module)
    setattr(model.config, CONFIG_ATTRIBUTE, config.to_dict())
    return model


def unpatch_model(model: PreTrainedModel) -> PreTrainedModel:
    """Remove every gate and restore the original classes: the model is exactly the unpatched model again."""
    if not is_patched(model):
        raise NotPatchedError(f"{type(model).__name__} is not patched; nothing to unpatch.")
    if is_fused(model):  # give q_proj and the gates their own storage and classes back first (issue 6)
        unfuse_gates(model)
    for _, attention in list(_gated_attention_modules(model)):
        detach_gate(attention)
        _rebind_accelerate_forward(attention)
    for module in model.modules():
        if isinstance(module, GatedPreTrainedMixin):
            module.__class__ = original_class(type(module))
            refresh_output_recording(module)
    if hasattr(model.config, CONFIG_ATTRIBUTE):
        delattr(model.config, CONFIG_ATTRIBUTE)
    return model


def gated_model_from_config(
    config: PretrainedConfig,
    gate: GateConfigLike = None,
    *,
    model_class=AutoModelForCausalLM,
    **kwargs,
) -> PreTrainedModel:
    """Build a freshly initialised gated model from a transformers config, for training from scratch.

    `gate` defaults to ``GateConfig(init="paper")`` (the paper's random init; use ``init="identity"`` to start from
    an ungated function). Extra keyword arguments go to ``model_class.from_config`` (e.g. ``dtype``,
    ``attn_implementation``).
    """
    gate = GateConfig(init="paper") if gate is None else _as_gate_config(gate)
    model = model_class.from_config(config, **kwargs)
    return patch_model(model, gate)  # each gate is created with its config's init (AttentionGateLinear.__init__)
