"""The gate: its name, its projection, its shape, and where it multiplies the attention output (`apply_gate`)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as hf_init

from .config import GateConfig

GATE_MODULE_NAME = "attn_gate"  # the gate's child name in an attention module; its tensors are <attention>.attn_gate.*


def is_gate_name(name: str) -> bool:
    """Whether a parameter, tensor or module name (dotted, with any PEFT wrapping) names a gate or something in one."""
    return f".{GATE_MODULE_NAME}." in f".{name}."


class AttentionGateLinear(nn.Linear):
    """The gate projection W_g (and b_g): an `nn.Linear` PEFT can target, initialised as its gate config says.

    `reset_parameters` (also what transformers' weight init calls, see `GatedPreTrainedMixin`) gives zero weights
    (identity init) or normal(0, init_std) weights (paper init), and a zero bias; transformers' init functions leave
    tensors that were loaded from a checkpoint alone.
    """

    def __init__(self, in_features, out_features, *, bias: bool, init: str, init_std: float, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.gate_init, self.init_std = init, init_std
        self.reset_parameters()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``F.linear``, or a matrix-vector product while torch.compile traces one token (decode).

        Compiled, inductor fuses that product with the activation, where linear's BLAS call costs SmolLM2's compiled
        decode 3-4% more (docs/performance.md, the ablation); eager, linear costs less than mv and its reshapes. CPU
        autocast casts the inputs of linear but not of mv, so under autocast it is linear.
        """
        if not torch.compiler.is_compiling() or input.numel() != self.in_features or torch.is_autocast_enabled(
                input.device.type):
            return super().forward(input)
        vector = input.reshape(-1)
        out = torch.mv(self.weight, vector) if self.bias is None else torch.addmv(self.bias, self.weight, vector)
        return out.reshape(*input.shape[:-1], -1)  # -1: a tensor-parallel rank holds some of the out_features

    def reset_parameters(self) -> None:
        init = getattr(self, "gate_init", None)  # None while nn.Linear.__init__ runs: the gate's init comes after it
        if init is not None:
            hf_init.zeros_(self.weight) if init == "identity" else hf_init.normal_(self.weight, mean=0.0, std=self.init_std)
            hf_init.zeros_(self.bias) if self.bias is not None else None


def gate_shape(config: GateConfig, hidden_size: int, num_heads: int, head_dim: int) -> tuple[int, int]:
    """``(out_features, in_features)`` of the gate projection."""
    out_features = num_heads * head_dim if config.granularity == "elementwise" else num_heads
    return out_features, hidden_size if config.gate_input == "hidden_states" else num_heads * head_dim


def gate_scores(projection_output: torch.Tensor, config: GateConfig) -> torch.Tensor:
    """``activation(projection_output + offset) * scale``, the constants as Python floats."""
    z = projection_output + config.preactivation_offset if config.preactivation_offset else projection_output
    scores = torch.sigmoid(z) if config.activation == "sigmoid" else nn.functional.silu(z)
    return scores * config.output_scale if config.output_scale != 1.0 else scores


def apply_gate(attn_output: torch.Tensor, hidden_states: torch.Tensor, gate, config: GateConfig, num_heads: int):
    """``Y * g``: the gate multiplied onto the attention output (the flattened ``[..., heads * head_dim]`` input of o_proj)."""
    scores = gate_scores(gate(hidden_states if config.gate_input == "hidden_states" else attn_output), config)
    if config.granularity == "elementwise":
        return attn_output * scores
    return (attn_output.unflatten(-1, (num_heads, -1)) * scores.unsqueeze(-1)).flatten(-2)
