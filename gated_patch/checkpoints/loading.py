"""Loading gated checkpoints with the plugin: the Auto classes build the upstream model and gate it with the family's
own mechanism, so a loaded checkpoint is exactly what `patch_model` makes (upstream config class, ``Gated<Class>``
model classes). Every tensor is checked: a missing, unused or wrong-shaped one is an error, never a made-up gate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM
from transformers.utils import logging

from ..core.checkpoint import gate_config_of, gate_modules_of, gated_config_class, load_checked
from ..core.errors import GatedCheckpointError
from ..gating import gate_model
from .format import set_config_class
from .validate import check_local_checkpoint

logger = logging.get_logger(__name__)


class GatedCheckpointLoader:
    """In front of an upstream causal LM: what ``AutoModelForCausalLM`` builds for a ``gated_<family>`` config."""

    family: Any  # the ModelFamily this loader was registered for

    def __init__(self, config, *args: Any, **kwargs: Any) -> None:
        family, upstream = self.family, type(self).__bases__[1]
        gate, modules = gate_config_of(config), gate_modules_of(config)
        if modules != family.gate_modules:
            raise GatedCheckpointError(
                f"The checkpoint's config places the gated modules at {modules}, the registered family "
                f"{family.model_type!r} at {family.gate_modules}. Register the family as the checkpoint was saved "
                "(gated_patch.register_model_type(..., overwrite=True)), or load it with trust_remote_code=True.")
        set_config_class(config, type(config).__bases__[1])  # the upstream config class: model_type "<family>"
        upstream.__init__(self, config, *args, **kwargs)
        self.__class__ = upstream
        gate_model(self, gate, family)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args: Any, **kwargs: Any):
        local = Path(str(pretrained_model_name_or_path)) / (kwargs.get("subfolder") or "")
        if local.is_dir() and not kwargs.get("gguf_file"):
            check_local_checkpoint(local)  # before transformers reads a tensor: every error names the file at fault
        return load_checked(super().from_pretrained, pretrained_model_name_or_path, *args, **kwargs)


def register_checkpoint_classes(family) -> bool:
    """Register ``gated_<family>`` with ``AutoConfig`` and its loader with ``AutoModelForCausalLM`` (idempotent).

    Returns False, registering nothing, for a model type that transformers' Auto classes do not build as a causal LM:
    such a family can be patched, but saving it as a gated checkpoint raises (the checkpoint could not be loaded).
    """
    try:
        upstream_config = CONFIG_MAPPING[family.model_type]
        upstream_model = MODEL_FOR_CAUSAL_LM_MAPPING[upstream_config]
    except KeyError:
        logger.warning(f"model_type {family.model_type!r} has no causal LM in transformers' AutoModelForCausalLM mapping: "
                       "it can be patched, but not saved as a gated checkpoint.")
        return False
    config_class = gated_config_class(upstream_config)
    # The loader never has instances (it turns into the patched upstream class). It reports the upstream module, whose
    # source transformers reads to decide which kernels (attention, MoE experts) the model may use.
    loader = type(f"{upstream_model.__name__}GatedLoader", (GatedCheckpointLoader, upstream_model),
                  {"config_class": config_class, "family": family, "__module__": upstream_model.__module__})
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModelForCausalLM.register(config_class, loader, exist_ok=True)
    return True
