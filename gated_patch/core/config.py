"""`GateConfig`: which attention output gate to insert, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

from .errors import GateConfigError

CHOICES = {"granularity": ("elementwise", "headwise"), "gate_input": ("hidden_states", "attn_output"),
           "init": ("identity", "paper"), "activation": ("sigmoid", "silu")}


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """The gate of Qiu et al. 2025 (variant G1): ``o_proj(Y * activation(S @ W.T + b + offset) * scale)``.

    Y is the attention output, S the gate input. ``granularity``: one gate per head dimension (``"elementwise"``,
    ``W: hidden -> heads*head_dim``) or per head (``"headwise"``, ``W: hidden -> heads``). ``gate_input``: the normed
    block input (``"hidden_states"``, the paper's) or Y itself (``"attn_output"``). ``init``: ``"identity"`` (W = 0,
    b = 0 and a scale that makes the gate exactly 1, for retrofits) or ``"paper"`` (W ~ N(0, initializer_range),
    b = 0, no offset or scale, for training from scratch). ``layers``: None for every decoder layer, or the indices
    to gate. ``activation``: ``"sigmoid"`` (the paper's) or ``"silu"`` (its ablation).
    """

    granularity: str = "elementwise"
    gate_input: str = "hidden_states"
    init: str = "identity"
    bias: bool = True
    layers: Optional[Sequence[int]] = None
    activation: str = "sigmoid"

    def __post_init__(self) -> None:
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise GateConfigError(f"GateConfig.{name}={getattr(self, name)!r} is invalid; choose one of {list(choices)}.")
        if not isinstance(self.bias, bool):
            raise GateConfigError(f"GateConfig.bias must be a bool, got {self.bias!r}.")
        if (layers := self.layers) is not None and (isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not
                layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers) or len(set(layers)) < len(layers)):
            raise GateConfigError(f"GateConfig.layers must be None (every layer) or a non-empty list of layer indices >= 0, "
                                  f"no duplicates; got {layers!r}.")
        # Derived (not fields): offset 1 for identity SiLU (silu(0) = 0), scale 1 / activation(offset) for identity.
        z = 1.0 if self.init == "identity" and self.activation == "silu" else 0.0
        at_offset = (z if self.activation == "silu" else 1.0) / (1.0 + math.exp(-z))  # sigmoid(z) or silu(z)
        self.__dict__.update(layers=None if layers is None else tuple(sorted(layers)), preactivation_offset=z,
                             output_scale=1.0 / at_offset if self.init == "identity" else 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "layers": None if self.layers is None else list(self.layers)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GateConfig":
        """Inverse of `to_dict`; unknown keys are an error, never silently ignored."""
        if not isinstance(data, dict):
            raise GateConfigError(f"A gate config must be a dict, got {type(data).__name__}: {data!r}.")
        if unknown := sorted(set(data) - {field.name for field in dataclasses.fields(cls)}):
            raise GateConfigError(f"Unknown gate config keys {unknown}; valid keys are {list(cls().to_dict())}. Written by "
                                  "a newer gated_patch? Upgrade gated_patch or remove the keys.")
        return cls(**data)

    def layer_indices(self, num_layers: int, attention_layers: Optional[Sequence[int]] = None) -> tuple[int, ...]:
        """The gated decoder-layer indices of a model (of a hybrid: among those with softmax attention, validated)."""
        valid = range(num_layers) if attention_layers is None else tuple(attention_layers)
        if self.layers is not None and any(i not in valid for i in self.layers):
            raise GateConfigError(f"GateConfig.layers {list(self.layers)} out of range: the model has {num_layers} decoder layers, "
                                  f"with attention in {list(valid)}. Pass layers=None to gate every layer with attention.")
        return tuple(valid) if self.layers is None else tuple(self.layers)
