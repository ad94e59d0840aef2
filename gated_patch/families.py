"""The family registry, and the family of a model: registered data, or found from the model's structure.

Every causal LM whose attention fits the gate's contract works with no registration (`gated_patch.discovery`). The
registry holds families that need data the structure does not give (other module names, an attention that discovery
refuses, such as one with its own output gate) and overrides; `llama`, `qwen2`, `mistral` and `qwen3` are registered,
so their attention classes are checked by name too.
"""

from __future__ import annotations

import re
from typing import Union

from torch import nn
from transformers import CONFIG_MAPPING
from transformers.utils import logging

from .checkpoints.format import family_heads
from .core.errors import UnsupportedModelError
from .discovery import discover_family
from .gating import ModelFamily

logger = logging.get_logger(__name__)

_FAMILIES: dict[str, ModelFamily] = {}


def register_model_type(model_type: str, attention_class: Union[str, type], *, decoder_layers: str = "model.layers",
                        attention: str = "self_attn", output_projection: str = "o_proj",
                        overwrite: bool = False) -> ModelFamily:
    """Register (or, with `overwrite`, replace) a model family: `patch_model` uses this data instead of the structure,
    ``save_pretrained`` writes gated checkpoints of it, and ``AutoModelForCausalLM.from_pretrained`` loads them (with
    this plugin, or with ``trust_remote_code=True``).

    Example::

        gated_patch.register_model_type("mixtral", "transformers.models.mixtral.modeling_mixtral:MixtralAttention")

    The attention forward must take ``hidden_states`` first and call ``self.<output_projection>(...)`` exactly once;
    `patch_model` checks this and refuses otherwise.
    """
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"model_type must be a non-empty string, got {model_type!r}.")
    _check_registration(attention_class, decoder_layers=decoder_layers, attention=attention,
                        output_projection=output_projection)
    if model_type in _FAMILIES and not overwrite:
        raise ValueError(f"Model type {model_type!r} is already registered ({_FAMILIES[model_type]}); pass "
                         "overwrite=True to replace it.")
    family = ModelFamily(model_type, attention_class, decoder_layers, attention, output_projection)
    _FAMILIES[model_type] = family
    if model_type not in CONFIG_MAPPING or not family_heads(model_type):
        logger.warning(f"model_type {model_type!r} is not one of transformers' own models: it can be patched, but not "
                       "saved as a gated checkpoint, whose remote code rebuilds transformers' classes by name.")
    return family


_NAME = re.compile(r"[A-Za-z_]\w*")


def _check_registration(attention_class, **modules: str) -> None:
    """Refuse a registration whose data cannot name modules: each error says what a valid value looks like."""
    if isinstance(attention_class, type):
        if not issubclass(attention_class, nn.Module):
            raise ValueError(f"attention_class {attention_class.__name__} is not an nn.Module subclass; pass the "
                             "attention module class of the family, or its 'module.path:ClassName'.")
    elif not (isinstance(attention_class, str) and re.fullmatch(r"[\w.]+:[A-Za-z_]\w*", attention_class)):
        raise ValueError(f"attention_class must be a class or a 'module.path:ClassName' string, got {attention_class!r}.")
    for name, path in modules.items():
        parts = path.split(".") if isinstance(path, str) else [None]
        if not all(isinstance(part, str) and _NAME.fullmatch(part) for part in parts) or (
                name != "decoder_layers" and len(parts) > 1):
            shape = "a dotted module path such as 'model.layers'" if name == "decoder_layers" else "a module name"
            raise ValueError(f"{name} must be {shape}, got {path!r}.")


def unregister_model_type(model_type: str) -> None:
    """Forget a registered family: its models are gated by structure again, if it fits."""
    _FAMILIES.pop(model_type, None)


def registered_model_types() -> list[str]:
    return sorted(_FAMILIES)


def get_model_family(model_type: str) -> ModelFamily:
    """The registered family of `model_type` (`UnsupportedModelError` if there is none)."""
    family = _FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedModelError(f"model_type {model_type!r} is not registered; registered: {registered_model_types()}. "
                                    "Unregistered families are found from the model's structure: use family_for(model).")
    return family


def family_for(model: nn.Module) -> ModelFamily:
    """The family of `model`: the registered one for its ``config.model_type``, else the one its structure shows
    (`UnsupportedModelError` naming what does not fit)."""
    return _FAMILIES.get(model.config.model_type) or discover_family(model)


for _model_type, _attention in {
    "llama": "transformers.models.llama.modeling_llama:LlamaAttention",
    "qwen2": "transformers.models.qwen2.modeling_qwen2:Qwen2Attention",
    "mistral": "transformers.models.mistral.modeling_mistral:MistralAttention",
    "qwen3": "transformers.models.qwen3.modeling_qwen3:Qwen3Attention",
}.items():
    register_model_type(_model_type, _attention)
