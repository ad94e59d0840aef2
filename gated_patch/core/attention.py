"""The one mechanism for every family: a gate in front of an attention module's output projection, added with hooks.

Upstream attention forwards end with ``self.o_proj(attn_output)``. `attach_gate` adds the gate as a child module and
hooks: the attention module's hooks hold its input (the normed hidden states) for the duration of each call (cleared
even if the forward raises), and a pre-hook on the module in the output-projection slot multiplies the gate onto that
module's input. The slot hook follows whatever fills the slot, so a LoRA layer wrapping o_proj sees the gated input,
exactly as in ``o_proj(Y * g)``. The attention class itself is never changed.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .config import GateConfig
from .gate import AttentionGateLinear, apply_gate, gate_shape

GATE_MODULE_NAME = "attn_gate"
_HOOKS, _CONTEXT = "_gated_attention_hooks", "_gated_attention_input"  # __dict__ keys: handles; (attention, input)


def is_gated_attention(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("gate_config"), GateConfig)


def _child(module: nn.Module, name: str) -> nn.Module:
    """A registered child; in eager without getattr's search of the class hierarchy first; traced as dynamo expects."""
    return getattr(module, name) if torch.compiler.is_compiling() else nn.Module.__getattr__(module, name)


def _hold_input(attention, args, kwargs) -> None:
    """During a gated call, the module in the output-projection slot holds the block input (hooked if new there)."""
    projection = _child(attention, attention.gate_projection_name)
    if _CONTEXT not in projection.__dict__:  # new in the slot: patching, or PEFT wrapped or unloaded the projection
        attention.__dict__[_HOOKS].append(projection.register_forward_pre_hook(_gate_projection_input))
    projection.__dict__[_CONTEXT] = (attention, args[0] if args else kwargs["hidden_states"])


def gated_output_projection(attention: nn.Module) -> nn.Module:
    """The module in a gated attention's output-projection slot, with the gate's pre-hook (added if it is new there)."""
    projection = getattr(attention, attention.gate_projection_name)
    if _CONTEXT not in projection.__dict__:
        attention.__dict__[_HOOKS].append(projection.register_forward_pre_hook(_gate_projection_input))
        projection.__dict__[_CONTEXT] = None
    return projection


def _release_input(attention, args, kwargs, output) -> None:
    _child(attention, attention.gate_projection_name).__dict__[_CONTEXT] = None


def _gate_projection_input(projection, args):
    context = projection.__dict__.get(_CONTEXT)  # None outside a gated call, e.g. for the base layer of a LoRA wrapper
    if context is not None:
        attention, hidden_states = context
        gate, config = _child(attention, GATE_MODULE_NAME), attention.gate_config
        heads = args[0].shape[-1] // attention.head_dim  # this rank's heads under tensor parallelism
        return (apply_gate(args[0], hidden_states, gate, config, heads), *args[1:])


def attach_gate(attention: nn.Module, config: GateConfig, *, hidden_size: int, init_std: float,
                output_projection: str = "o_proj", device=None, dtype=None) -> None:
    """Gate one attention module; the gate gets the output projection's dtype and device unless they are given."""
    projection = getattr(attention, output_projection)
    num_heads = projection.in_features // attention.head_dim
    out_features, in_features = gate_shape(config, hidden_size, num_heads, attention.head_dim)
    gate = AttentionGateLinear(in_features, out_features, bias=config.bias, init=config.init, init_std=init_std,
                               device=device or projection.weight.device, dtype=dtype or projection.weight.dtype)
    attention.add_module(GATE_MODULE_NAME, gate.train(attention.training))
    attention.gate_config, attention.gate_num_heads, attention.gate_projection_name = config, num_heads, output_projection
    attention.__dict__[_HOOKS] = [attention.register_forward_pre_hook(_hold_input, with_kwargs=True),
                                  attention.register_forward_hook(_release_input, with_kwargs=True, always_call=True),
                                  projection.register_forward_pre_hook(_gate_projection_input)]
    projection.__dict__[_CONTEXT] = None


def detach_gate(attention: nn.Module) -> None:
    """Inverse of `attach_gate`: the module is exactly the upstream attention module again."""
    for handle in attention.__dict__.pop(_HOOKS):
        handle.remove()
    for module in attention.modules():
        module.__dict__.pop(_CONTEXT, None)
    delattr(attention, GATE_MODULE_NAME)
    for name in ("gate_config", "gate_num_heads", "gate_projection_name"):
        del attention.__dict__[name]


class GatedPreTrainedMixin:
    """In front of a gated model's `PreTrainedModel` classes: weight init gives each gate its own init.

    transformers' generic init (normal(0, 0.02)) would turn an identity gate into a random ~0.5 gate; it is dispatched
    per sub-model, so the mixin goes in front of the inner base model's class too.
    """

    def _init_weights(self, module: nn.Module) -> None:
        module.reset_parameters() if isinstance(module, AttentionGateLinear) else super()._init_weights(module)

    @classmethod
    def is_custom_code(cls) -> bool:  # as upstream: transformers initialises and converts custom code's weights otherwise
        return cls.__mro__[cls.__mro__.index(GatedPreTrainedMixin) + 1].is_custom_code()


def gated_subclass(base: type, mixin: type, name: str | None = None, **attributes) -> type:
    """``Gated<Base>`` (or `name`): `mixin` in front of `base`, made once, importable from the mixin's module (pickle)."""
    namespace, name = vars(sys.modules[mixin.__module__]), name or f"Gated{base.__name__}"
    if namespace.get(name, object).__bases__ != (mixin, base):
        namespace[name] = type(name, (mixin, base), {"__module__": mixin.__module__, **attributes})
    return namespace[name]


def original_class(gated_class: type) -> type:
    """The upstream class behind a ``Gated<Base>`` class (also when FSDP2 put its ``FSDPModule`` in front)."""
    return gated_class.__mro__[gated_class.__mro__.index(GatedPreTrainedMixin) + 1]
