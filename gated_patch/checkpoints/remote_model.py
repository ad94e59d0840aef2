"""Checkpoint classes of gated models: one config class and one causal-LM class per family.

This module is the tail of the checkpoint's remote code (``modeling_gated_attention.py``, see `remote_code`): the
generator prepends the gate core (``gated_patch/core/{errors,config,gate,attention}.py``) and drops the relative
imports below, so the file a checkpoint carries imports only torch and transformers (plus the standard library).
The same classes are importable from this module with the plugin installed.

A gated checkpoint is the upstream checkpoint plus one tensor set per gated layer,
``model.layers.{i}.self_attn.attn_gate.weight`` (and ``.bias``), and a ``config.json`` whose ``model_type`` is
``gated_<family>`` and whose ``attn_output_gate`` holds the gate config.
"""

from __future__ import annotations

from typing import Any

from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from ..core.attention import GATE_MODULE_NAME, GatedPreTrainedMixin, attach_gate
from ..core.config import GateConfig
from ..core.errors import GatedCheckpointError

#: Key of the gate config in ``config.json`` (same attribute as on a model patched in memory).
GATE_CONFIG_KEY = "attn_output_gate"
#: ``model_type`` of a gated checkpoint of family ``f``: ``GATED_PREFIX + f``.
GATED_PREFIX = "gated_"


def gate_config_of(config: Any, where: str = "config") -> GateConfig:
    """The `GateConfig` recorded in a model config; a clear error if it is missing."""
    data = getattr(config, GATE_CONFIG_KEY, None)
    if data is None:
        raise GatedCheckpointError(
            f"{where} has model_type {getattr(config, 'model_type', None)!r} but no {GATE_CONFIG_KEY!r} entry, so the "
            "gate layout is unknown. Re-save the checkpoint from a patched model (model.save_pretrained) or "
            "re-convert it with `gated-patch-convert`."
        )
    if isinstance(data, GateConfig):
        return data
    return GateConfig.from_dict(dict(data))


def gate_tensor_names(gate: GateConfig, num_layers: int, prefix: str = "model.layers") -> list[str]:
    """The state-dict names of every gate tensor of a gated causal LM with `num_layers` decoder layers."""
    names = []
    for index in gate.layer_indices(num_layers):
        names.append(f"{prefix}.{index}.self_attn.{GATE_MODULE_NAME}.weight")
        if gate.bias:
            names.append(f"{prefix}.{index}.self_attn.{GATE_MODULE_NAME}.bias")
    return names


def insert_gates(model: Any, gate: GateConfig) -> None:
    """Give every selected attention module of a Llama-style causal LM its gate (as ``patch_model`` does)."""
    config = model.config.get_text_config()
    layers = model.model.layers
    init_std = getattr(config, "initializer_range", None) or 0.02
    for index in gate.layer_indices(len(layers)):
        attach_gate(layers[index].self_attn, gate, hidden_size=config.hidden_size, init_std=init_std)


def check_loaded_gates(loading_info: dict, source: Any) -> None:
    """Raise unless every gate tensor was loaded from the checkpoint with the right shape and none was left over.

    transformers would otherwise initialise missing gates (an identity gate becomes a random ~0.5 gate) and only
    warn about gate tensors the model has no place for.
    """
    marker = f".{GATE_MODULE_NAME}."

    def gates(keys):
        return sorted(k for k in keys if marker in f".{k}")

    missing = gates(loading_info.get("missing_keys", ()))
    unexpected = gates(loading_info.get("unexpected_keys", ()))
    mismatched = sorted(
        f"{name} (checkpoint {tuple(ckpt)}, model {tuple(model)})"
        for name, ckpt, model in loading_info.get("mismatched_keys", ())
        if marker in f".{name}"
    )
    problems = []
    if missing:
        problems.append(f"missing gate tensors {missing}")
    if mismatched:
        problems.append(f"wrong-shaped gate tensors {mismatched}")
    if unexpected:
        problems.append(f"gate tensors the gate config has no place for {unexpected}")
    if problems:
        raise GatedCheckpointError(
            f"Gated checkpoint {source}: {'; '.join(problems)}. Its weights do not match its {GATE_CONFIG_KEY!r} "
            "config (a truncated or hand-edited checkpoint?). Re-save it from the patched model or re-convert it "
            "with `gated-patch-convert`; it is not loaded with initialised gates."
        )


def load_checked(load, pretrained_model_name_or_path, *args, **kwargs):
    """Call ``load`` (a ``from_pretrained``) with loading info and `check_loaded_gates`; same return convention."""
    want_info = kwargs.pop("output_loading_info", False)
    kwargs["ignore_mismatched_sizes"] = True  # report wrong-shaped gates ourselves, with a clear message
    model, info = load(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
    check_loaded_gates(info, pretrained_model_name_or_path)
    other = {k[0] for k in info.get("mismatched_keys", ())}
    if other:
        raise GatedCheckpointError(
            f"Checkpoint {pretrained_model_name_or_path}: tensors with a shape that does not match the config: "
            f"{sorted(other)}. Fix config.json or the weights."
        )
    return (model, info) if want_info else model


class _GatedCausalLM(GatedPreTrainedMixin):
    """Builds the upstream causal LM, then inserts the gates described by ``config.attn_output_gate``."""

    def __init__(self, config, *args: Any, **kwargs: Any) -> None:
        gate = gate_config_of(config)
        super().__init__(config, *args, **kwargs)
        insert_gates(self, gate)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args: Any, **kwargs: Any):
        return load_checked(super().from_pretrained, pretrained_model_name_or_path, *args, **kwargs)


class GatedLlamaConfig(LlamaConfig):
    model_type = "gated_llama"


class GatedQwen2Config(Qwen2Config):
    model_type = "gated_qwen2"


class GatedMistralConfig(MistralConfig):
    model_type = "gated_mistral"


class GatedQwen3Config(Qwen3Config):
    model_type = "gated_qwen3"


class GatedLlamaForCausalLM(_GatedCausalLM, LlamaForCausalLM):
    config_class = GatedLlamaConfig


class GatedQwen2ForCausalLM(_GatedCausalLM, Qwen2ForCausalLM):
    config_class = GatedQwen2Config


class GatedMistralForCausalLM(_GatedCausalLM, MistralForCausalLM):
    config_class = GatedMistralConfig


class GatedQwen3ForCausalLM(_GatedCausalLM, Qwen3ForCausalLM):
    config_class = GatedQwen3Config


#: family model_type -> (upstream config class, upstream causal-LM class, gated config class, gated causal-LM class)
CHECKPOINT_FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, GatedLlamaConfig, GatedLlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, GatedQwen2Config, GatedQwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM, GatedMistralConfig, GatedMistralForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, GatedQwen3Config, GatedQwen3ForCausalLM),
}
