"""Tensor parallelism: every gate is split across ranks by heads, exactly as its output projection's input is."""

from __future__ import annotations

from torch import nn

from .config import GateConfig
from .errors import GatedCheckpointError
from .gate import GATE_MODULE_NAME


def add_gate_tp_plan(model: nn.Module, gate: GateConfig, modules: dict[str, str]) -> None:
    """Give the gates a ``colwise`` entry in ``model.tp_plan`` where it splits the output projection by heads.

    ``colwise`` is the query heads' style, and the plan splits the heads where it has the output projection
    ``rowwise``. A gate computed from the attention output gets none; `check_gate_sharding` refuses it then.
    """
    plan, attention = model.tp_plan or {}, f"{modules['decoder_layers']}.*.{modules['attention']}"
    if plan.get(f"{attention}.{modules['output_projection']}") == "rowwise" and gate.gate_input == "hidden_states":
        model.tp_plan = {**plan, f"{attention}.{GATE_MODULE_NAME}": "colwise"}


def remove_gate_tp_plan(model: nn.Module) -> None:
    """Inverse of `add_gate_tp_plan`."""
    if any(key.endswith(f".{GATE_MODULE_NAME}") for key in model.tp_plan or {}):
        model.tp_plan = {key: style for key, style in model.tp_plan.items() if not key.endswith(f".{GATE_MODULE_NAME}")}


def check_gate_sharding(model: nn.Module) -> None:
    """Refuse a model whose gates are not split across tensor-parallel ranks as their heads are.

    Compared by DTensor placements, and by shape where transformers keeps only this rank's part of each (float) weight.
    """
    for name, attention in model.named_modules():
        if isinstance(attention.__dict__.get("gate_config"), GateConfig):  # a gated attention module
            projection, gate = getattr(attention, attention.gate_projection_name), getattr(attention, GATE_MODULE_NAME).weight
            weight, per_row = projection.weight, 1 if attention.gate_config.granularity == "elementwise" else attention.gate_head_dim
            rows = weight.shape[-1 if isinstance(projection, nn.Linear) else 0] // per_row  # this rank's input (Conv1D: [in, out])
            heads_split, gate_split = getattr(weight, "placements", ()), getattr(gate, "placements", ())
            if (weight.is_floating_point() and gate.shape[0] != rows) or len(gate_split) != len(heads_split) or not all(
                    g.is_shard(0) if h.is_shard(1) else g == h for h, g in zip(heads_split, gate_split)):
                raise GatedCheckpointError(f"{name}: gate not split across ranks as its heads are. Tensor parallelism splits "
                                           "gate_input='hidden_states' gates if tp_plan has o_proj 'rowwise'; load without tp_plan")
