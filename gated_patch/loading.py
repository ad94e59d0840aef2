"""Loading gated checkpoints with the plugin, through every class transformers loads a model with.

* **Auto classes.** At import, ``gated_<model_type>`` is registered with ``AutoConfig`` for every causal-LM family
  transformers has, and with each Auto class that builds a model of the family (``AutoModel``,
  ``AutoModelForCausalLM``, ``...ForSequenceClassification``, ...) a loader that makes ``Gated<UpstreamClass>`` on first
  use; no modeling code is imported until a checkpoint is loaded.
* **Concrete classes.** ``LlamaForCausalLM.from_pretrained(gated_dir)`` would drop the gates (transformers only warns
  about unexpected tensors): it returns ``Gated<LlamaForCausalLM>`` instead, a model of the class asked for, with the
  checkpoint's gates. A class of another family is refused, naming the checkpoint and the fix.

``Gated<UpstreamClass>`` is the class `patch_model` gives a model, so a loaded checkpoint is exactly a patched model;
every tensor is checked before and after loading.
"""

from __future__ import annotations

import inspect
from typing import Any

import transformers
from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig, PreTrainedModel

from .checkpoints.format import auto_model_names, family_heads, family_of, is_gated_model_type
from .checkpoints.saving import gated_model_class
from .core.errors import GatedCheckpointError, UpstreamStructureError
from .core.model import GatedPreTrainedMixin, gated_config_class

_HUB_ARGUMENTS = ("cache_dir", "force_download", "proxies", "token", "revision", "subfolder", "local_files_only")


class GatedAutoLoader:
    """What an Auto class maps a ``gated_<family>`` config to (one subclass per family and head): its model class is
    ``Gated<upstream_name>``, made when a checkpoint is first loaded."""

    config_class: type
    upstream_name: str  # the transformers class the Auto class builds for the family

    @classmethod
    def model_class(cls) -> type:
        return gated_model_class(getattr(transformers, cls.upstream_name))

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        return cls.model_class().from_pretrained(*args, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs: Any):  # what the Auto classes' from_config calls
        return cls.model_class()._from_config(config, **kwargs)


def register_gated_auto_classes() -> None:
    """Register ``gated_<model_type>`` with ``AutoConfig`` and a `GatedAutoLoader` with every Auto class of the family,
    for every family transformers builds a causal LM of (config classes only)."""
    for model_type in auto_model_names()["AutoModelForCausalLM"]:
        if model_type not in CONFIG_MAPPING:
            continue
        config_class = gated_config_class(CONFIG_MAPPING[model_type])
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto_name, upstream in family_heads(model_type).items():
            loader = type(f"Gated{upstream}Loader", (GatedAutoLoader,),
                          {"config_class": config_class, "upstream_name": upstream, "__module__": __name__})
            getattr(transformers, auto_name).register(config_class, loader, exist_ok=True)


def _checkpoint_model_type(pretrained_model_name_or_path, kwargs: dict) -> str | None:
    """The ``model_type`` a checkpoint's ``config.json`` records (None when there is none to read)."""
    if pretrained_model_name_or_path is None or kwargs.get("gguf_file"):
        return None
    try:
        config, _ = PretrainedConfig.get_config_dict(pretrained_model_name_or_path,
                                                     **{k: kwargs[k] for k in _HUB_ARGUMENTS if k in kwargs})
    except (OSError, ValueError):
        return None  # transformers itself reports a checkpoint it cannot read
    return config.get("model_type")


def _from_pretrained(cls, pretrained_model_name_or_path, *args: Any, **kwargs: Any):
    """``PreTrainedModel.from_pretrained``, except that a gated checkpoint loaded through a concrete upstream class
    gives ``Gated<cls>`` (or an error), never a model without its gates."""
    if not issubclass(cls, GatedPreTrainedMixin):
        model_type = _checkpoint_model_type(pretrained_model_name_or_path, kwargs)
        if is_gated_model_type(model_type):
            family, own = family_of(model_type), getattr(cls.config_class, "model_type", None)
            if own != family:
                raise GatedCheckpointError(
                    f"{pretrained_model_name_or_path} is a gated {family} checkpoint (model_type {model_type!r}); "
                    f"{cls.__name__} is a {own} model and would load it without its gates. Load it with the family's "
                    f"class or an Auto class, e.g. AutoModelForCausalLM.from_pretrained({str(pretrained_model_name_or_path)!r}).")
            return gated_model_class(cls).from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
    return _PLAIN_FROM_PRETRAINED(cls, pretrained_model_name_or_path, *args, **kwargs)


def intercept_concrete_loads() -> None:
    """Route ``from_pretrained`` of every concrete transformers class through `_from_pretrained` (once)."""
    global _PLAIN_FROM_PRETRAINED
    current = inspect.getattr_static(PreTrainedModel, "from_pretrained")
    if getattr(current, "__func__", None) is _from_pretrained:
        return
    if not isinstance(current, classmethod):
        raise UpstreamStructureError(f"transformers {transformers.__version__}: PreTrainedModel.from_pretrained is no "
                                     "longer a classmethod; install a supported transformers.")
    _PLAIN_FROM_PRETRAINED = current.__func__
    PreTrainedModel.from_pretrained = classmethod(_from_pretrained)


_PLAIN_FROM_PRETRAINED = None
