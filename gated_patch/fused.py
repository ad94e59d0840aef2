"""Fused gate: compute the query and the gate pre-activations with ONE matrix multiplication.

A patched attention layer whose gate reads the block input (``gate_input="hidden_states"``) applies two
projections to the same tensor: ``q_proj(x)`` and ``attn_gate(x)``. `fuse_gates` concatenates the two weight
matrices row-wise into one ``[q_out + gate_out, hidden]`` matrix (and the biases, zero-filled where a projection
has none), so that one GEMM produces both. Layout: query rows first, gate rows after them (not the per-head
interleaving of Qwen3-Next; the split is a free view either way).

How it plugs into the shared mechanism (`gated_patch.core.attention`): nothing in the attention forward or in the
``o_proj`` pre-hook changes. The query projection's class becomes `FusedQueryLinear` (still an ``nn.Linear``):
its forward runs the wide GEMM, returns the query columns (a view) and hands the gate columns to the gate module,
keyed by the identity of the input tensor. The gate's class becomes `FusedAttentionGateLinear` (still an
`AttentionGateLinear`): when it is called with that same tensor, it returns the handed-over pre-activations instead
of running its own GEMM; otherwise it computes them itself. The gate activation, scale and multiplication stay in
`apply_attention_output_gate`.

Parameters and checkpoints: ``q_proj.weight``/``q_proj.bias`` and ``attn_gate.weight``/``attn_gate.bias`` stay the
same `nn.Parameter` objects with the same names, shapes and values; only their storage moves into the fused matrix
(they become disjoint views of it). ``state_dict()``, ``save_pretrained`` and ``load_state_dict`` therefore see
exactly the unfused model, and in-place updates of the parameters (``load_state_dict``, ``copy_``, optimizer steps)
are seen by the fused GEMM. If the parameters stop being views of the fused matrix (``model.to(dtype)``,
``load_state_dict(..., assign=True)``, ``param.data = ...``), the next forward re-fuses from the parameters, which
are the source of truth.

Training: the fused GEMM is only used when no gradient is needed for the fused parameters (inference, or
adapters such as LoRA training other parameters). When autograd needs gradients for ``q_proj`` or the gate, both
layers compute separately, exactly as unfused. `unfuse_gates` gives every parameter its own storage again and
restores the classes; values are bitwise unchanged.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from .core.attention import GATE_MODULE_NAME, GatedAttentionMixin
from .core.errors import GatedPatchError, NotPatchedError
from .core.gate import _DIRECT_GATE_TYPES, AttentionGateLinear
from .registry import get_model_family

__all__ = ["FusedAttentionGateLinear", "FusedQueryLinear", "fuse_gates", "is_fused", "unfuse_gates"]

# Attributes kept in the modules' __dict__ (plain attributes: not parameters, buffers or submodules, so they never
# appear in state_dict() or named_modules(), and model.to(...) does not touch them).
_GATE_REF = "_gated_patch_fused_gate"  # on the query projection: its attention layer's gate module
_FUSED_WEIGHT = "_gated_patch_fused_weight"  # on the query projection: [q_out + gate_out, in]
_FUSED_BIAS = "_gated_patch_fused_bias"  # on the query projection: [q_out + gate_out] or None
_POINTERS = "_gated_patch_fused_pointers"  # on the query projection: data pointers of the four parameter views
_HANDOVER = "_gated_patch_fused_scores"  # on the gate: (input tensor, gate pre-activations) or None


class FusedGateError(GatedPatchError, ValueError):
    """The model (or its gate config) cannot be fused or unfused as asked."""


class FusedQueryLinear(nn.Linear):
    """The query projection of a fused layer: one GEMM for ``[query | gate]``, returns the query part."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        attributes = self.__dict__
        gate = attributes[_GATE_REF]
        if torch.is_grad_enabled() and _needs_grad(self, gate):
            return super().forward(input)  # training: both projections run separately, gradients as unfused
        if not torch.compiler.is_compiling() and not _fused_storage_intact(self, gate):
            _fuse_storage(self, gate)
        both = F.linear(input, attributes[_FUSED_WEIGHT], attributes[_FUSED_BIAS])
        query, scores = torch.split_with_sizes(both, (self.out_features, gate.out_features), -1)
        gate.__dict__[_HANDOVER] = (input, scores)
        return query

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fused_with_gate_out_features={self.__dict__[_GATE_REF].out_features}"


class FusedAttentionGateLinear(AttentionGateLinear):
    """The gate of a fused layer: returns the pre-activations the query projection computed for this input."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        handover = self.__dict__.get(_HANDOVER)
        if handover is not None:
            self.__dict__[_HANDOVER] = None  # used once; do not keep the activations alive
            if handover[0] is input:
                return handover[1]
        return super().forward(input)


_DIRECT_GATE_TYPES.add(FusedAttentionGateLinear)  # its forward may be called directly (no hooks): see core.gate._project


def _needs_grad(query: nn.Linear, gate: nn.Linear) -> bool:
    return any(p is not None and p.requires_grad for p in (query.weight, query.bias, gate.weight, gate.bias))


def _pointers(query: nn.Linear, gate: nn.Linear) -> tuple:
    return tuple(p.data_ptr() if p is not None else None for p in (query.weight, gate.weight, query.bias, gate.bias))


def _fused_storage_intact(query: nn.Linear, gate: nn.Linear) -> bool:
    """Whether the parameters are still the views `_fuse_storage` made. The fused tensors keep their storage alive, so no
    other tensor can take those addresses: equal pointers mean the same views (and the same dtype and device)."""
    return _pointers(query, gate) == query.__dict__[_POINTERS]


@torch.no_grad()
def _fuse_storage(query: nn.Linear, gate: nn.Linear) -> None:
    """(Re)build the fused matrix from the current parameters and make the parameters views of it."""
    weight = torch.cat((query.weight, gate.weight), dim=0)
    query.weight.data = weight[: query.out_features]
    gate.weight.data = weight[query.out_features :]
    bias = None
    if query.bias is not None or gate.bias is not None:
        parts = [
            linear.bias if linear.bias is not None else weight.new_zeros(linear.out_features) for linear in (query, gate)
        ]
        bias = torch.cat(parts)
        if query.bias is not None:
            query.bias.data = bias[: query.out_features]
        if gate.bias is not None:
            gate.bias.data = bias[query.out_features :]
    query.__dict__[_FUSED_WEIGHT] = weight
    query.__dict__[_FUSED_BIAS] = bias
    query.__dict__[_POINTERS] = _pointers(query, gate)


def _gated_attentions(model: nn.Module) -> Iterator[nn.Module]:
    for module in model.modules():
        if isinstance(module, GatedAttentionMixin):
            yield module


def is_fused(model: nn.Module) -> bool:
    """Whether `fuse_gates` is in effect on `model` (on any of its layers)."""
    return any(isinstance(module, FusedQueryLinear) for module in model.modules())


def fuse_gates(model: nn.Module) -> nn.Module:
    """Compute each gated layer's query and gate pre-activations with one GEMM (in place; returns `model`).

    Outputs match the unfused model up to float rounding of the wider GEMM (float32: max |diff| ~1e-6), the
    parameters and ``state_dict()`` are unchanged, and training still gets exact gradients (see the module
    docstring). Fusing a fused model is a no-op. Undo with `unfuse_gates` (`unpatch_model` does it for you).

    Raises:
        NotPatchedError: the model has no gates (call `gated_patch.patch_model` first).
        FusedGateError: the gates read the attention output (``gate_input="attn_output"``), which only exists after
            the query projection, so there is nothing to fuse; or the projections are wrapped (e.g. by PEFT) or do
            not have the shapes fusion needs.
    """
    attentions = list(_gated_attentions(model))
    if not attentions:
        raise NotPatchedError(
            f"{type(model).__name__} has no attention output gates to fuse; call gated_patch.patch_model(model) first."
        )
    query_name = get_model_family(model.config.model_type).query_projection
    plan = []
    for attention in attentions:
        config = attention.gate_config
        if config.gate_input != "hidden_states":
            raise FusedGateError(
                f"Cannot fuse gates with gate_input={config.gate_input!r}: the gate reads the attention output, which "
                "does not exist until after the query projection, so the two cannot share one GEMM. Fusion only "
                "applies to gate_input='hidden_states' (the paper's gate); run this model unfused."
            )
        query = attention._modules.get(query_name)
        gate = attention._modules.get(GATE_MODULE_NAME)
        if isinstance(query, FusedQueryLinear):
            continue
        if type(query) is not nn.Linear or type(gate) is not AttentionGateLinear:
            raise FusedGateError(
                f"Cannot fuse {type(attention).__name__}: expected a plain nn.Linear `{query_name}` and an "
                f"AttentionGateLinear `{GATE_MODULE_NAME}`, found {type(query).__name__} and {type(gate).__name__}. "
                "Fuse before wrapping the model with adapters (PEFT), or merge/unload the adapters first."
            )
        if query.in_features != gate.in_features or query.weight.dtype != gate.weight.dtype or (
            query.weight.device != gate.weight.device
        ):
            raise FusedGateError(
                f"Cannot fuse {type(attention).__name__}: `{query_name}` ({query.in_features} inputs, "
                f"{query.weight.dtype}, {query.weight.device}) and `{GATE_MODULE_NAME}` ({gate.in_features} inputs, "
                f"{gate.weight.dtype}, {gate.weight.device}) must share input size, dtype and device. Move the model to "
                "one dtype/device first."
            )
        plan.append((query, gate))
    for query, gate in plan:
        _fuse_storage(query, gate)
        query.__dict__[_GATE_REF] = gate
        gate.__dict__[_HANDOVER] = None
        query.__class__ = FusedQueryLinear
        gate.__class__ = FusedAttentionGateLinear
    return model


@torch.no_grad()
def unfuse_gates(model: nn.Module) -> nn.Module:
    """Undo `fuse_gates`: every parameter gets its own storage back (values bitwise unchanged) and the query
    projections and gates are plain ``nn.Linear`` / `AttentionGateLinear` again. Raises `FusedGateError` if the model
    is not fused."""
    queries = [module for module in model.modules() if isinstance(module, FusedQueryLinear)]
    if not queries:
        raise FusedGateError(f"{type(model).__name__} is not fused; nothing to unfuse (see gated_patch.is_fused).")
    for query in queries:
        gate = query.__dict__.pop(_GATE_REF)
        for linear in (query, gate):
            for parameter in (linear.weight, linear.bias):
                if parameter is not None:
                    parameter.data = parameter.data.clone()
        query.__dict__.pop(_FUSED_WEIGHT, None)
        query.__dict__.pop(_FUSED_BIAS, None)
        query.__dict__.pop(_POINTERS, None)
        gate.__dict__.pop(_HANDOVER, None)
        query.__class__ = nn.Linear
        gate.__class__ = AttentionGateLinear
    return model


def fused_layer_count(model: nn.Module) -> int:
    """How many attention layers of `model` are fused."""
    return sum(isinstance(module, FusedQueryLinear) for module in model.modules())

