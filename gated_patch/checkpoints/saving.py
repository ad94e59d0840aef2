"""Saving a patched model: ``save_pretrained`` writes the gated checkpoint format (see `format`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.attention import GatedPreTrainedMixin, original_class
from ..core.checkpoint import GATE_CONFIG_KEY, GATE_MODULES_KEY, gate_config_of, gate_modules_of, gated_config_class
from ..core.errors import GatedCheckpointError
from .format import gate_tensor_shapes, gated_config_entries, set_config_class
from .remote_code import write_remote_code


#: Called as ``hook(model, configs)`` when PEFT attaches its adapter configs to a gated model (`gated_patch.adapters`
#: registers the one that makes every saved adapter carry its gate record, whoever called ``get_peft_model``).
PEFT_CONFIG_HOOKS: list = []


class GatedModelMixin(GatedPreTrainedMixin):
    """In front of a patched model's `PreTrainedModel` classes: gates get their own weight init, and
    ``save_pretrained`` writes a gated checkpoint (``gated_<family>`` config, gate tensors, remote code)."""

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


def save_gated_checkpoint(model, plain_save, save_directory, *args: Any, **kwargs: Any):
    """transformers' ``save_pretrained`` (`plain_save`) of a patched model, in the gated checkpoint format."""
    if kwargs.get("push_to_hub"):
        raise GatedCheckpointError(
            "save_pretrained(push_to_hub=True) is not supported for gated models (the remote code would not be uploaded). "
            "Save to a directory, then upload it: `gated-patch-push DIR --repo-id REPO`.")
    config = model.config
    gate, modules = gate_config_of(config, f"{type(model).__name__}.config"), gate_modules_of(config)
    try:
        model.get_submodule(modules["decoder_layers"])
    except AttributeError:
        raise GatedCheckpointError(
            f"Cannot save a gated {type(model).__name__}: gated checkpoints hold whole causal LMs, whose decoder layers are "
            f"at {modules['decoder_layers']!r}. Save the model AutoModelForCausalLM.from_pretrained(...) returned after "
            "patch_model, not one of its sub-modules.") from None
    state_dict = kwargs.get("state_dict")
    if state_dict is not None:  # e.g. from a Trainer: it must still hold every gate tensor
        missing = sorted(set(gate_tensor_shapes(gate, modules, config)) - set(state_dict))
        if missing:
            raise GatedCheckpointError(
                f"save_pretrained(state_dict=...) lacks the gate tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}; "
                "the checkpoint could not be loaded. Pass a state dict of the whole patched model, e.g. model.state_dict().")
    upstream_config = type(config)
    entries = gated_config_entries(upstream_config, original_class(type(model)), gate, modules,
                                   config.__dict__.get("auto_map"))
    previous = {key: config.__dict__[key] for key in ("auto_map", "architectures") if key in config.__dict__}
    set_config_class(config, gated_config_class(upstream_config))
    try:
        config.auto_map = entries["auto_map"]
        setattr(config, GATE_CONFIG_KEY, entries[GATE_CONFIG_KEY])
        setattr(config, GATE_MODULES_KEY, entries[GATE_MODULES_KEY])
        result = plain_save(save_directory, *args, **kwargs)
    finally:
        set_config_class(config, upstream_config)
        for key in ("auto_map", "architectures"):
            config.__dict__.pop(key, None)
        config.__dict__.update(previous)
    if kwargs.get("is_main_process", True):
        write_remote_code(Path(save_directory))
    return result
