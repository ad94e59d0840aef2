"""Finding the attention modules of a model by structure, for families nobody registered.

The contract the gate mechanism needs (the same the structure guard checks): the text decoder's layers are one
``nn.ModuleList``; every layer with self-attention holds it under the same name, with an ``nn.Linear`` or ``Conv1D``
output projection that takes the attention output head by head; its ``forward(hidden_states, ...)`` applies that
projection last, once per call. In a hybrid, the layers with softmax attention are gated and the state-space,
recurrent and linear-attention layers left alone. Attention that already has an output gate, cross-attention and an
attention module shared by several layers are refused, each with the reason.
"""

from __future__ import annotations

import re

from torch import nn

from .core.errors import UnsupportedModelError
from .core.gate import GATE_MODULE_NAME
from .gating import ModelFamily, check_gated_class
from .guards import PROJECTIONS, forward_calls_projection_once, forward_source, projection_calls

#: Child names of a decoder layer that hold cross-attention (its keys and values come from an encoder).
CROSS_ATTENTION = re.compile(r"cross|encoder_attn|src_attn")
#: What a native output gate looks like in an attention forward: a sigmoid or softplus, or a variable called gate.
NATIVE_GATE = re.compile(r"\b(sigmoid|softplus)\s*\(|\bgate\b")
#: What a softmax attention forward calls (transformers' attention interface, or the softmax itself).
SOFTMAX_ATTENTION = re.compile(r"attention_interface|eager_attention_forward|scaled_dot_product_attention|softmax\(")


def _refuse(model: nn.Module, reason: str) -> UnsupportedModelError:
    model_type = model.config.model_type
    return UnsupportedModelError(
        f"Cannot gate {type(model).__name__} (model_type {model_type!r}): {reason}. gated_patch gates attention whose "
        "forward(hidden_states, ...) calls one output projection once; if this family fits that with other names, "
        f"register it: gated_patch.register_model_type({model_type!r}, <attention class>, decoder_layers=..., "
        "attention=..., output_projection=...).")


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The text decoder's layer list and its path: the longest ``nn.ModuleList`` that is a direct child of
    ``model.get_decoder()`` (or of its ``model``, when get_decoder returns the causal LM itself)."""
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        decoder = model
    names = {id(module): name for name, module in model.named_modules()}
    for holder in (decoder, getattr(decoder, "model", None)):
        lists = [(names[id(child)], child) for child in getattr(holder, "children", list)()
                 if isinstance(child, nn.ModuleList) and len(child) and id(child) in names]
        if lists:
            return max(lists, key=lambda item: len(item[1]))
    raise _refuse(model, f"its decoder ({type(decoder).__name__}) has no list of decoder layers")


def _is_attention(module: nn.Module) -> bool:
    return "attention" in type(module).__name__.lower() and any(isinstance(c, PROJECTIONS) for c in module.children())


def _attention_child(model: nn.Module, layer: nn.Module) -> tuple[str, nn.Module] | None:
    """The layer's self-attention module, or None for a layer without one (state-space, recurrent, MLP-only)."""
    candidates = [(name, child) for name, child in layer.named_children() if _is_attention(child)]
    cross = [name for name, _ in candidates if CROSS_ATTENTION.search(name)]
    if cross:
        raise _refuse(model, f"its decoder layers hold cross-attention ({', '.join(cross)})")
    if len(candidates) > 1:
        found = [f"{name} ({type(child).__name__})" for name, child in candidates]
        raise _refuse(model, f"a decoder layer ({type(layer).__name__}) has several self-attention modules ({found})")
    if not candidates and any(_is_attention(module) for module in layer.modules()):
        raise _refuse(model, f"a decoder layer ({type(layer).__name__}) holds its attention inside a nested block, as "
                             "models whose transformer block is shared by several layers (Zamba2) do: its gate would be "
                             "shared too, and a checkpoint cannot hold one gate under several names")
    return candidates[0] if candidates else None


def _natively_gated(attention: nn.Module) -> str:
    """What shows that `attention` already gates its output ('' if nothing)."""
    gated = [child for child, module in attention.named_children() if isinstance(module, PROJECTIONS)
             and ("gate" in child or child.startswith("g_")) and child != GATE_MODULE_NAME]  # not the plugin's own
    if gated:
        return f"a gate projection ({', '.join(gated)})"
    return "a sigmoid/softplus gate in its forward" if NATIVE_GATE.search(forward_source(type(attention))) else ""


def _attention_layers(model: nn.Module, layers: nn.ModuleList) -> tuple[str, type, list[int]]:
    """``(attention name, class, indices of the layers to gate)``: every layer with self-attention, or, in a hybrid,
    those with softmax attention that has no gate of its own."""
    found = {index: child for index, layer in enumerate(layers) if (child := _attention_child(model, layer))}
    if not found:
        raise _refuse(model, f"no decoder layer ({type(layers[0]).__name__}) has a self-attention module with projections "
                             "(a recurrent or state-space model?)")
    modules = [module for _, module in found.values()]
    if len({id(module) for module in modules}) < len(modules):
        raise _refuse(model, "an attention module is shared by several decoder layers: its gate would be shared too, and "
                             "a checkpoint cannot hold one gate under several names")
    names = sorted({name for name, _ in found.values()})
    if len(names) > 1:
        raise _refuse(model, f"its decoder layers hold attention under different names ({names})")
    classes = {type(module) for module in modules}
    hybrid = len(found) < len(layers) or len(classes) > 1
    native = {type(module): _natively_gated(module) for _, module in found.values()}
    gateable = {cls for cls in classes if not native[cls] and (not hybrid or SOFTMAX_ATTENTION.search(forward_source(cls)))}
    if not gateable:
        natively = [(cls, what) for cls, what in native.items() if what]
        if natively:
            raise _refuse(model, f"{natively[0][0].__name__} already has a native output gate ({natively[0][1]}); a second "
                                 "gate is rarely what you want (register the family explicitly to gate it anyway)")
        raise _refuse(model, f"its attention layers ({sorted(c.__name__ for c in classes)}) have no softmax attention")
    if len(gateable) > 1:
        raise _refuse(model, f"its decoder layers hold different softmax attention classes "
                             f"({sorted(c.__name__ for c in gateable)})")
    attention_class = gateable.pop()
    return names[0], attention_class, [i for i, (_, module) in found.items() if type(module) is attention_class]


def _output_projection(model: nn.Module, attention: nn.Module) -> str:
    """The projection the forward applies last, once per call (one call site, or several on exclusive branches)."""
    projections = [name for name, child in attention.named_children()
                   if isinstance(child, PROJECTIONS) and name != GATE_MODULE_NAME]
    calls = projection_calls(type(attention)) or {}
    called = {name: max((call.lineno, call.col_offset) for call, _ in calls[name]) for name in projections if name in calls}
    if not called:
        raise _refuse(model, f"{type(attention).__name__}.forward calls none of its projections by attribute")
    last = max(called, key=called.get)
    ok, reason = forward_calls_projection_once(type(attention), last, tuple(sorted(set(projections) - {last})))
    if not ok:
        raise _refuse(model, f"{type(attention).__name__}: {reason}")
    return last


def discover_family(model: nn.Module) -> ModelFamily:
    """The `ModelFamily` of `model` found from its structure (raises `UnsupportedModelError` with the reason)."""
    check_gated_class(model, model.config.model_type)
    path, layers = _decoder_layers(model)
    name, attention_class, indices = _attention_layers(model, layers)
    projection = _output_projection(model, getattr(layers[indices[0]], name))
    return ModelFamily(model.config.model_type, attention_class, decoder_layers=path, attention=name,
                       output_projection=projection,
                       attention_layers=None if indices == list(range(len(layers))) else tuple(indices))
