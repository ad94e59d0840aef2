"""`GateConfig`: what kind of attention output gate to insert, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from .errors import GateConfigError

GRANULARITIES = ("elementwise", "headwise")
GATE_INPUTS = ("hidden_states", "attn_output")
INITS = ("identity", "paper")
ACTIVATIONS = ("sigmoid", "silu")

# Pre-activation offset used by the identity init of each activation. sigmoid(0) = 0.5 is exact in every float
# format, so the sigmoid identity gate is exactly 1; silu(0) = 0 cannot be normalised, so silu starts at 1.
_IDENTITY_OFFSET = {"sigmoid": 0.0, "silu": 1.0}


def _activation_value(activation: str, z: float) -> float:
    sigmoid = 1.0 / (1.0 + math.exp(-z))
    return sigmoid if activation == "sigmoid" else z * sigmoid


@dataclass(frozen=True)
class GateConfig:
    """Configuration of the gated-attention output gate (Qiu et al., 2025, variant G1).

    The gate computes ``g = activation(S @ W.T + b + offset) * scale`` and the attention block returns
    ``o_proj(Y * g)``, where ``Y`` is the scaled-dot-product-attention output and ``S`` is the gate's input.

    Args:
        granularity: ``"elementwise"`` (one gate per head dimension, ``W: hidden -> heads*head_dim``) or
            ``"headwise"`` (one scalar per head, ``W: hidden -> heads``).
        gate_input: ``"hidden_states"`` (the normed input of the attention block, as in the paper) or
            ``"attn_output"`` (the gate is computed from ``Y`` itself).
        init: ``"identity"`` (retrofit: ``W = 0, b = 0, scale = 1/activation(offset)`` so the gate is exactly 1 at
            init, ``W`` still receives gradients and the gate can move anywhere in ``[0, scale)``) or ``"paper"``
            (training from scratch: ``W ~ N(0, initializer_range)``, ``b = 0``, ``offset = 0``, ``scale = 1``).
        bias: whether the gate projection has a bias.
        layers: ``None`` for every decoder layer, or the indices of the layers to gate.
        activation: ``"sigmoid"`` (the paper's choice) or ``"silu"`` (the paper's ablation).
    """

    granularity: str = "elementwise"
    gate_input: str = "hidden_states"
    init: str = "identity"
    bias: bool = True
    layers: Optional[Sequence[int]] = None
    activation: str = "sigmoid"

    # Derived constants; not constructor arguments, not serialised.
    preactivation_offset: float = field(init=False, repr=False, compare=False)
    output_scale: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _check_choice("gate_input", self.gate_input, GATE_INPUTS)
        _check_choice("init", self.init, INITS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        if not isinstance(self.bias, bool):
            raise GateConfigError(f"GateConfig.bias must be a bool, got {self.bias!r}.")
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, Sequence):
                raise GateConfigError(
                    f"GateConfig.layers must be None (all layers) or a list of layer indices, got {self.layers!r}."
                )
            layers = tuple(self.layers)
            bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or i < 0]
            if bad:
                raise GateConfigError(
                    f"GateConfig.layers must hold non-negative integer layer indices; invalid: {bad!r}."
                )
            if len(set(layers)) != len(layers):
                raise GateConfigError(f"GateConfig.layers has duplicate indices: {list(layers)!r}.")
            object.__setattr__(self, "layers", tuple(sorted(layers)))
        if self.init == "identity":
            offset = _IDENTITY_OFFSET[self.activation]
            scale = 1.0 / _activation_value(self.activation, offset)
        else:
            offset, scale = 0.0, 1.0
        object.__setattr__(self, "preactivation_offset", offset)
        object.__setattr__(self, "output_scale", scale)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the constructor arguments."""
        return {
            f.name: (list(getattr(self, f.name)) if f.name == "layers" and self.layers is not None else getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.init
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GateConfig":
        """Inverse of `to_dict`; unknown keys are an error, never silently ignored."""
        if not isinstance(data, dict):
            raise GateConfigError(f"A gate config must be a dict, got {type(data).__name__}: {data!r}.")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise GateConfigError(
                f"Unknown gate config keys {unknown}; valid keys are {sorted(known)}. "
                "Was this written by a newer gated_patch? Upgrade gated_patch or remove the keys."
            )
        return cls(**data)

    def layer_indices(self, num_layers: int) -> tuple[int, ...]:
        """The gated layer indices for a model with `num_layers` decoder layers (validated against it)."""
        if self.layers is None:
            return tuple(range(num_layers))
        out_of_range = [i for i in self.layers if i >= num_layers]
        if out_of_range:
            raise GateConfigError(
                f"GateConfig.layers {out_of_range} out of range: the model has {num_layers} decoder layers "
                f"(valid indices 0..{num_layers - 1}). Pass layers=None to gate every layer."
            )
        return tuple(self.layers)


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise GateConfigError(f"GateConfig.{name}={value!r} is invalid; choose one of {list(choices)}.")
