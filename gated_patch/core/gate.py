"""The gate itself: a projection (`AttentionGateLinear`) and the function that multiplies its activation onto
the attention output. Imports only torch and transformers so it can travel inside checkpoints as remote code."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _nn_module
from transformers import initialization as hf_init

from .config import GateConfig


class AttentionGateLinear(nn.Linear):
    """The gate projection ``W_g`` (and ``b_g``).

    A real `nn.Linear` so PEFT (LoRA, LNTuning, modules_to_save) can target it by name; the subclass exists so that
    weight initialisation (`reset_parameters`, transformers' `_init_weights`) applies the gate's own init instead of
    the generic ``normal(0, 0.02)`` that would turn an identity gate into a random ~0.5 gate.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        init: str,
        init_std: float,
        device=None,
        dtype=None,
    ) -> None:
        self.gate_init = None  # read by reset_parameters, which nn.Linear.__init__ calls before we can set it
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.gate_init = init
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as the gate config says. Uses transformers' init functions, which skip tensors already loaded."""
        if self.gate_init is None:
            return
        if self.gate_init == "identity":
            hf_init.zeros_(self.weight)
        else:
            hf_init.normal_(self.weight, mean=0.0, std=self.init_std)
        if self.bias is not None:
            hf_init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, init={self.gate_init}"


def gate_output_features(config: GateConfig, num_heads: int, head_dim: int) -> int:
    return num_heads * head_dim if config.granularity == "elementwise" else num_heads


def gate_input_features(config: GateConfig, hidden_size: int, num_heads: int, head_dim: int) -> int:
    return hidden_size if config.gate_input == "hidden_states" else num_heads * head_dim


def gate_scores(projection_output: torch.Tensor, config: GateConfig) -> torch.Tensor:
    """The gate scores ``activation(projection_output + offset) * scale`` from the gate projection's output (also
    used by `gated_patch.diagnostics`, which observes the projection output with a forward hook)."""
    scores = projection_output
    if config.preactivation_offset != 0.0:
        scores = scores + config.preactivation_offset
    scores = torch.sigmoid(scores) if config.activation == "sigmoid" else nn.functional.silu(scores)
    if config.output_scale != 1.0:
        scores = scores * _constant(config.output_scale, scores)
    return scores


_CONSTANTS: dict = {}


def _constant(value: float, like: torch.Tensor):
    """`value` as a 0-dim tensor of `like`'s dtype and device (cached), or the float itself where a cached tensor
    could go wrong: while compiling, for tensor subclasses (FakeTensor, DTensor, ...) and, on a cache miss, while a
    CUDA graph is being captured.

    Multiplying by a Python float goes through the wrapped-number path of the dispatcher (scalar to tensor, type
    promotion), which at decode time costs about as much as the rest of the gate (benchmarks/README.md, "Where the
    decode time goes"). The values are the same: the scale is applied in `like`'s dtype either way.
    """
    if type(like) is not torch.Tensor or torch.compiler.is_compiling():
        return value
    key = (value, like.dtype, like.device)
    constant = _CONSTANTS.get(key)
    if constant is None:
        if like.is_cuda and torch.cuda.is_current_stream_capturing():
            return value
        with torch.inference_mode(False):  # a normal tensor even when first made under inference_mode (training later)
            constant = _CONSTANTS[key] = torch.tensor(value, dtype=like.dtype, device=like.device)
    return constant


def _project(gate: nn.Module, source: torch.Tensor) -> torch.Tensor:
    """``gate(source)``, calling the gate's own `forward` directly when that is exactly what ``gate(source)`` would do:
    the module is one of ours with no hooks, no compiled call and no replaced forward (accelerate's offload hooks
    replace ``forward``; PEFT replaces the module). Otherwise the normal module call, so hooks and adapters apply."""
    if (
        type(gate) in _DIRECT_GATE_TYPES
        and not (gate._forward_pre_hooks or gate._forward_hooks or gate._backward_pre_hooks or gate._backward_hooks)
        and not _global_module_hooks()
        and gate.__dict__.get("_compiled_call_impl") is None
        and "forward" not in gate.__dict__
        and not torch._C._get_tracing_state()
    ):
        if type(gate) is AttentionGateLinear and source.numel() == gate.in_features and not _autocast(source):
            # One token (decode): a matrix-vector product, which dispatches to a lighter kernel than linear's addmm.
            # Returns shape [out] instead of [1, ..., 1, out]; the callers broadcast it the same way. Only with both
            # parameters in `_parameters` (FSDP and similar move them out) and outside autocast (CPU autocast casts
            # linear's inputs but not mv's).
            parameters = gate._parameters
            weight, bias = parameters.get("weight"), parameters.get("bias", gate)
            if weight is not None and bias is not gate:
                vector = source.reshape(-1)
                return torch.mv(weight, vector) if bias is None else torch.addmv(bias, weight, vector)
        return gate.forward(source)
    return gate(source)


def _autocast(source: torch.Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(source.device.type)
    except TypeError:  # torch < 2.4: no per-device query
        return True


#: Gate classes whose ``forward`` may be called directly by `_project` (`gated_patch.fused` adds its fused gate).
_DIRECT_GATE_TYPES = {AttentionGateLinear}

_GLOBAL_HOOK_NAMES = (
    "_global_forward_pre_hooks",
    "_global_forward_hooks",
    "_global_backward_pre_hooks",
    "_global_backward_hooks",
)
if all(isinstance(getattr(_nn_module, name, None), dict) for name in _GLOBAL_HOOK_NAMES):
    _GLOBAL_HOOKS = tuple(getattr(_nn_module, name) for name in _GLOBAL_HOOK_NAMES)

    def _global_module_hooks() -> bool:
        return any(_GLOBAL_HOOKS)

else:  # torch moved its global module hooks: always take the module call (correct, a little slower)

    def _global_module_hooks() -> bool:
        return True


def apply_attention_output_gate(
    attn_output: torch.Tensor,
    hidden_states: torch.Tensor,
    gate: nn.Module,
    config: GateConfig,
    num_heads: int,
) -> torch.Tensor:
    """``attn_output * activation(gate(source) + offset) * scale``.

    Args:
        attn_output: the flattened SDPA output ``[..., heads * head_dim]`` (the input of ``o_proj``).
        hidden_states: the normed input of the attention block ``[..., hidden]``.
        gate: the gate projection, called through `_project` (a module call whenever hooks or adapters are present).
    """
    source = hidden_states if config.gate_input == "hidden_states" else attn_output
    scores = gate_scores(_project(gate, source), config)
    if config.granularity == "elementwise":
        return attn_output * scores
    shape = attn_output.shape
    per_head = attn_output.view(*shape[:-1], num_heads, shape[-1] // num_heads)
    return (per_head * scores.unsqueeze(-1)).view(shape)
