"""The plugin's gated model classes: the core's loader with the structure guard, and ``save_pretrained`` writing the
gated checkpoint format (see `format`). A patched model and a model loaded with the plugin have the same classes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from ..core.errors import GatedCheckpointError
from ..core.model import (GATE_CONFIG_KEY, GATE_MODULES_KEY, GatedConfigMixin, GatedPreTrainedMixin, decoder_layers_path,
                          gate_config_of, gate_modules_of, gated_attention_paths, gated_config_class, gated_subclass,
                          original_class)
from ..guards import check_loaded_attention, refresh_output_recording
from .format import gate_tensor_shapes, gated_config_entries, set_config_class
from .names import CHECKPOINT_ATTENTION, checkpoint_attention
from .remote_code import write_remote_code
from .validate import check_local_checkpoint

#: Called as ``hook(model, configs)`` when PEFT attaches its adapter configs to a gated model (`gated_patch.adapters`
#: registers the one that makes every saved adapter carry its gate record, whoever called ``get_peft_model``).
PEFT_CONFIG_HOOKS: list = []


class GatedModelMixin(GatedPreTrainedMixin):
    """In front of every `PreTrainedModel` class of a patched model, and of the classes the plugin loads gated
    checkpoints with: the core's loader with the structure guard, and ``save_pretrained`` writing a gated checkpoint
    (``gated_<family>`` config, gate tensors, remote code)."""

    def __init__(self, config, *args: Any, **kwargs: Any) -> None:
        if isinstance(config, GatedConfigMixin):  # the model gets the upstream config class below; the caller's stays
            config = copy.copy(config)
        super().__init__(config, *args, **kwargs)
        if hasattr(config, GATE_CONFIG_KEY):  # built from a gated config: checked, and exactly what patch_model makes
            modules = gate_modules_of(config)
            for where in gated_attention_paths(self, gate_config_of(config), modules):
                check_loaded_attention(self.get_submodule(where), where, modules["output_projection"],
                                       config.get_text_config())
            set_config_class(config, original_class(type(config)))
            adopt_gated_classes(self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args: Any, **kwargs: Any):
        local = Path(str(pretrained_model_name_or_path)) / (kwargs.get("subfolder") or "")
        if local.is_dir() and not kwargs.get("gguf_file"):
            # before transformers reads a tensor, the files it will read: every error names the file at fault
            check_local_checkpoint(local, kwargs.get("variant"))
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:  # transformers reads the class's source file to decide (as upstream)
        return original_class(cls)._can_set_attn_implementation()

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:  # ... and to pick MoE expert kernels (as upstream)
        return original_class(cls)._can_set_experts_implementation()

    @property
    def peft_config(self):
        """PEFT's adapter configs; PEFT's tuners set this on the model they wrap (`PEFT_CONFIG_HOOKS` then run)."""
        try:
            return self.__dict__["peft_config"]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no PEFT adapter") from None

    @peft_config.setter
    def peft_config(self, configs) -> None:
        self.__dict__["peft_config"] = configs
        for hook in PEFT_CONFIG_HOOKS:
            hook(self, configs)

    @peft_config.deleter
    def peft_config(self) -> None:
        self.__dict__.pop("peft_config", None)

    def save_pretrained(self, save_directory, *args: Any, **kwargs: Any):
        return save_gated_checkpoint(self, super().save_pretrained, save_directory, *args, **kwargs)


def gated_model_class(upstream: type) -> type:
    """``Gated<Upstream>``: the class of a patched or plugin-loaded model whose upstream class is `upstream`."""
    return gated_subclass(upstream, GatedModelMixin, config_class=upstream.config_class)


def adopt_gated_classes(model: PreTrainedModel) -> None:
    """Give `model` and every `PreTrainedModel` inside it its ``Gated<Class>`` (same fields, gated weight init and
    saving), re-registering what transformers records outputs of."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and not isinstance(module, GatedModelMixin):
            module.__class__ = gated_model_class(type(module))
            refresh_output_recording(module)


def save_gated_checkpoint(model, plain_save, save_directory, *args: Any, **kwargs: Any):
    """transformers' ``save_pretrained`` (`plain_save`) of a patched model, in the gated checkpoint format."""
    if kwargs.get("push_to_hub"):
        raise GatedCheckpointError(
            "save_pretrained(push_to_hub=True) is not supported for gated models (the remote code would not be uploaded). "
            "Save to a directory, then upload it: `gated-patch-push DIR --repo-id REPO`.")
    config = model.config
    gate, modules = gate_config_of(config, f"{type(model).__name__}.config"), gate_modules_of(config)
    modules = {**{key: value for key, value in modules.items() if key != CHECKPOINT_ATTENTION},  # read off `model` below
               "decoder_layers": decoder_layers_path(model, modules["decoder_layers"])}  # as this class saves
    state_dict = kwargs.get("state_dict")
    if state_dict is not None:  # e.g. from a Trainer: it must still hold every gate tensor
        missing = sorted(set(gate_tensor_shapes(gate, modules, config)) - set(state_dict))
        if missing:
            raise GatedCheckpointError(
                f"save_pretrained(state_dict=...) lacks the gate tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}; "
                "the checkpoint could not be loaded. Pass a state dict of the whole patched model, e.g. model.state_dict().")
    layers = gate.layer_indices(len(model.get_submodule(modules["decoder_layers"])), modules.get("attention_layers"))
    saved_as = checkpoint_attention(model, modules["decoder_layers"], modules["attention"], layers)
    upstream_config = original_class(type(config))
    entries = gated_config_entries(upstream_config, original_class(type(model)), gate,
                                   {**modules, CHECKPOINT_ATTENTION: saved_as} if saved_as else modules,
                                   config.__dict__.get("auto_map"))
    previous = {key: config.__dict__[key] for key in ("auto_map", "architectures") if key in config.__dict__}
    gated_config = type(config)
    set_config_class(config, gated_config_class(upstream_config))
    try:
        config.auto_map = entries["auto_map"]
        setattr(config, GATE_CONFIG_KEY, entries[GATE_CONFIG_KEY])
        setattr(config, GATE_MODULES_KEY, entries[GATE_MODULES_KEY])
        result = plain_save(save_directory, *args, **kwargs)
    finally:
        set_config_class(config, gated_config)
        for key in ("auto_map", "architectures"):
            config.__dict__.pop(key, None)
        config.__dict__.update(previous)
    if kwargs.get("is_main_process", True):
        write_remote_code(Path(save_directory))
    return result
