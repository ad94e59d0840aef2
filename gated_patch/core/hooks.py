"""The one mechanism for every family: a gate in front of an attention module's output projection, added with hooks.

Upstream attention forwards end with ``self.o_proj(attn_output)``. `attach_gate` adds the gate as a child module and
hooks: the attention module's hooks hold its input (the normed hidden states) for the duration of each call (cleared
even if the forward raises), and a pre-hook on the module in the output-projection slot replaces that module's input
``Y`` by ``Y * g`` (`gate.apply_gate`). The slot hook follows whatever fills the slot, so a LoRA layer wrapping o_proj
sees the gated input, exactly as in ``o_proj(Y * g)``. The attention class itself is never changed.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import GateConfig
from .gate import GATE_MODULE_NAME, AttentionGateLinear, apply_gate, gate_shape

_HOOKS, _CONTEXT = "_gated_attention_hooks", "_gated_attention_input"  # __dict__ keys: handles; (attention, input)
GATE_ATTRIBUTES = ("gate_config", "gate_num_heads", "gate_head_dim", "gate_projection_name")  # set on a gated attention


def is_gated_attention(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("gate_config"), GateConfig)


def _child(module: nn.Module, name: str) -> nn.Module:
    """A registered child; in eager without getattr's search of the class hierarchy first; traced as dynamo expects."""
    return getattr(module, name) if torch.compiler.is_compiling() else nn.Module.__getattr__(module, name)


def hook_output_projection(attention: nn.Module, context: tuple | None = None) -> nn.Module:
    """The module in a gated attention's output-projection slot, with the gate's pre-hook, holding `context`.

    The hook is added if the module is new there: after patching, or after PEFT wrapped or unloaded the projection.
    `context` is ``(attention, block input)`` during a gated call (`_hold_input`), None outside one.
    """
    projection = _child(attention, attention.gate_projection_name)
    if _CONTEXT not in projection.__dict__:
        attention.__dict__[_HOOKS].append(projection.register_forward_pre_hook(_gate_projection_input))
    projection.__dict__[_CONTEXT] = context
    return projection


def _hold_input(attention, args, kwargs) -> None:
    """During a gated call, the module in the output-projection slot holds the block input."""
    hook_output_projection(attention, (attention, args[0] if args else kwargs["hidden_states"]))


def _release_input(attention, args, kwargs, output) -> None:
    hook_output_projection(attention)


def _gate_projection_input(projection, args):
    """The output projection's pre-hook: its input ``Y`` becomes ``Y * g`` (`apply_gate`) during a gated call."""
    context = projection.__dict__.get(_CONTEXT)  # None outside a gated call, e.g. for the base layer of a LoRA wrapper
    if context is not None:
        attention, hidden_states = context
        heads = args[0].shape[-1] // attention.gate_head_dim  # this rank's heads under tensor parallelism
        return (apply_gate(args[0], hidden_states, _child(attention, GATE_MODULE_NAME), attention.gate_config, heads),
                *args[1:])


def attach_gate(attention: nn.Module, config: GateConfig, text_config, output_projection: str = "o_proj",
                placement=None) -> None:
    """Gate one attention module of a model whose (text) config is `text_config`.

    `placement(projection)` gives the gate's ``(device, dtype)``; by default the output projection's.
    """
    projection, num_heads = getattr(attention, output_projection), text_config.num_attention_heads
    head_dim = (projection.in_features if isinstance(projection, nn.Linear) else projection.nx) // num_heads  # Conv1D: nx
    out_features, in_features = gate_shape(config, text_config.hidden_size, num_heads, head_dim)
    device, dtype = placement(projection) if placement else (projection.weight.device, projection.weight.dtype)
    gate = AttentionGateLinear(in_features, out_features, bias=config.bias, init=config.init, device=device, dtype=dtype,
                               init_std=getattr(text_config, "initializer_range", None) or 0.02)
    attention.add_module(GATE_MODULE_NAME, gate.train(attention.training))
    attention.__dict__.update(zip(GATE_ATTRIBUTES, (config, num_heads, head_dim, output_projection)))
    attention.__dict__[_HOOKS] = [attention.register_forward_pre_hook(_hold_input, with_kwargs=True),
                                  attention.register_forward_hook(_release_input, with_kwargs=True, always_call=True)]
    hook_output_projection(attention)


def detach_gate(attention: nn.Module) -> None:
    """Inverse of `attach_gate`: the module is exactly the upstream attention module again."""
    for handle in attention.__dict__.pop(_HOOKS):
        handle.remove()
    for module in attention.modules():
        module.__dict__.pop(_CONTEXT, None)
    delattr(attention, GATE_MODULE_NAME)
    for name in GATE_ATTRIBUTES:
        del attention.__dict__[name]
