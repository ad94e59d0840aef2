"""The gated checkpoint format: the one builder of a gated ``config.json``, and the gate tensors it implies.

On disk a gated checkpoint is the upstream checkpoint plus the gate tensors of every gated layer
(``<decoder_layers>.<i>.<attention>.attn_gate.weight`` and ``.bias``, under the names the family's checkpoints give
that attention module: see `names`), the remote code file, and a ``config.json``
with ``model_type: gated_<family>``, the gate config, where the gated modules are and an ``auto_map`` that names the
remote code's ``Gated<UpstreamClass>`` class for every Auto class transformers has for the family.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import transformers
from transformers import CONFIG_MAPPING
from transformers.utils import CONFIG_NAME

from ..core.config import GateConfig
from ..core.errors import GatedCheckpointError, UpstreamStructureError
from ..core.gate import GATE_MODULE_NAME, gate_shape
from ..core.model import GATE_CONFIG_KEY, GATE_MODULES_KEY, GATED_PREFIX
from ..files import read_json
from ..guards import value_head_size
from .names import CHECKPOINT_ATTENTION
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


@lru_cache(maxsize=None)
def auto_model_names() -> dict[str, dict[str, Any]]:
    """``{Auto class name: {model_type: model class name(s)}}`` for every ``AutoModel*`` class of transformers, read
    from the names each Auto class maps (no modeling code is imported)."""
    names = {}
    for name in dir(transformers):
        auto = getattr(transformers, name, None) if name.startswith("AutoModel") else None
        mapping = getattr(getattr(auto, "_model_mapping", None), "_model_mapping", None)
        if isinstance(mapping, dict):
            names[name] = mapping
    if "AutoModelForCausalLM" not in names or "AutoModel" not in names:
        raise UpstreamStructureError(f"transformers {transformers.__version__}: its Auto classes no longer hold the model "
                                     "names gated_patch reads (_model_mapping); install a supported transformers.")
    return names


def family_heads(model_type: str) -> dict[str, str]:
    """``{Auto class name: model class name}`` for every Auto class that builds a model of `model_type` (names only)."""
    heads = {}
    for auto, mapping in auto_model_names().items():
        name = mapping.get(model_type)
        if name:
            heads[auto] = name if isinstance(name, str) else name[0]
    return heads


def auto_built_classes(config_class: type) -> dict[str, type]:
    """``{Auto class name: model class}`` for every Auto class that builds a model from `config_class` (transformers'
    own families and run-time registrations; imports modeling code). The class may be another family's (``internlm3``
    configs build ``LlamaForCausalLM``)."""
    built = {}
    for auto in auto_model_names():
        try:
            model_class = getattr(transformers, auto)._model_mapping[config_class]
        except (KeyError, ValueError, AttributeError):
            continue
        built[auto] = model_class
    return built


def remote_class_name(model_name: str, config_class: type) -> str:
    """The remote code's name of the gated `model_name` built from `config_class`: ``Gated<Model>``, or
    ``Gated<Model>__<Config>`` when the class is another family's (its gated config class must match the checkpoint's)."""
    own = getattr(getattr(transformers, model_name, None), "config_class", None) is config_class
    return f"Gated{model_name}" if own else f"Gated{model_name}__{config_class.__name__}"


def gated_config_entries(config_class: type, model_class: type, gate: GateConfig,
                         modules: Mapping[str, str], auto_map: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``config.json`` entries that make an upstream config (of `config_class`, for `model_class`) a gated one.

    `auto_map`: the upstream config's own entries, kept except for the configuration and model classes (a checkpoint
    with its own modeling code is gated through the transformers class it builds on).
    """
    config_name, model_name = _transformers_class(config_class, "config"), _transformers_class(model_class, "model")
    heads = {auto: cls.__name__ for auto, cls in auto_built_classes(config_class).items() if
             getattr(transformers, cls.__name__, None) is cls}
    if model_name not in heads.values():
        raise GatedCheckpointError(
            f"Cannot write a gated checkpoint of {model_name}: no Auto class of transformers builds it for {config_name} "
            f"(they build {sorted(set(heads.values()))}), so no loader could rebuild it. Patch and save one of those.")
    kept = {key: value for key, value in (auto_map or {}).items() if key != "AutoConfig" and not key.startswith("AutoModel")}
    return {
        "model_type": GATED_PREFIX + config_class.model_type,
        "architectures": [f"Gated{model_name}"],  # what save_pretrained of the patched model writes, too
        "auto_map": {**kept, "AutoConfig": f"{REMOTE_MODULE}.Gated{config_name}",  # the remote code's class names
                     **{auto: f"{REMOTE_MODULE}.{remote_class_name(name, config_class)}" for auto, name in sorted(heads.items())}},
        GATE_CONFIG_KEY: gate.to_dict(),
        GATE_MODULES_KEY: dict(modules),
    }


def set_config_class(config: Any, cls: type) -> None:
    """Switch a config between its upstream and its gated class (same fields; ``model_type`` follows the class)."""
    object.__setattr__(config, "__class__", cls)
    if "model_type" in config.__dict__:  # configs read from config.json may hold the value in the instance too
        config.__dict__["model_type"] = cls.model_type


def remove_gated_entries(config: dict, model_class_name: str) -> dict:
    """Undo `gated_config_entries` in `config` (a ``config.json`` dict, or a config's ``__dict__``), in place: no gate
    entries, the upstream model type, ``architectures`` naming `model_class_name` where it named the gated class, and
    no ``auto_map`` entry that points at the remote code (the upstream config's own entries stay)."""
    for key in (GATE_CONFIG_KEY, GATE_MODULES_KEY):
        config.pop(key, None)
    if is_gated_model_type(config.get("model_type")):
        config["model_type"] = family_of(config["model_type"])
    if config.get("architectures") == [f"Gated{model_class_name}"]:
        config["architectures"] = [model_class_name]
    auto_map = {key: value for key, value in (config.get("auto_map") or {}).items()
                if not str(value).startswith(f"{REMOTE_MODULE}.")}
    if auto_map:
        config["auto_map"] = auto_map
    else:
        config.pop("auto_map", None)
    return config


def config_object(config_path: Path | str):
    """The transformers config (the upstream class) of a ``config.json``, read as transformers reads it, so sizes
    come out the way the model reads them (attribute maps such as ``n_head``, multimodal text configs)."""
    config = read_json(config_path)
    model_type = family_of(str(config.get("model_type")))
    if model_type not in CONFIG_MAPPING:
        raise GatedCheckpointError(f"{config_path}: model_type {config.get('model_type')!r} is not a transformers model "
                                   "type; fix config.json or upgrade transformers.")
    try:
        return CONFIG_MAPPING[model_type].from_json_file(config_path)
    except Exception as exc:  # noqa: BLE001 - any invalid config: one error naming the file
        raise GatedCheckpointError(f"{config_path}: not a valid {model_type} config ({type(exc).__name__}: {exc}); "
                                   "fix config.json.") from exc


def gate_tensor_shapes(gate: GateConfig, modules: Mapping[str, str], config: Any,
                       where: Any = CONFIG_NAME) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of every gate tensor of a model with this transformers config: heads and head size
    from the (text) config, as the output projection must take them (`gating` checks that when patching). The names
    are the files' where `modules` records them (``checkpoint_attention``, see `names`), else the module paths."""
    text = config.get_text_config()
    try:
        heads, hidden, num_layers = int(text.num_attention_heads), int(text.hidden_size), int(text.num_hidden_layers)
        head_dim = value_head_size(text)
    except Exception as exc:  # noqa: BLE001 - missing, invalid or per-layer sizes (transformers' own error types)
        raise GatedCheckpointError(f"{where}: missing or invalid attention sizes ({type(exc).__name__}: {exc}); "
                                   "fix config.json.") from exc
    out_features, in_features = gate_shape(gate, hidden, heads, head_dim)
    shapes, attention = {}, modules.get(CHECKPOINT_ATTENTION) or f"{modules['decoder_layers']}.{{}}.{modules['attention']}"
    for index in gate.layer_indices(num_layers, modules.get("attention_layers")):
        prefix = f"{attention.format(index)}.{GATE_MODULE_NAME}"
        shapes[f"{prefix}.weight"] = (out_features, in_features)
        if gate.bias:
            shapes[f"{prefix}.bias"] = (out_features,)
    return shapes
