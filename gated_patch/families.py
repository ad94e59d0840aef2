"""The family registry: what `patch_model`, ``save_pretrained`` and the loaders need to know about a model family.

A family is data, keyed by ``config.model_type``: the upstream attention class, where the decoder layers are, the
attention module's name in a layer and its output projection's name. Registering it (`register_model_type`) makes the
family patchable, savable, and loadable with the plugin (the Auto classes) and without it (the generic remote code).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Union

from .checkpoints.loading import register_checkpoint_classes
from .core.errors import UnsupportedModelError


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


_FAMILIES: dict[str, ModelFamily] = {}


def register_model_type(model_type: str, attention_class: Union[str, type], *, decoder_layers: str = "model.layers",
                        attention: str = "self_attn", output_projection: str = "o_proj",
                        overwrite: bool = False) -> ModelFamily:
    """Register a model family: `patch_model` gates it, ``save_pretrained`` writes gated checkpoints of it, and
    ``AutoModelForCausalLM.from_pretrained`` loads them (with this plugin, or with ``trust_remote_code=True``).

    Example::

        gated_patch.register_model_type("mixtral", "transformers.models.mixtral.modeling_mixtral:MixtralAttention")

    The attention forward must take ``hidden_states`` first and call ``self.<output_projection>(...)`` exactly once,
    as transformers' Llama-style attention classes do; `patch_model` checks this and refuses otherwise.
    """
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"model_type must be a non-empty string, got {model_type!r}.")
    if model_type in _FAMILIES and not overwrite:
        raise ValueError(f"Model type {model_type!r} is already registered ({_FAMILIES[model_type]}); pass "
                         "overwrite=True to replace it.")
    family = ModelFamily(model_type, attention_class, decoder_layers, attention, output_projection)
    _FAMILIES[model_type] = family
    register_checkpoint_classes(family)
    return family


def unregister_model_type(model_type: str) -> None:
    """Forget a family: `patch_model` refuses it again (its gated checkpoints keep loading in this process)."""
    _FAMILIES.pop(model_type, None)


def registered_model_types() -> list[str]:
    return sorted(_FAMILIES)


def get_model_family(model_type: str) -> ModelFamily:
    family = _FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedModelError(
            f"gated_patch does not support model_type {model_type!r}. Supported: {registered_model_types()}. "
            "If its attention is Llama-style (forward(hidden_states, ...) calls self.o_proj(...) once), register it:\n"
            f"    gated_patch.register_model_type({model_type!r}, "
            '"transformers.models.<name>.modeling_<name>:<Name>Attention")')
    return family


for _model_type, _attention in {
    "llama": "transformers.models.llama.modeling_llama:LlamaAttention",
    "qwen2": "transformers.models.qwen2.modeling_qwen2:Qwen2Attention",
    "mistral": "transformers.models.mistral.modeling_mistral:MistralAttention",
    "qwen3": "transformers.models.qwen3.modeling_qwen3:Qwen3Attention",
}.items():
    register_model_type(_model_type, _attention)
