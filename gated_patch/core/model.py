"""Gated models: the one place a gated config becomes a gated model, with the plugin and in a checkpoint's remote code.

A gated ``config.json`` is the upstream one with ``model_type: gated_<family>``, the gate config, where the gated
modules are, and an ``auto_map`` naming ``Gated<UpstreamClass>`` classes for every Auto class of the family;
transformers fetches those from this module by name (`__getattr__` below), so one file serves every family and head.
"""

from __future__ import annotations

import sys
from functools import reduce
from typing import Any, Callable, Optional

import transformers
from torch import nn
from transformers import conversion_mapping

from .config import GateConfig
from .errors import GatedCheckpointError
from .gate import AttentionGateLinear, is_gate_name
from .hooks import attach_gate
from .parallel import add_gate_tp_plan, check_gate_sharding

# model_type of a gated checkpoint of family f is "gated_" + f; its config holds the gate config and where the gates are
GATED_PREFIX, GATE_CONFIG_KEY, GATE_MODULES_KEY = "gated_", "attn_output_gate", "attn_output_gate_modules"
OPTIONAL_GATE_MODULES = {"attention_layers", "checkpoint_attention"}  # a hybrid's; where the files hold the gates
DEFAULT_GATE_MODULES = {"decoder_layers": "model.layers", "attention": "self_attn", "output_projection": "o_proj"}


def gate_config_of(config: Any, where: str = "config") -> GateConfig:
    """The gate config recorded in a model config; a clear error if there is none."""
    data = getattr(config, GATE_CONFIG_KEY, None)
    if data is None:
        raise GatedCheckpointError(f"{where} has no {GATE_CONFIG_KEY!r} entry: re-save it from a patched model or re-convert it.")
    return data if isinstance(data, GateConfig) else GateConfig.from_dict(dict(data))


def gate_modules_of(config: Any) -> dict[str, str]:
    """Where a config (or config dict) puts the gates: decoder layers, attention module in a layer, output projection."""
    modules = (config if isinstance(config, dict) else vars(config)).get(GATE_MODULES_KEY) or DEFAULT_GATE_MODULES
    if not isinstance(modules, dict) or set(modules) - OPTIONAL_GATE_MODULES != set(DEFAULT_GATE_MODULES) or not all(
            isinstance(modules[key], str) for key in DEFAULT_GATE_MODULES):
        raise GatedCheckpointError(f"{GATE_MODULES_KEY!r} must map {sorted(DEFAULT_GATE_MODULES)} to module paths, got {modules!r}")
    return dict(modules)


def decoder_layers_path(model: nn.Module, path: str) -> str:
    """`path`, the decoder layers of the class a checkpoint was saved from, as seen from `model` (any head of it).

    The layers are in the base model, which each head holds under its own prefix (``model.layers`` of a causal LM is
    ``layers`` of its base model and ``transformer.layers`` of a head whose prefix is ``transformer``).
    """
    base, parts = model.base_model, path.split(".")
    inner = next((".".join(parts[i:]) for i in range(len(parts))
                  if reduce(lambda module, name: getattr(module, name, None), parts[i:], base) is not None), None)
    return path if inner is None else inner if base is model else f"{model.base_model_prefix}.{inner}"


def gated_attention_paths(model: nn.Module, gate: GateConfig, modules: dict[str, str]) -> list[str]:
    """The module path of every attention module of `model` that `gate` selects."""
    path, hybrid = decoder_layers_path(model, modules["decoder_layers"]), modules.get("attention_layers")
    return [f"{path}.{i}.{modules['attention']}" for i in gate.layer_indices(len(model.get_submodule(path)), hybrid)]


def add_gates(model: nn.Module, gate: GateConfig, modules: dict[str, str], placement: Optional[Callable] = None) -> None:
    """Give every selected attention module of `model` its gate: the one function that does, for every caller.

    `placement(projection)` gives each gate's ``(device, dtype)`` (default: its output projection's).
    """
    for where in gated_attention_paths(model, gate, modules):
        attach_gate(model.get_submodule(where), gate, model.config.get_text_config(), modules["output_projection"], placement)
    add_gate_tp_plan(model, gate, {**modules, "decoder_layers": decoder_layers_path(model, modules["decoder_layers"])})


def load_checked(load, pretrained_model_name_or_path, *args, **kwargs):
    """``load`` (a ``from_pretrained``), refusing a load that leaves a gate tensor missing, unused or reshaped.

    A checkpoint of the same head is held to every tensor; loaded as another head (a causal LM's checkpoint as a
    classifier, say), that head's own weights are left to transformers, which initialises and reports them. It also
    refuses a gate split across tensor-parallel ranks otherwise than its heads. Same return convention as
    ``from_pretrained``.
    """
    want_info = kwargs.pop("output_loading_info", False)  # wrong shapes are reported below, naming the tensors
    model, info = load(pretrained_model_name_or_path, *args, **{**kwargs, "output_loading_info": True,
                                                                 "ignore_mismatched_sizes": True})
    same_head = getattr(model.config, "architectures", None) in (None, [type(model).__name__.partition("__")[0]])
    found = {"missing": info["missing_keys"], "unused": info["unexpected_keys"], "wrong-shaped": [
        f"{n} (checkpoint {tuple(a)}, model {tuple(b)})" for n, a, b in info["mismatched_keys"]]}
    problems = [f"{what} tensors {kept[:4]}{' ...' if len(kept) > 4 else ''}" for what, names in found.items()
                if (kept := sorted(n for n in names if same_head or is_gate_name(n)))]
    if problems:
        raise GatedCheckpointError(f"Gated checkpoint {pretrained_model_name_or_path}: {'; '.join(problems)}: truncated or edited "
                                   "(re-save or re-convert it), or saved from a class that names its weights otherwise "
                                   "(load it with that class)? It is never loaded with made-up weights.")
    check_gate_sharding(model)
    return (model, info) if want_info else model


def checked_gate_load(model, load, weights, gate: GateConfig):
    """``load(weights)``, `model`'s vLLM ``load_weights``, refusing a gate tensor that is surplus, reshaped or missing.

    ``model.gate_tensor_shapes`` maps each gate tensor name, as `weights` names it, to its whole (unsharded) shape:
    vLLM's loaders serve a missing linear weight as uninitialised memory and ignore a surplus ``.bias``. The first load
    is the checkpoint, which must hold every gate tensor; later ones update some tensors (an RL trainer's weight sync).
    """
    expected, seen = model.gate_tensor_shapes, set()

    def checked():
        for name, tensor in weights:
            seen.add(name)
            if is_gate_name(name) and tuple(tensor.shape) != expected.get(name):
                raise GatedCheckpointError(f"Gated checkpoint: tensor {name} {tuple(tensor.shape)}: " + (
                    f"the config implies {expected[name]}" if name in expected else f"no gate of {gate} has it") +
                    ". A truncated or hand-edited checkpoint, or a wrong config.json? Re-save or re-convert it.")
            yield name, tensor
    loaded = load(checked())
    if not getattr(model, "gate_tensors_loaded", False) and (missing := sorted(set(expected) - seen)):
        raise GatedCheckpointError(f"Gated checkpoint: {len(missing)} gate tensors missing ({missing[:4]}). Truncated? "
                                   "Re-save or re-convert it; it is never served with uninitialised gates.")
    model.gate_tensors_loaded = True
    return loaded


class GatedPreTrainedMixin:
    """In front of an upstream `PreTrainedModel` class: built from a gated config it adds the gates the config describes.

    Its weight init gives each gate its own init (transformers' generic normal(0, 0.02) would turn an identity gate into
    a random ~0.5 gate), and its ``from_pretrained`` refuses a load that loses a gate (`load_checked`).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if issubclass(cls, transformers.PreTrainedModel):  # a Gated<Class> (the mixin's own subclasses are not models)
            _adopt_weight_conversions(cls.__name__, original_class(cls).__name__)

    def __init__(self, config, *args: Any, **kwargs: Any) -> None:
        gated_config = type(config)  # built as the upstream model (whose sub-models transformers' Auto classes know)
        object.__setattr__(config, "__class__", original_class(gated_config))
        super().__init__(config, *args, **kwargs)
        object.__setattr__(config, "__class__", gated_config)
        if getattr(config, GATE_CONFIG_KEY, None) is not None:
            add_gates(self, gate_config_of(config), gate_modules_of(config))
        self.gate_tensor_shapes = {name: tuple(p.shape) for name, p in self.named_parameters() if is_gate_name(name)}

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        return load_checked(super().from_pretrained, *args, **kwargs)

    def load_weights(self, weights):
        """The hook vLLM's Transformers backend loads a model through: vLLM's own loader, every gate tensor checked."""
        loader = getattr(sys.modules.get("vllm.model_executor.models.utils"), "AutoWeightsLoader", None)
        if loader is None:
            raise GatedCheckpointError("load_weights is vLLM's loading hook: load a gated checkpoint with from_pretrained.")
        return checked_gate_load(self, loader(self).load_weights, weights, gate_config_of(self.config))

    def _init_weights(self, module: nn.Module) -> None:
        module.reset_parameters() if isinstance(module, AttentionGateLinear) else super()._init_weights(module)

    @classmethod
    def is_custom_code(cls) -> bool:  # as upstream: transformers initialises and converts custom code's weights otherwise
        return original_class(cls).is_custom_code()


def _adopt_weight_conversions(gated: str, upstream: str) -> None:
    """Save and load the gated class or model type's weights under the names upstream's has (vLLM reads those)."""
    if found := conversion_mapping.get_checkpoint_conversion_mapping(upstream):  # transformers' renames of `upstream`
        conversion_mapping.register_checkpoint_conversion_mapping(gated, found, overwrite=True)


def gated_subclass(base: type, mixin: type, name: str | None = None, **attributes) -> type:
    """``Gated<Base>`` (or `name`): `mixin` in front of `base`, made once, importable from the mixin's module (pickle)."""
    namespace, name = vars(sys.modules[mixin.__module__]), name or f"Gated{base.__name__}"
    if namespace.get(name, object).__bases__ != (mixin, base):
        namespace[name] = type(name, (mixin, base), {"__module__": mixin.__module__, **attributes})
    return namespace[name]


def original_class(gated_class: type) -> type:
    """The upstream class behind a ``Gated<Base>`` model or config class (also when FSDP2 put its class in front)."""
    return next(cls for cls in gated_class.__mro__ if issubclass(cls, (transformers.PreTrainedModel, transformers.PretrainedConfig))
                and not issubclass(cls, (GatedPreTrainedMixin, GatedConfigMixin)))


class GatedConfigMixin:
    """In front of an upstream config class: the same fields under the ``gated_<family>`` model type."""


def gated_config_class(upstream: type) -> type:
    _adopt_weight_conversions(GATED_PREFIX + upstream.model_type, upstream.model_type)
    return gated_subclass(upstream, GatedConfigMixin, model_type=GATED_PREFIX + upstream.model_type)


def __getattr__(name: str) -> type:
    """``Gated<X>`` for every transformers config or model class ``<X>`` (``Gated<X>__<Config>``: built from ``<Config>``)."""
    stem, _, config = name[len("Gated"):].partition("__") if name.startswith("Gated") else ("", "", "")
    upstream, config = getattr(transformers, stem, None), getattr(transformers, config, None)
    if isinstance(upstream, type) and issubclass(upstream, transformers.PretrainedConfig):
        return gated_config_class(upstream)
    if isinstance(upstream, type) and issubclass(upstream, transformers.PreTrainedModel):  # any head of the family
        return gated_subclass(upstream, GatedPreTrainedMixin, name, config_class=gated_config_class(config or upstream.config_class))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
