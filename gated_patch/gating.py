"""Inserting and removing gates in a model of a known family: the primitive behind `patch_model` and the plugin's
checkpoint loader."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from .checkpoints.saving import GatedModelMixin
from .compat import check_attention_structure, refresh_output_recording
from .core.attention import GATE_MODULE_NAME, attach_gate, detach_gate, gated_subclass, is_gated_attention, original_class
from .core.checkpoint import GATE_CONFIG_KEY, GATE_MODULES_KEY
from .core.config import GateConfig
from .core.errors import NotPatchedError
from .core.versions import check_transformers_version


def gated_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every gated attention module of `model`."""
    return [(name, module) for name, module in model.named_modules() if is_gated_attention(module)]


def _gate_device(projection: nn.Module) -> torch.device:
    """Where the gate of this output projection lives: with its weight or, when accelerate has offloaded the weight (a
    meta tensor plus a hook that loads it at call time), on the hook's execution device (the gate stays resident)."""
    hook = getattr(projection, "_hf_hook", None)
    execution_device = getattr(hook, "execution_device", None)
    if projection.weight.device.type == "meta" and execution_device is not None:
        return torch.device(execution_device)
    return projection.weight.device


def gate_model(model: PreTrainedModel, gate: GateConfig, family) -> PreTrainedModel:
    """Gate the attention modules of `model` (of `family`, a `gated_patch.families.ModelFamily`), in place; every
    check runs before anything changes."""
    check_transformers_version()
    try:
        layers = model.get_submodule(family.decoder_layers)
    except AttributeError:
        raise NotPatchedError(f"{type(model).__name__} has no `{family.decoder_layers}` (the decoder layers of model_type "
                              f"{family.model_type!r}). Pass a causal LM of this family, e.g. "
                              "AutoModelForCausalLM.from_pretrained(...).") from None
    attentions = []
    for index in gate.layer_indices(len(layers)):
        attention = getattr(layers[index], family.attention, None)
        if attention is None:
            raise NotPatchedError(f"Decoder layer {index} has no `{family.attention}` module; check the registration.")
        check_attention_structure(attention, family, f"{family.decoder_layers}[{index}].{family.attention}")
        attentions.append(attention)
    text_config = model.config.get_text_config()
    for attention in attentions:
        projection = getattr(attention, family.output_projection)
        attach_gate(attention, gate, hidden_size=text_config.hidden_size,
                    init_std=getattr(text_config, "initializer_range", None) or 0.02,
                    output_projection=family.output_projection, device=_gate_device(projection))
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.__class__ = gated_subclass(type(module), GatedModelMixin)
            refresh_output_recording(module)
    setattr(model.config, GATE_CONFIG_KEY, gate.to_dict())
    setattr(model.config, GATE_MODULES_KEY, family.gate_modules)
    return model


def ungate_model(model: PreTrainedModel) -> PreTrainedModel:
    """Remove every gate and restore the original classes: exactly the ungated model again."""
    for _, attention in gated_attention_modules(model):
        detach_gate(attention)
    for module in model.modules():
        if isinstance(module, GatedModelMixin):
            module.__class__ = original_class(type(module))
            refresh_output_recording(module)
    for key in (GATE_CONFIG_KEY, GATE_MODULES_KEY):
        model.config.__dict__.pop(key, None)
    return model


def gate_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_parameters()``) of every gate parameter."""
    marker = f".{GATE_MODULE_NAME}."
    return [name for name, _ in model.named_parameters() if marker in f".{name}"]
