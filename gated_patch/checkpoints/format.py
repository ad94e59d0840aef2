"""The gated checkpoint format, plugin side: `save_pretrained` of a patched model writes it, the Auto classes load it.

On disk a gated checkpoint is the upstream checkpoint plus the gate tensors, with ``config.json`` carrying
``model_type: gated_<family>``, the gate config (``attn_output_gate``) and an ``auto_map`` pointing at the remote
code file (`remote_code`). In memory, a loaded gated checkpoint is exactly what ``patch_model`` makes of the upstream
model: upstream config class (``model_type`` ``"llama"``, ...) with ``attn_output_gate``, ``Gated<Class>`` model
classes, so ``unpatch_model``, PEFT and the diagnostics treat both the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM

from ..core.attention import GatedPreTrainedMixin
from ..core.errors import GatedCheckpointError, UnsupportedModelError
from ..patching import patch_model
from .remote_code import REMOTE_MODULE, write_remote_code
from .validate import check_local_checkpoint, check_no_dropped_weights
from .remote_model import (
    CHECKPOINT_FAMILIES,
    GATE_CONFIG_KEY,
    GATED_PREFIX,
    gate_config_of,
    gate_tensor_names,
    load_checked,
)


def checkpoint_family(model_type: str) -> tuple:
    """``(upstream config class, upstream causal LM, gated config class, remote causal LM)`` of a (gated) model type."""
    family = model_type[len(GATED_PREFIX) :] if model_type.startswith(GATED_PREFIX) else model_type
    if family not in CHECKPOINT_FAMILIES:
        raise UnsupportedModelError(
            f"Gated checkpoints support model types {sorted(CHECKPOINT_FAMILIES)}, not {model_type!r}. "
            "Patch and save a model of a supported family, or add the family to "
            "gated_patch/checkpoints/remote_model.py (CHECKPOINT_FAMILIES)."
        )
    return CHECKPOINT_FAMILIES[family]


def gated_model_type(model_type: str) -> str:
    checkpoint_family(model_type)
    return model_type if model_type.startswith(GATED_PREFIX) else GATED_PREFIX + model_type


def auto_map(model_type: str) -> dict[str, str]:
    """The ``auto_map`` entry of a gated checkpoint's ``config.json``."""
    _, _, gated_config, remote_model = checkpoint_family(model_type)
    return {
        "AutoConfig": f"{REMOTE_MODULE}.{gated_config.__name__}",
        "AutoModelForCausalLM": f"{REMOTE_MODULE}.{remote_model.__name__}",
    }


def _set_config_class(config, cls: type) -> None:
    """Switch a config between its upstream and its gated class (same fields; ``model_type`` follows the class)."""
    object.__setattr__(config, "__class__", cls)
    if "model_type" in config.__dict__:  # configs read from config.json keep the value in the instance too
        config.__dict__["model_type"] = cls.model_type


def save_gated_pretrained(model, plain_save, save_directory, *args: Any, **kwargs: Any):
    """`GatedPreTrainedMixin.save_pretrained` with the plugin: transformers' save, in the gated checkpoint format."""
    if kwargs.get("push_to_hub"):
        raise GatedCheckpointError(
            "save_pretrained(push_to_hub=True) is not supported for gated models (the remote code would not be "
            "uploaded). Save to a directory, then upload it: `gated-patch-push DIR --repo-id REPO`."
        )
    config = model.config
    upstream_config, upstream_model, gated_config, _ = checkpoint_family(config.model_type)
    if not isinstance(model, upstream_model) or type(config) is not upstream_config:
        raise GatedCheckpointError(
            f"Cannot save a gated {type(model).__name__} (config {type(config).__name__}): gated checkpoints hold "
            f"whole causal LMs ({upstream_model.__name__}). Save the model returned by "
            "AutoModelForCausalLM.from_pretrained(...) after patch_model, not one of its sub-modules."
        )
    gate = gate_config_of(config, f"{type(model).__name__}.config")
    state_dict = kwargs.get("state_dict")
    if state_dict is not None:  # e.g. from a Trainer: it must still hold every gate tensor
        text_config = config.get_text_config()
        missing = sorted(set(gate_tensor_names(gate, text_config.num_hidden_layers)) - set(state_dict))
        if missing:
            raise GatedCheckpointError(
                f"save_pretrained(state_dict=...) lacks the gate tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}; "
                "the checkpoint could not be loaded. Pass a state dict of the whole patched model, e.g. "
                "model.state_dict()."
            )
    had_auto_map = "auto_map" in config.__dict__
    previous_auto_map = config.__dict__.get("auto_map")
    _set_config_class(config, gated_config)  # model_type gated_<family> in config.json
    try:
        config.auto_map = {**(previous_auto_map or {}), **auto_map(config.model_type)}
        setattr(config, GATE_CONFIG_KEY, gate.to_dict())
        result = plain_save(save_directory, *args, **kwargs)
    finally:
        _set_config_class(config, upstream_config)
        if had_auto_map:
            config.auto_map = previous_auto_map
        else:
            config.__dict__.pop("auto_map", None)
    if kwargs.get("is_main_process", True):
        write_remote_code(save_directory)
    return result


class _PluginGatedCausalLM:
    """Registered with ``AutoModelForCausalLM`` for ``gated_<family>`` configs: builds the upstream model, converts
    the config to the upstream class and patches the model with ``patch_model``; loading checks every gate tensor."""

    def __init__(self, config, *args: Any, **kwargs: Any) -> None:
        gate = gate_config_of(config)
        upstream_config, upstream_model, _, _ = checkpoint_family(config.model_type)
        _set_config_class(config, upstream_config)
        upstream_model.__init__(self, config, *args, **kwargs)
        self.__class__ = upstream_model
        patch_model(self, gate)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args: Any, **kwargs: Any):
        local = Path(str(pretrained_model_name_or_path)) / (kwargs.get("subfolder") or "")
        if local.is_dir() and not kwargs.get("gguf_file"):
            check_local_checkpoint(local)  # every error names the file at fault (issue 7)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = load_checked(
            super().from_pretrained, pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
        )
        check_no_dropped_weights(info, local if local.is_dir() else pretrained_model_name_or_path)
        return (model, info) if want_info else model


def _loader_class(family: str) -> type:
    _, upstream_model, gated_config, remote_model = CHECKPOINT_FAMILIES[family]
    return type(
        remote_model.__name__,
        (_PluginGatedCausalLM, upstream_model),
        {"config_class": gated_config, "__module__": __name__, "__doc__": _PluginGatedCausalLM.__doc__},
    )


#: family -> the class ``AutoModelForCausalLM`` uses for ``gated_<family>`` checkpoints with the plugin installed
LOADER_CLASSES = {family: _loader_class(family) for family in CHECKPOINT_FAMILIES}


def register_auto_classes() -> None:
    """Register the gated config and model classes with ``AutoConfig`` / ``AutoModelForCausalLM`` (idempotent) and
    make ``save_pretrained`` of patched models write the gated checkpoint format."""
    for family, loader in LOADER_CLASSES.items():
        gated_config = CHECKPOINT_FAMILIES[family][2]
        AutoConfig.register(gated_config.model_type, gated_config, exist_ok=True)
        AutoModelForCausalLM.register(gated_config, loader, exist_ok=True)
    GatedPreTrainedMixin.checkpoint_saver = save_gated_pretrained
