"""The gate itself: a projection (`AttentionGateLinear`) and the function that multiplies its activation onto
the attention output. Imports only torch and transformers so it can travel inside checkpoints as remote code."""

from __future__ import annotations

import torch
from torch import nn
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
        scores = scores * config.output_scale
    return scores


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
        gate: the gate projection, called as a module so PEFT adapters on it take effect.
    """
    source = hidden_states if config.gate_input == "hidden_states" else attn_output
    scores = gate_scores(gate(source), config)
    if config.granularity == "elementwise":
        return attn_output * scores
    shape = attn_output.shape
    per_head = attn_output.view(*shape[:-1], num_heads, shape[-1] // num_heads)
    return (per_head * scores.unsqueeze(-1)).view(shape)
