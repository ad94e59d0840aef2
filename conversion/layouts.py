"""Gate layouts of other implementations, and exact conversion between them and the plugin's layout.

* ``plugin``: a separate gate projection per attention layer, ``self_attn.attn_gate.weight`` ``[P, hidden]`` (and
  ``.bias``), ``P = heads * head_dim`` (elementwise) or ``heads`` (headwise); row ``h * head_dim + j`` (or ``h``)
  gates head ``h``, dimension ``j``.
* ``paper`` (the authors' released Qwen3-based code; config flags ``elementwise_attn_output_gate`` /
  ``headwise_attn_output_gate``): ``q_proj`` also produces the gate, grouped per KV head. Its output viewed as
  ``[kv_heads, G*head_dim + P/kv_heads]`` (G = heads per KV head) is, per KV group, the queries of the group's G heads
  followed by their gates (``G*head_dim`` elementwise, ``G`` headwise).
* ``qwen3-next`` (Qwen3-Next / Qwen3.5 attention): ``q_proj`` is twice as wide; per head, ``head_dim`` query rows
  then ``head_dim`` gate rows. Elementwise only.

Both fused layouts compute ``attn_output * sigmoid(x @ W_gate.T)``: no offset, no scale, a bias only when ``q_proj``
has one. That is a plugin gate with ``init="paper"``, ``activation="sigmoid"``, ``gate_input="hidden_states"``; an
identity-init plugin gate (``2 * sigmoid(...)``) or a SiLU gate has no exact fused equivalent and is refused.
The conversions are pure row permutations, so every round trip is bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from gated_patch.core.config import GateConfig
from gated_patch.core.errors import GatedCheckpointError
from gated_patch.core.gate import gate_shape
from gated_patch.guards import value_head_size

PLUGIN = "plugin"
PAPER = "paper"
QWEN3_NEXT = "qwen3-next"
FUSED_LAYOUTS = (PAPER, QWEN3_NEXT)
LAYOUTS = (PLUGIN, *FUSED_LAYOUTS)
PAPER_FLAGS = {"elementwise": "elementwise_attn_output_gate", "headwise": "headwise_attn_output_gate"}


@dataclass(frozen=True)
class AttentionShape:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config) -> "AttentionShape":
        """From a transformers config object (its text config)."""
        text = config.get_text_config()
        heads = text.num_attention_heads
        return cls(hidden_size=text.hidden_size, num_heads=heads,
                   num_kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=value_head_size(text))

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def gate_rows(self, granularity: str) -> int:
        return gate_shape(GateConfig(granularity=granularity), self.hidden_size, self.num_heads, self.head_dim)[0]

    def fused_rows(self, granularity: str) -> int:
        return self.num_heads * self.head_dim + self.gate_rows(granularity)


def paper_granularity(config: dict) -> Optional[str]:
    """The gate granularity flagged in a paper-format config, or None when the config has no gate flag set."""
    flagged = [granularity for granularity, flag in PAPER_FLAGS.items() if config.get(flag)]
    if len(flagged) > 1:
        raise GatedCheckpointError(
            "config.json sets both elementwise_attn_output_gate and headwise_attn_output_gate; the authors' code uses "
            "one of them. Set exactly one to true."
        )
    return flagged[0] if flagged else None


def check_layout_granularity(layout: str, granularity: str) -> None:
    if layout not in LAYOUTS:
        raise GatedCheckpointError(f"Unknown gate layout {layout!r}; choose one of {list(LAYOUTS)}.")
    if layout == QWEN3_NEXT and granularity != "elementwise":
        raise GatedCheckpointError(
            "The qwen3-next layout has elementwise gates only; a headwise gate cannot be exported to it. "
            "Use --target-layout paper (which has a headwise form) instead."
        )


def imported_gate_config(granularity: str, has_bias: bool) -> GateConfig:
    """The plugin gate config that computes exactly what a fused layout computes."""
    return GateConfig(granularity=granularity, gate_input="hidden_states", init="paper", bias=has_bias,
                      layers=None, activation="sigmoid")


def check_exportable(gate: GateConfig, num_layers: int, layout: str) -> None:
    """Refuse gate configs a fused layout cannot express exactly (with the reason and the fix)."""
    check_layout_granularity(layout, gate.granularity)
    problems = []
    if gate.init != "paper" or gate.output_scale != 1.0 or gate.preactivation_offset != 0.0:
        problems.append(
            f"init={gate.init!r} computes {gate.output_scale:g} * {gate.activation}(xW + b + {gate.preactivation_offset:g}) "
            "(it starts as an exact identity), while fused layouts compute plain sigmoid(xW), which is always < 1: "
            "there is no exact fused equivalent"
        )
    if gate.activation != "sigmoid":
        problems.append(f"activation={gate.activation!r} (fused layouts use sigmoid)")
    if gate.gate_input != "hidden_states":
        problems.append(f"gate_input={gate.gate_input!r} (a fused gate is computed from q_proj's input)")
    if gate.layer_indices(num_layers) != tuple(range(num_layers)):
        problems.append(f"layers={list(gate.layers)} (fused layouts gate every layer)")
    if problems:
        raise GatedCheckpointError(
            f"Cannot export this gated model to the {layout} layout exactly: {'; '.join(problems)}. Only gates with "
            "init='paper', activation='sigmoid', gate_input='hidden_states' on all layers are exportable (e.g. train "
            "from a GateConfig(init='paper') model); keep the plugin layout otherwise."
        )


def split_fused(fused: torch.Tensor, layout: str, granularity: str, shape: AttentionShape):
    """``(query, gate)`` from a fused ``q_proj`` weight ``[rows, in]`` or bias ``[rows]`` (plugin row order)."""
    check_layout_granularity(layout, granularity)
    expected = shape.fused_rows(granularity)
    if fused.shape[0] != expected:
        raise GatedCheckpointError(
            f"fused q_proj has {fused.shape[0]} rows; the {layout} layout with {granularity} gates needs {expected} "
            f"(heads={shape.num_heads}, kv_heads={shape.num_kv_heads}, head_dim={shape.head_dim}). Check the layout "
            "and granularity options against the checkpoint."
        )
    rest = fused.shape[1:]
    d, heads = shape.head_dim, shape.num_heads
    if layout == QWEN3_NEXT:
        per_head = fused.reshape(heads, 2 * d, *rest)
        query, gate = per_head[:, :d], per_head[:, d:]
    else:
        per_group_gate = shape.group * d if granularity == "elementwise" else shape.group
        grouped = fused.reshape(shape.num_kv_heads, shape.group * d + per_group_gate, *rest)
        query, gate = grouped[:, : shape.group * d], grouped[:, shape.group * d :]
    return (
        query.reshape(heads * d, *rest).contiguous(),
        gate.reshape(shape.gate_rows(granularity), *rest).contiguous(),
    )


def fuse(query: torch.Tensor, gate: torch.Tensor, layout: str, granularity: str, shape: AttentionShape) -> torch.Tensor:
    """Inverse of `split_fused`."""
    check_layout_granularity(layout, granularity)
    rest = query.shape[1:]
    d, heads = shape.head_dim, shape.num_heads
    if layout == QWEN3_NEXT:
        fused = torch.cat([query.reshape(heads, d, *rest), gate.reshape(heads, d, *rest)], dim=1)
    else:
        fused = torch.cat(
            [query.reshape(shape.num_kv_heads, -1, *rest), gate.reshape(shape.num_kv_heads, -1, *rest)], dim=1
        )
    return fused.reshape(shape.fused_rows(granularity), *rest).contiguous()
