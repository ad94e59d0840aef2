"""Registry of supported model families, keyed by ``config.model_type`` (data, extended by users)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Union

from .core.errors import UnsupportedModelError


@dataclass(frozen=True)
class ModelFamily:
    """Where the attention modules of one model family live and what they are called.

    Args:
        model_type: ``config.model_type`` of the family, e.g. ``"llama"``.
        attention_class: the upstream attention class, or its import path ``"package.module:ClassName"``
            (resolved lazily, so registering a family does not import its modeling code).
        decoder_layers: dotted path from the causal-LM model to its list of decoder layers.
        attention: attribute name of the attention module in a decoder layer.
        output_projection: attribute name of the output projection in the attention module.
        query_projection: attribute name of the query projection (used by the fused gate path).
    """

    model_type: str
    attention_class: Union[str, type]
    decoder_layers: str = "model.layers"
    attention: str = "self_attn"
    output_projection: str = "o_proj"
    query_projection: str = "q_proj"

    def resolve_attention_class(self) -> type:
        if isinstance(self.attention_class, type):
            return self.attention_class
        module_name, _, class_name = self.attention_class.partition(":")
        try:
            return getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as exc:
            raise UnsupportedModelError(
                f"Model family {self.model_type!r}: cannot import attention class {self.attention_class!r} ({exc}). "
                "Your transformers version may not ship this model; upgrade transformers or fix the registration."
            ) from exc


_REGISTRY: dict[str, ModelFamily] = {}


def register_model_type(
    model_type: str,
    attention_class: Union[str, type],
    *,
    decoder_layers: str = "model.layers",
    attention: str = "self_attn",
    output_projection: str = "o_proj",
    query_projection: str = "q_proj",
    overwrite: bool = False,
) -> ModelFamily:
    """Register a model family so `patch_model` can gate it.

    Example::

        from transformers.models.olmo2.modeling_olmo2 import Olmo2Attention
        gated_patch.register_model_type("olmo2", Olmo2Attention)

    The attention class's forward must end with ``self.<output_projection>(attn_output)``, as transformers'
    Llama-style attention classes do; `patch_model` checks this and refuses otherwise.
    """
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"model_type must be a non-empty string, got {model_type!r}.")
    if model_type in _REGISTRY and not overwrite:
        raise ValueError(
            f"Model type {model_type!r} is already registered ({_REGISTRY[model_type]}); "
            "pass overwrite=True to replace it."
        )
    family = ModelFamily(model_type, attention_class, decoder_layers, attention, output_projection, query_projection)
    _REGISTRY[model_type] = family
    return family


def unregister_model_type(model_type: str) -> None:
    _REGISTRY.pop(model_type, None)


def registered_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_model_family(model_type: str) -> ModelFamily:
    family = _REGISTRY.get(model_type)
    if family is None:
        raise UnsupportedModelError(
            f"gated_patch does not support model_type {model_type!r}. Supported: {registered_model_types()}. "
            "If its attention is Llama-style (forward ends with `self.o_proj(attn_output)`), register it:\n"
            f"    gated_patch.register_model_type({model_type!r}, \"transformers.models.<name>.modeling_<name>:"
            "<Name>Attention\")"
        )
    return family


for _model_type, _path in {
    "llama": "transformers.models.llama.modeling_llama:LlamaAttention",
    "qwen2": "transformers.models.qwen2.modeling_qwen2:Qwen2Attention",
    "mistral": "transformers.models.mistral.modeling_mistral:MistralAttention",
    "qwen3": "transformers.models.qwen3.modeling_qwen3:Qwen3Attention",
}.items():
    register_model_type(_model_type, _path)
