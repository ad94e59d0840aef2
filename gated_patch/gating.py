"""Inserting and removing gates in a loaded model of a known family (`ModelFamily`): the primitive behind `patch_model`.
Every check runs before anything changes; the gates themselves are added by the core's `add_gates`, as on load."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn
from transformers import PreTrainedModel

from .checkpoints.format import auto_built_classes, gate_tensor_shapes, remove_gated_entries
from .checkpoints.saving import GatedModelMixin, adopt_gated_classes
from .core.config import GateConfig
from .core.errors import GatedCheckpointError, NotPatchedError, UnsupportedModelError
from .core.gate import is_gate_name
from .core.hooks import detach_gate, is_gated_attention
from .core.model import (GATE_CONFIG_KEY, GATE_MODULES_KEY, add_gates, decoder_layers_path, gated_attention_paths,
                         original_class)
from .core.parallel import remove_gate_tp_plan
from .core.versions import check_transformers_version
from .guards import check_attention_structure, refresh_output_recording, value_head_size


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
        attention_layers: in a hybrid, the indices of the decoder layers with softmax attention (None: every layer).
    """

    model_type: str
    attention_class: Union[str, type]
    decoder_layers: str = "model.layers"
    attention: str = "self_attn"
    output_projection: str = "o_proj"
    attention_layers: Optional[tuple[int, ...]] = None  # a hybrid's layers with softmax attention (None: every layer)

    @property
    def gate_modules(self) -> dict:
        """The ``attn_output_gate_modules`` entry of this family's gated configs."""
        modules = {"decoder_layers": self.decoder_layers, "attention": self.attention,
                   "output_projection": self.output_projection}
        return modules if self.attention_layers is None else {**modules, "attention_layers": list(self.attention_layers)}

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


def _gate_placement(model: PreTrainedModel):
    """Where each gate lives: ``placement(output projection) -> (device, dtype)`` for `add_gates`.

    The device is the projection's, or, when accelerate has offloaded its weight (a meta tensor plus a hook that loads
    it at call time), the hook's execution device (the gate stays resident). The dtype is the projection's, or for a
    quantized projection (integer storage, e.g. bitsandbytes 4-bit or 8-bit) the model's float dtype, which its
    activations have: the gate is a plain trainable float layer.
    """

    def placement(projection: nn.Module) -> tuple[torch.device, torch.dtype]:
        execution_device = getattr(getattr(projection, "_hf_hook", None), "execution_device", None)
        device = projection.weight.device
        if device.type == "meta" and execution_device is not None:
            device = torch.device(execution_device)
        dtype = projection.weight.dtype
        return device, dtype if dtype.is_floating_point else model.dtype

    return placement


def check_gated_class(model: PreTrainedModel, model_type: str) -> None:
    """Refuse a model whose gated checkpoints no Auto class could load back (before anything changes)."""
    built = auto_built_classes(original_class(type(model.config)))
    upstream = original_class(type(model))
    if upstream not in built.values():
        raise UnsupportedModelError(
            f"Cannot gate {upstream.__name__} (model_type {model_type!r}): no Auto class of transformers builds it for its "
            f"config class, so its gated checkpoints could not be loaded back. Gate one of the family's classes: "
            f"{sorted({cls.__name__ for cls in built.values()}) or 'none'}.")


def gate_model(model: PreTrainedModel, gate: GateConfig, family: ModelFamily) -> PreTrainedModel:
    """Gate the attention modules of `model` (of `family`, any of its heads) in place; every check runs before
    anything changes."""
    check_transformers_version()
    check_gated_class(model, family.model_type)
    path = decoder_layers_path(model, family.decoder_layers)
    try:
        layers = model.get_submodule(path)
    except AttributeError:
        raise NotPatchedError(f"{type(model).__name__} has no `{path}` (the decoder layers of model_type "
                              f"{family.model_type!r}). Pass a model of this family, e.g. "
                              "AutoModelForCausalLM.from_pretrained(...).") from None
    if not isinstance(layers, nn.ModuleList):
        raise NotPatchedError(f"`{path}` of {type(model).__name__} is a {type(layers).__name__}, not the list of decoder "
                              f"layers (nn.ModuleList); fix the registration of {family.model_type!r}.")
    modules = {**family.gate_modules, "decoder_layers": path}
    try:  # the gate shapes a checkpoint is checked against come from the config: it must give one attention size
        gate_tensor_shapes(gate, modules, model.config)
    except GatedCheckpointError as exc:
        raise UnsupportedModelError(f"Cannot gate {type(model).__name__} (model_type {family.model_type!r}): its config "
                                    f"does not give one attention size for every layer ({exc})") from None
    for index in gate.layer_indices(len(layers), family.attention_layers):
        if getattr(layers[index], family.attention, None) is None:
            raise NotPatchedError(f"Decoder layer {index} has no `{family.attention}` module; check the registration.")
    text_config = model.config.get_text_config()
    num_heads, head_size = text_config.num_attention_heads, value_head_size(text_config)
    for where in gated_attention_paths(model, gate, modules):
        attention = model.get_submodule(where)
        projection = getattr(attention, family.output_projection, None)
        if any(hasattr(p, "placements") for p in attention.parameters()) or (  # DTensor, or a rank's part of o_proj
                isinstance(projection, nn.Linear) and projection.weight.is_floating_point()
                and projection.weight.shape[-1] != projection.in_features):
            raise UnsupportedModelError(
                f"Cannot gate {where}: its weights are already split across ranks (DTensor: tensor parallelism or FSDP). "
                "Patch the model before sharding it, or patch and save it in one process and load the gated checkpoint "
                "with tp_plan='auto' (transformers then shards the gates with the heads).")
        check_attention_structure(attention, where, family.output_projection, num_heads, head_size,
                                  family.resolve_attention_class(), family.model_type)
    add_gates(model, gate, modules, placement=_gate_placement(model))
    adopt_gated_classes(model)
    setattr(model.config, GATE_CONFIG_KEY, gate.to_dict())
    setattr(model.config, GATE_MODULES_KEY, modules)
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
    """Names (as in ``model.named_parameters()``) of every gate parameter (PEFT's copies and adapters of one too)."""
    return [name for name, _ in model.named_parameters() if is_gate_name(name)]
