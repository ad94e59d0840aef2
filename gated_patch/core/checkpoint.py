"""Gated checkpoints without the plugin: rebuild the gated model that a gated ``config.json`` describes.

A gated ``config.json`` is the upstream one with ``model_type: gated_<family>``, the gate config, where the gated
modules are, and an ``auto_map`` naming ``Gated<UpstreamClass>`` classes; transformers fetches those from this module by
name (`__getattr__` below), so one file serves every family.
"""

from __future__ import annotations

from typing import Any

import transformers
from torch import nn

from .attention import GATE_MODULE_NAME, GatedPreTrainedMixin, attach_gate, gated_subclass
from .config import GateConfig
from .errors import GatedCheckpointError
from .parallel import add_gate_tp_plan, check_gate_sharding

GATED_PREFIX = "gated_"  # model_type of a gated checkpoint of family f: "gated_" + f
GATE_CONFIG_KEY = "attn_output_gate"  # config attribute (and config.json key) holding the gate config
GATE_MODULES_KEY = "attn_output_gate_modules"  # config.json key: where the gated modules are
DEFAULT_GATE_MODULES = {"decoder_layers": "model.layers", "attention": "self_attn", "output_projection": "o_proj"}


def gate_config_of(config: Any, where: str = "config") -> GateConfig:
    """The gate config recorded in a model config; a clear error if there is none."""
    data = getattr(config, GATE_CONFIG_KEY, None)
    if data is None:
        raise GatedCheckpointError(f"{where} (model_type {getattr(config, 'model_type', None)!r}) has no {GATE_CONFIG_KEY!r} "
                                   "entry, so the gate is unknown. Re-save the model from a patched model or re-convert it.")
    return data if isinstance(data, GateConfig) else GateConfig.from_dict(dict(data))


def gate_modules_of(config: Any) -> dict[str, str]:
    """Where a config (or config dict) puts the gates: decoder layers, attention module in a layer, output projection."""
    modules = (config if isinstance(config, dict) else vars(config)).get(GATE_MODULES_KEY) or DEFAULT_GATE_MODULES
    if not isinstance(modules, dict) or set(modules) != set(DEFAULT_GATE_MODULES) or not all(
            isinstance(path, str) for path in modules.values()):
        raise GatedCheckpointError(f"config {GATE_MODULES_KEY!r} must map {sorted(DEFAULT_GATE_MODULES)} to module paths, "
                                   f"got {modules!r}. Re-save the model from a patched model or re-convert it.")
    return dict(modules)


def add_gates(model: nn.Module, gate: GateConfig, modules: dict[str, str]) -> None:
    """Give every selected attention module of `model` its gate."""
    text_config = model.config.get_text_config()
    layers = model.get_submodule(modules["decoder_layers"])
    for index in gate.layer_indices(len(layers)):
        attach_gate(layers[index].get_submodule(modules["attention"]), gate, hidden_size=text_config.hidden_size,
                    init_std=getattr(text_config, "initializer_range", None) or 0.02,
                    output_projection=modules["output_projection"])
    add_gate_tp_plan(model, gate, modules)


def load_checked(load, pretrained_model_name_or_path, *args, **kwargs):
    """``load`` (a ``from_pretrained``), refusing a load that leaves any tensor missing, unused or reshaped.

    It also refuses a gate split across tensor-parallel ranks otherwise than its heads. transformers would initialise
    a missing gate (an identity gate becomes a random ~0.5 gate) and only warn about gate tensors the model has no
    place for. Same return convention as ``from_pretrained``.
    """
    want_info = kwargs.pop("output_loading_info", False)
    kwargs["ignore_mismatched_sizes"] = True  # wrong shapes are reported below, naming the tensors
    model, info = load(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
    problems = [f"{what} tensors {sorted(names)[:4]}{' ...' if len(names) > 4 else ''}" for what, names in (
        ("missing", info["missing_keys"]), ("unused", info["unexpected_keys"]),
        ("wrong-shaped", [f"{n} (checkpoint {tuple(a)}, model {tuple(b)})" for n, a, b in info["mismatched_keys"]])) if names]
    if problems:
        raise GatedCheckpointError(f"Gated checkpoint {pretrained_model_name_or_path}: {'; '.join(problems)}. A truncated or "
                                   "hand-edited checkpoint? Re-save or re-convert it; it is not loaded with made-up weights.")
    check_gate_sharding(model)
    return (model, info) if want_info else model


class GatedConfigMixin:
    """In front of an upstream config class: the same fields under the ``gated_<family>`` model type."""


class GatedCausalLM(GatedPreTrainedMixin):
    """In front of an upstream causal LM: builds it, then adds the gates its config describes; loading is checked."""

    def __init__(self, config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        add_gates(self, gate_config_of(config), gate_modules_of(config))

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        return load_checked(super().from_pretrained, *args, **kwargs)


def gated_config_class(upstream: type) -> type:
    return gated_subclass(upstream, GatedConfigMixin, model_type=GATED_PREFIX + upstream.model_type)


def __getattr__(name: str) -> type:
    """``Gated<X>Config`` and ``Gated<X>ForCausalLM`` for every transformers config class ``<X>Config``.

    The model is the one AutoModelForCausalLM builds for that config; these are the names a gated checkpoint's
    ``auto_map`` gives.
    """
    stem = name[len("Gated"):].removesuffix("Config").removesuffix("ForCausalLM") if name.startswith("Gated") else ""
    config = getattr(transformers, f"{stem}Config", None) if name.endswith(("Config", "ForCausalLM")) else None
    if isinstance(config, type) and issubclass(config, transformers.PretrainedConfig):
        if name.endswith("Config"):
            return gated_config_class(config)
        upstream = transformers.MODEL_FOR_CAUSAL_LM_MAPPING[config]
        return gated_subclass(upstream, GatedCausalLM, name=name, config_class=gated_config_class(config))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
