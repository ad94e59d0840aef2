"""Finding the attention modules of a causal LM by structure, for families nobody registered.

The contract the gate mechanism needs (the same the structure guard checks): the text decoder's layers are one
``nn.ModuleList``; every layer has one self-attention module under the same name, with an integer ``head_dim`` and an
``nn.Linear`` output projection; its ``forward(hidden_states, ...)`` calls that projection exactly once, last of its
projections. Attention that already has an output gate, cross-attention, and attention without a ``head_dim`` (e.g.
multi-head latent attention) are refused, each with the reason.
"""

from __future__ import annotations

import re

from torch import nn

from .core.errors import UnsupportedModelError
from .gating import ModelFamily, check_gated_class
from .guards import calls, forward_calls_projection_once, forward_source

#: Child names of a decoder layer that hold cross-attention (its keys and values come from an encoder).
CROSS_ATTENTION = re.compile(r"cross|encoder_attn|src_attn")
#: What a native output gate looks like in an attention forward: a sigmoid or softplus, or a variable called gate.
NATIVE_GATE = re.compile(r"\b(sigmoid|softplus)\s*\(|\bgate\b")


def _refuse(model: nn.Module, reason: str) -> UnsupportedModelError:
    model_type = model.config.model_type
    return UnsupportedModelError(
        f"Cannot gate {type(model).__name__} (model_type {model_type!r}): {reason}. gated_patch gates attention whose "
        "forward(hidden_states, ...) calls one output projection once; if this family fits that with other names, "
        f"register it: gated_patch.register_model_type({model_type!r}, <attention class>, decoder_layers=..., "
        "attention=..., output_projection=...).")


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The text decoder's layer list and its path: the ``nn.ModuleList`` of one layer class that is a direct child of
    ``model.get_decoder()`` (or of its ``model``, when get_decoder returns the causal LM itself); the longest one."""
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        decoder = model
    names = {id(module): name for name, module in model.named_modules()}
    for holder in (decoder, getattr(decoder, "model", None)):
        lists = [(names[id(child)], child) for child in getattr(holder, "children", list)()
                 if isinstance(child, nn.ModuleList) and len(child) and len({type(layer) for layer in child}) == 1
                 and id(child) in names]
        if lists:
            return max(lists, key=lambda item: len(item[1]))
    raise _refuse(model, f"its decoder ({type(decoder).__name__}) has no list of decoder layers of one class")


def _attention_child(model: nn.Module, layer: nn.Module) -> tuple[str, nn.Module]:
    candidates = [(name, child) for name, child in layer.named_children()
                  if "attention" in type(child).__name__.lower() and any(isinstance(c, nn.Linear) for c in child.children())]
    cross = [name for name, _ in candidates if CROSS_ATTENTION.search(name)]
    if cross:
        raise _refuse(model, f"its decoder layers hold cross-attention ({', '.join(cross)})")
    if len(candidates) != 1:
        found = [f"{name} ({type(child).__name__})" for name, child in candidates] or "none"
        raise _refuse(model, f"a decoder layer ({type(layer).__name__}) has no single self-attention module with "
                             f"projections (found {found}; a recurrent, state-space or linear-attention layer?)")
    return candidates[0]


def _output_projection(model: nn.Module, attention: nn.Module) -> str:
    """The projection the forward calls last, exactly once, mapping heads * head_dim features to the hidden size."""
    source = forward_source(type(attention))
    linear = [name for name, child in attention.named_children() if isinstance(child, nn.Linear)]
    called = {name: positions for name in linear if (positions := calls(source, name))}
    if not called:
        raise _refuse(model, f"{type(attention).__name__}.forward calls none of its linear projections by attribute")
    last = max(called, key=lambda name: max(called[name]))
    ok, reason = forward_calls_projection_once(type(attention), last, tuple(sorted(set(linear) - {last})))
    if not ok:
        raise _refuse(model, f"{type(attention).__name__}: {reason}")
    return last


def discover_family(model: nn.Module) -> ModelFamily:
    """The `ModelFamily` of `model` found from its structure (raises `UnsupportedModelError` with the reason)."""
    check_gated_class(model, model.config.model_type)
    path, layers = _decoder_layers(model)
    found = []
    for index, layer in enumerate(layers):
        try:
            found.append(_attention_child(model, layer))
        except UnsupportedModelError:
            if index == 0 or not found:
                raise
            raise _refuse(model, f"its decoder layer {index} ({type(layer).__name__}) has no self-attention module like "
                                 "layer 0's: a hybrid of attention and other layers") from None
    attention_names = {(name, type(attention)) for name, attention in found}
    if len(attention_names) != 1:
        raise _refuse(model, f"its decoder layers hold different attention modules ({sorted(n for n, _ in attention_names)}"
                             ", e.g. a hybrid of attention and linear-attention layers)")
    name, attention_class = attention_names.pop()
    attention = getattr(layers[0], name)
    if not isinstance(getattr(attention, "head_dim", None), int):
        raise _refuse(model, f"{attention_class.__name__} has no integer head_dim (multi-head latent attention and "
                             "similar variants need their own handling)")
    gated = [child for child, module in attention.named_children() if isinstance(module, nn.Linear)
             and ("gate" in child or child.startswith("g_"))]
    if gated or NATIVE_GATE.search(forward_source(attention_class)):
        what = f"a gate projection ({', '.join(gated)})" if gated else "a sigmoid/softplus gate in its forward"
        raise _refuse(model, f"{attention_class.__name__} already has a native output gate ({what}); a second gate is "
                             "rarely what you want (register the family explicitly to gate it anyway)")
    projection = _output_projection(model, attention)
    return ModelFamily(model.config.model_type, attention_class, decoder_layers=path, attention=name,
                       output_projection=projection)
