"""Inserting and removing gates in a model of a known family (`ModelFamily`): the primitive behind `patch_model` and
the plugin's checkpoint loader."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn
from transformers import PreTrainedModel

from .checkpoints.format import gate_tensor_shapes, remove_gated_entries
from .checkpoints.saving import GatedModelMixin
from .compat import check_attention_structure, refresh_output_recording
from .core.attention import GATE_MODULE_NAME, attach_gate, detach_gate, gated_subclass, is_gated_attention, original_class
from .core.checkpoint import GATE_CONFIG_KEY, GATE_MODULES_KEY
from .core.config import GateConfig
from .core.errors import GatedCheckpointError, NotPatchedError, UnsupportedModelError
from .core.gate import gate_shape
from .core.parallel import add_gate_tp_plan, remove_gate_tp_plan
from .core.versions import check_transformers_version


@dataclass(frozen=True)
class ModelFamily:
    """Where the attention modules of one model family live and what they are called.

    Args:
        model_type: ``config.model_type`` of the family, e.g. ``"llama"``.
        attention_class: the upstream attention class, or its import path ``"package.module:ClassName"`` (resolved
            lazily, so registering a family does not import its modeling code).
        decoder_layers: dotted path from the causal LM to its list of decoder layers.
        attention: attribute name of the attention module in a decoder layer.
        output_projection: attribute name of the output projection in the attention module.
    """

    model_type: str
    attention_class: Union[str, type]
    decoder_layers: str = "model.layers"
    attention: str = "self_attn"
    output_projection: str = "o_proj"

    @property
    def gate_modules(self) -> dict[str, str]:
        """The ``attn_output_gate_modules`` entry of this family's gated configs."""
        return {"decoder_layers": self.decoder_layers, "attention": self.attention,
                "output_projection": self.output_projection}

    def resolve_attention_class(self) -> type:
        if isinstance(self.attention_class, type):
            return self.attention_class
        module_name, _, class_name = self.attention_class.partition(":")
        try:
            return getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as exc:
            raise UnsupportedModelError(
                f"Model family {self.model_type!r}: cannot import attention class {self.attention_class!r} ({exc}). "
                "Your transformers may not ship this model; upgrade transformers or fix the registration.") from exc


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


def _gate_dtype(model: PreTrainedModel, projection: nn.Module) -> torch.dtype:
    """The gate's dtype: the output projection's, or for a quantized projection (integer storage, e.g. bitsandbytes
    4-bit or 8-bit) the model's float dtype, which its activations (the gate's input and output) have: the gate is a
    plain trainable float layer."""
    return projection.weight.dtype if projection.weight.dtype.is_floating_point else model.dtype


def gate_model(model: PreTrainedModel, gate: GateConfig, family: ModelFamily) -> PreTrainedModel:
    """Gate the attention modules of `model` (of `family`) in place; every check runs before anything changes."""
    check_transformers_version()
    try:
        layers = model.get_submodule(family.decoder_layers)
    except AttributeError:
        raise NotPatchedError(f"{type(model).__name__} has no `{family.decoder_layers}` (the decoder layers of model_type "
                              f"{family.model_type!r}). Pass a causal LM of this family, e.g. "
                              "AutoModelForCausalLM.from_pretrained(...).") from None
    if not isinstance(layers, nn.ModuleList):
        raise NotPatchedError(f"`{family.decoder_layers}` of {type(model).__name__} is a {type(layers).__name__}, not the "
                              f"list of decoder layers (nn.ModuleList); fix the registration of {family.model_type!r}.")
    text_config = model.config.get_text_config()
    try:  # what the config says the gates are: a checkpoint is checked against it before loading
        expected = gate_tensor_shapes(gate, family.gate_modules, model.config)
    except GatedCheckpointError as exc:
        raise UnsupportedModelError(f"Cannot gate {type(model).__name__} (model_type {family.model_type!r}): its config "
                                    f"does not give one attention size for every layer ({exc})") from None
    attentions = []
    for index in gate.layer_indices(len(layers)):
        attention = getattr(layers[index], family.attention, None)
        if attention is None:
            raise NotPatchedError(f"Decoder layer {index} has no `{family.attention}` module; check the registration.")
        where = f"{family.decoder_layers}[{index}].{family.attention}"
        projection = getattr(attention, family.output_projection, None)
        if any(hasattr(p, "placements") for p in attention.parameters()) or (  # DTensor, or a rank's part of o_proj
                isinstance(projection, nn.Linear) and projection.weight.is_floating_point()
                and projection.weight.shape[-1] != projection.in_features):
            raise UnsupportedModelError(
                f"Cannot gate {where}: its weights are already split across ranks (DTensor: tensor parallelism or FSDP). "
                "Patch the model before sharding it, or patch and save it in one process and load the gated checkpoint "
                "with tp_plan='auto' (transformers then shards the gates with the heads).")
        check_attention_structure(attention, family, where, getattr(text_config, "num_attention_heads", None))
        num_heads = projection.in_features // attention.head_dim
        shape = gate_shape(gate, text_config.hidden_size, num_heads, attention.head_dim)
        if shape != expected[f"{family.decoder_layers}.{index}.{family.attention}.{GATE_MODULE_NAME}.weight"]:
            raise UnsupportedModelError(f"Cannot gate {where} of {type(model).__name__}: its attention gives gate shape "
                                        f"{shape}, the config {expected[next(iter(expected))]} (per-layer head sizes?)")
        attentions.append(attention)
    for attention in attentions:
        projection = getattr(attention, family.output_projection)
        attach_gate(attention, gate, hidden_size=text_config.hidden_size,
                    init_std=getattr(text_config, "initializer_range", None) or 0.02,
                    output_projection=family.output_projection, device=_gate_device(projection),
                    dtype=_gate_dtype(model, projection))
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.__class__ = gated_subclass(type(module), GatedModelMixin)
            refresh_output_recording(module)
    add_gate_tp_plan(model, gate, family.gate_modules)
    setattr(model.config, GATE_CONFIG_KEY, gate.to_dict())
    setattr(model.config, GATE_MODULES_KEY, family.gate_modules)
    return model


def ungate_model(model: PreTrainedModel) -> PreTrainedModel:
    """Remove every gate and restore the original classes: exactly the ungated model again."""
    for _, attention in gated_attention_modules(model):
        detach_gate(attention)
    remove_gate_tp_plan(model)
    for module in model.modules():
        if isinstance(module, GatedModelMixin):
            module.__class__ = original_class(type(module))
            refresh_output_recording(module)
    remove_gated_entries(model.config.__dict__, type(model).__name__)  # also what loading a gated checkpoint set
    return model


def gate_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_parameters()``) of every gate parameter."""
    marker = f".{GATE_MODULE_NAME}."
    return [name for name, _ in model.named_parameters() if marker in f".{name}"]
