"""The one shared mechanism that puts a gate in front of an attention module's output projection.

Upstream attention forwards (Llama, Qwen2, Mistral, Qwen3, ...) end with ``self.o_proj(attn_output)``. Patching
swaps the attention instance's class for a subclass of its own class (so ``isinstance`` checks such as
``output_attentions`` recording keep working) whose ``forward`` records the block input for the duration of the
call; a forward pre-hook on the module in the output-projection slot multiplies the gate onto its input. The hook
follows whatever module sits in the slot (PEFT may wrap ``o_proj`` in a LoRA layer), so adapters on the output
projection see the gated input, exactly as in ``o_proj(Y * g)``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .config import GateConfig
from .gate import AttentionGateLinear, apply_attention_output_gate, gate_input_features, gate_output_features

GATE_MODULE_NAME = "attn_gate"
_CONTEXT_ATTR = "_gated_patch_context"
_HOOK_ATTR = "_gated_patch_hook"

_GATED_CLASS_CACHE: dict[tuple[type, type], type] = {}


def _gate_output_projection_input(projection: nn.Module, args: tuple) -> tuple | None:
    context = projection.__dict__.get(_CONTEXT_ATTR)
    if context is None:  # called outside a gated attention forward (or a wrapped inner layer): pass through
        return None
    attention, hidden_states = context
    return (attention.gate_attention_output(args[0], hidden_states), *args[1:])


def install_output_projection_hook(projection: nn.Module) -> None:
    if not projection.__dict__.get(_HOOK_ATTR, False):
        projection.__dict__[_CONTEXT_ATTR] = None
        projection.register_forward_pre_hook(_gate_output_projection_input)
        projection.__dict__[_HOOK_ATTR] = True


def remove_output_projection_hook(projection: nn.Module) -> None:
    for key, hook in list(projection._forward_pre_hooks.items()):
        if hook is _gate_output_projection_input:
            del projection._forward_pre_hooks[key]
    projection.__dict__.pop(_HOOK_ATTR, None)
    projection.__dict__.pop(_CONTEXT_ATTR, None)


class GatedAttentionMixin:
    """Mixed in front of an upstream attention class; see the module docstring."""

    gate_config: GateConfig
    gate_num_heads: int
    output_projection_name: str = "o_proj"

    def forward(self, hidden_states, *args: Any, **kwargs: Any):
        projection = self._modules[self.output_projection_name]
        if not projection.__dict__.get(_HOOK_ATTR, False):  # the slot was re-filled (PEFT wrap / unload) since patching
            install_output_projection_hook(projection)
        projection.__dict__[_CONTEXT_ATTR] = (self, hidden_states)
        try:
            return super().forward(hidden_states, *args, **kwargs)
        finally:
            projection.__dict__[_CONTEXT_ATTR] = None

    def gate_attention_output(self, attn_output, hidden_states):
        return apply_attention_output_gate(
            attn_output, hidden_states, self._modules[GATE_MODULE_NAME], self.gate_config, self.gate_num_heads
        )


def attach_gate(
    attention: nn.Module,
    config: GateConfig,
    *,
    hidden_size: int,
    init_std: float,
    output_projection: str = "o_proj",
    device=None,
) -> None:
    """Turn one upstream attention module into a gated one: class swap, `attn_gate` child, o_proj pre-hook.

    The gate is created with the output projection's dtype, on `device` (default: the projection weight's device).
    """
    projection = attention._modules[output_projection]
    num_heads = projection.in_features // attention.head_dim
    gate = AttentionGateLinear(
        gate_input_features(config, hidden_size, num_heads, attention.head_dim),
        gate_output_features(config, num_heads, attention.head_dim),
        bias=config.bias,
        init=config.init,
        init_std=init_std,
        device=projection.weight.device if device is None else device,
        dtype=projection.weight.dtype,
    )
    gate.train(attention.training)  # a gate added to a model in eval mode is in eval mode too
    attention.__class__ = gated_attention_class(type(attention))
    attention.gate_config = config
    attention.gate_num_heads = num_heads
    attention.output_projection_name = output_projection
    attention.add_module(GATE_MODULE_NAME, gate)
    install_output_projection_hook(projection)


def detach_gate(attention: nn.Module) -> None:
    """Inverse of `attach_gate`: the module is exactly the upstream attention module again."""
    remove_output_projection_hook(attention._modules[attention.output_projection_name])
    del attention._modules[GATE_MODULE_NAME]
    for attribute in ("gate_config", "gate_num_heads", "output_projection_name"):
        attention.__dict__.pop(attribute, None)
    attention.__class__ = original_class(type(attention))


class GatedPreTrainedMixin:
    """Mixed in front of a patched model's `PreTrainedModel` classes (the outer model and the inner base model,
    since transformers dispatches `_init_weights` per sub-model) so that weight initialisation gives the gate its
    own init instead of the generic ``normal(0, 0.02)``."""

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, AttentionGateLinear):
            module.reset_parameters()
            return
        super()._init_weights(module)

    #: Installed by `gated_patch.checkpoints` (outside core, so core stays torch + transformers only): a function
    #: ``saver(model, plain_save, save_directory, *args, **kwargs)`` that writes the gated checkpoint format
    #: (``gated_<family>`` model_type, gate config, remote code). ``None``: transformers' plain save.
    checkpoint_saver = None

    def save_pretrained(self, save_directory, *args: Any, **kwargs: Any):
        saver = GatedPreTrainedMixin.checkpoint_saver
        if saver is None:
            return super().save_pretrained(save_directory, *args, **kwargs)
        return saver(self, super().save_pretrained, save_directory, *args, **kwargs)


def gated_subclass(base: type, mixin: type, what: str) -> type:
    """``Gated<Base>``: `mixin` in front of `base`. Cached per (base, mixin) and importable from this module by name,
    so ``isinstance``, pickling and ``copy.deepcopy`` of patched models all work."""
    if issubclass(base, mixin):
        return base
    cls = _GATED_CLASS_CACHE.get((base, mixin))
    if cls is None:
        cls = type(
            f"Gated{base.__name__}",
            (mixin, base),
            {"__module__": __name__, "__doc__": f"{base.__name__} with {what}."},
        )
        _GATED_CLASS_CACHE[(base, mixin)] = cls
        globals()[cls.__name__] = cls
    return cls


def gated_attention_class(attention_class: type) -> type:
    return gated_subclass(attention_class, GatedAttentionMixin, "an attention output gate")


def gated_pretrained_class(model_class: type) -> type:
    return gated_subclass(model_class, GatedPreTrainedMixin, "attention output gates")


def original_class(gated_class: type) -> type:
    """The upstream class behind a gated attention or model class."""
    for base in gated_class.__mro__[1:]:
        if not issubclass(base, (GatedAttentionMixin, GatedPreTrainedMixin)):
            return base
    raise TypeError(f"{gated_class} has no ungated base class")
