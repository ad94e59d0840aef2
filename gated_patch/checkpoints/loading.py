"""Loading gated checkpoints with the plugin: the Auto classes build the upstream model and gate it with the same
primitive `patch_model` uses, so a loaded checkpoint is exactly a patched model (upstream config class, ``Gated<Class>``
model classes). Every tensor is checked: a missing, unused or wrong-shaped one is an error, never a made-up gate.

``gated_<model_type>`` is registered for every causal-LM model type transformers knows, at import and without
importing any modeling code: `GatedCheckpointLoader` resolves the upstream class when a checkpoint is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging

from ..core.checkpoint import gate_config_of, gate_modules_of, gated_config_class, load_checked
from ..core.errors import GatedCheckpointError
from ..gating import ModelFamily, gate_model
from .format import set_config_class
from .validate import check_local_checkpoint

logger = logging.get_logger(__name__)


class _GatingInit:
    """In front of an upstream causal LM: builds it from the upstream config, then gates it as the config says."""

    family: Optional[ModelFamily]  # the registered family, or None: the checkpoint's own module paths

    def __init__(self, config, *args: Any, **kwargs: Any) -> None:
        family, upstream = self.family, type(self).__bases__[1]
        gate, modules = gate_config_of(config), gate_modules_of(config)
        set_config_class(config, type(config).__bases__[1])  # the upstream config class: model_type "<family>"
        upstream.__init__(self, config, *args, **kwargs)
        self.__class__ = upstream
        if family is None:  # a family found by structure when it was saved: its own paths, checked by gate_model
            try:
                attention = self.get_submodule(modules["decoder_layers"])[0].get_submodule(modules["attention"])
            except (AttributeError, IndexError, TypeError) as exc:
                raise GatedCheckpointError(f"The checkpoint's config places the gated modules at {modules}, which "
                                           f"{upstream.__name__} does not have ({exc}).") from None
            family = ModelFamily(config.model_type, type(attention), **modules)
        elif modules != family.gate_modules:
            raise GatedCheckpointError(
                f"The checkpoint's config places the gated modules at {modules}, the registered family "
                f"{family.model_type!r} at {family.gate_modules}. Register the family as the checkpoint was saved "
                "(gated_patch.register_model_type(..., overwrite=True)), or load it with trust_remote_code=True.")
        gate_model(self, gate, family)


class GatedCheckpointLoader:
    """What ``AutoModelForCausalLM`` maps a ``gated_<family>`` config to with the plugin (one subclass per family)."""

    config_class: type
    family: Optional[ModelFamily] = None

    @classmethod
    def builder(cls) -> type:
        """``<Upstream>GatedLoader``: the upstream causal LM with `_GatingInit` in front, made on first use. It reports
        the upstream module, whose source transformers reads to pick kernels (attention, MoE experts)."""
        if "_builder" not in cls.__dict__:
            upstream = MODEL_FOR_CAUSAL_LM_MAPPING[cls.config_class.__bases__[1]]
            cls._builder = type(f"{upstream.__name__}GatedLoader", (_GatingInit, upstream),
                                {"config_class": cls.config_class, "family": cls.family,
                                 "__module__": upstream.__module__})
        return cls._builder

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args: Any, **kwargs: Any):
        local = Path(str(pretrained_model_name_or_path)) / (kwargs.get("subfolder") or "")
        if local.is_dir() and not kwargs.get("gguf_file"):
            # before transformers reads a tensor, the files it will read: every error names the file at fault
            check_local_checkpoint(local, kwargs.get("variant"))
        return load_checked(cls.builder().from_pretrained, pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs: Any):  # what AutoModelForCausalLM.from_config calls
        return cls.builder()._from_config(config, **kwargs)


def register_checkpoint_classes(model_type: str, family: Optional[ModelFamily] = None) -> bool:
    """Register ``gated_<model_type>`` with ``AutoConfig`` and its loader with ``AutoModelForCausalLM`` (again, to
    attach or drop a registered `family`). Returns False, registering nothing, for a model type that transformers'
    Auto classes do not build as a causal LM: such a family can be patched, but its checkpoints could not load."""
    if model_type not in CONFIG_MAPPING or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        logger.warning(f"model_type {model_type!r} is not one of transformers' own causal LMs: it can be patched, but "
                       "not saved as a gated checkpoint, whose remote code rebuilds transformers' classes by name.")
        return False
    config_class = gated_config_class(CONFIG_MAPPING[model_type])
    loader = type(f"Gated{model_type.title().replace('_', '').replace('-', '')}Loader", (GatedCheckpointLoader,),
                  {"config_class": config_class, "family": family, "__module__": __name__})
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModelForCausalLM.register(config_class, loader, exist_ok=True)
    return True


def register_every_causal_lm() -> None:
    """`register_checkpoint_classes` for every causal-LM model type transformers knows (config classes only)."""
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        register_checkpoint_classes(model_type)
