"""The gated checkpoint format: the one builder of a gated ``config.json``, and the gate tensors it implies.

On disk a gated checkpoint is the upstream checkpoint plus the gate tensors of every gated layer
(``<decoder_layers>.<i>.<attention>.attn_gate.weight`` and ``.bias``), the remote code file, and a ``config.json``
with ``model_type: gated_<family>``, the gate config, where the gated modules are and an ``auto_map`` that names the
remote code's ``Gated<UpstreamClass>`` classes.
"""

from __future__ import annotations

from typing import Any, Mapping

import transformers
from transformers.utils import CONFIG_NAME

from ..core.attention import GATE_MODULE_NAME
from ..core.checkpoint import GATE_CONFIG_KEY, GATE_MODULES_KEY, GATED_PREFIX
from ..core.config import GateConfig
from ..core.errors import GatedCheckpointError
from ..core.gate import gate_shape
from .remote_code import REMOTE_MODULE

def is_gated_model_type(model_type: Any) -> bool:
    return isinstance(model_type, str) and model_type.startswith(GATED_PREFIX)


def family_of(model_type: str) -> str:
    """The upstream family of a (gated) model type: ``gated_llama`` -> ``llama``."""
    return model_type[len(GATED_PREFIX):] if is_gated_model_type(model_type) else model_type


def _transformers_class(cls: type, what: str) -> str:
    if getattr(transformers, cls.__name__, None) is not cls:
        raise GatedCheckpointError(
            f"Cannot write a gated checkpoint of {cls.__module__}.{cls.__name__}: its remote code rebuilds the model from "
            f"transformers' own {what} classes by name, and transformers.{cls.__name__} is not this class. Gate a model "
            "built from a transformers architecture.")
    return cls.__name__


def gated_config_entries(config_class: type, model_class: type, gate: GateConfig,
                         modules: Mapping[str, str], auto_map: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``config.json`` entries that make an upstream config (of `config_class`, for `model_class`) a gated one.

    `auto_map`: the upstream config's own entries, kept except for the configuration and model classes (a checkpoint
    with its own modeling code is gated through the transformers class it builds on).
    """
    config_name, model_name = _transformers_class(config_class, "config"), _transformers_class(model_class, "model")
    kept = {key: value for key, value in (auto_map or {}).items() if key != "AutoConfig" and not key.startswith("AutoModel")}
    return {
        "model_type": GATED_PREFIX + config_class.model_type,
        "architectures": [f"Gated{model_name}"],
        "auto_map": {**kept, "AutoConfig": f"{REMOTE_MODULE}.Gated{config_name}",
                     "AutoModelForCausalLM": f"{REMOTE_MODULE}.Gated{model_name}"},
        GATE_CONFIG_KEY: gate.to_dict(),
        GATE_MODULES_KEY: dict(modules),
    }


def gate_tensor_shapes(gate: GateConfig, modules: Mapping[str, str], config: Mapping[str, Any],
                       where: Any = CONFIG_NAME) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of every gate tensor a checkpoint with this (upstream or gated) config dict holds."""
    try:
        text = config.get("text_config") or config
        heads, hidden = int(text["num_attention_heads"]), int(text["hidden_size"])
        head_dim, num_layers = int(text.get("head_dim") or hidden // heads), int(text["num_hidden_layers"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise GatedCheckpointError(f"{where}: missing or invalid attention sizes ({type(exc).__name__}: {exc}); "
                                   "fix config.json.") from exc
    out_features, in_features = gate_shape(gate, hidden, heads, head_dim)
    shapes = {}
    for index in gate.layer_indices(num_layers):
        prefix = f"{modules['decoder_layers']}.{index}.{modules['attention']}.{GATE_MODULE_NAME}"
        shapes[f"{prefix}.weight"] = (out_features, in_features)
        if gate.bias:
            shapes[f"{prefix}.bias"] = (out_features,)
    return shapes


def set_config_class(config: Any, cls: type) -> None:
    """Switch a config between its upstream and its gated class (same fields; ``model_type`` follows the class)."""
    object.__setattr__(config, "__class__", cls)
    if "model_type" in config.__dict__:  # configs read from config.json may hold the value in the instance too
        config.__dict__["model_type"] = cls.model_type


def is_gate_tensor(name: str) -> bool:
    return f".{GATE_MODULE_NAME}." in f".{name}"
