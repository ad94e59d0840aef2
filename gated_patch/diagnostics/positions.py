"""F-Attn and gate scores split by query position: which queries sink, and where the gate closes.

`inspect_model` averages over every query. On a task where only some queries need attention (the triggers of
Bigram-Backcopy, say), the sink lives at the others; this module reports each group of queries separately::

    stats = query_group_stats(model, batch.input_ids, {"trigger": batch.trigger_mask, "other": ~batch.trigger_mask})
    stats["other"].first_token_share   # per layer
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import nn

from ..core.gate import GATE_MODULE_NAME, gate_scores
from ..core.hooks import is_gated_attention
from ..patching import base_model_of
from .probes import HookSet, attention_layers, attention_weights, eager_attention, eval_mode


@dataclass(frozen=True)
class QueryGroupStats:
    """Metrics over one group's queries at positions >= 1 (query 0 can only attend to itself)."""

    num_queries: int
    first_token_share: list[float]  # per layer: attention on position 0, averaged over heads and the group's queries
    gate_mean: Optional[list[Optional[float]]]  # per layer: mean gate score there (None: layer ungated; all: model)


class _PositionProbes(HookSet):
    """Per layer, per query: attention on position 0 (mean over heads) and the gate score (mean over its entries)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.first_token: dict[int, torch.Tensor] = {}  # layer -> [batch, queries]
        self.gate: dict[int, torch.Tensor] = {}  # layer -> [batch, queries]

    def install(self) -> None:
        for index, _, attention in attention_layers(self.model):
            self._handles.append(attention.register_forward_hook(self._attention_hook(index)))
            if is_gated_attention(attention):
                gate = getattr(attention, GATE_MODULE_NAME)
                self._handles.append(gate.register_forward_hook(self._gate_hook(index, attention)))

    def _attention_hook(self, index: int):
        def hook(module, args, output):
            weights = attention_weights(self.model, index, module, output)
            self.first_token[index] = weights[..., 0].float().mean(dim=1)  # [batch, heads, queries] -> [batch, queries]

        return hook

    def _gate_hook(self, index: int, attention: nn.Module):
        def hook(module, args, output):
            scores = gate_scores(output.float(), attention.gate_config)
            self.gate[index] = scores.mean(dim=-1)  # [batch, queries, entries] -> [batch, queries]

        return hook


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    mask = mask.to(values.device)  # a model split over devices keeps each layer's tensors on its own device
    return float(values[mask].mean()) if mask.any() else float("nan")


@torch.no_grad()
def query_group_stats(model: nn.Module, input_ids: torch.Tensor,
                      groups: Mapping[str, torch.Tensor]) -> dict[str, QueryGroupStats]:
    """F-Attn and mean gate score of `model` on `input_ids` ([batch, seq]) for each named group of queries.

    Each group is a boolean mask shaped like `input_ids` (True: the query at that position belongs to the group);
    position 0 is left out of every group. Runs one forward pass with eager attention, in eval mode, and restores
    the model's attention implementation and mode afterwards.
    """
    model = base_model_of(model)  # a PEFT model: measure the model it wraps (adapters stay active)
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [batch, seq] with seq >= 2; got shape {tuple(input_ids.shape)}.")
    for name, mask in groups.items():
        if mask.shape != input_ids.shape or mask.dtype != torch.bool:
            raise ValueError(
                f"Group {name!r} must be a bool mask shaped like input_ids {tuple(input_ids.shape)}; got "
                f"{mask.dtype} of shape {tuple(mask.shape)}."
            )
    device = next(model.parameters()).device
    with eval_mode(model), eager_attention(model), _PositionProbes(model) as probes:
        model(input_ids=input_ids.to(device), use_cache=False)
    layers = sorted(probes.first_token)
    results = {}
    for name, mask in groups.items():
        selected = mask.clone()
        selected[:, 0] = False
        count = int(selected.sum())
        share = [_masked_mean(probes.first_token[i], selected) for i in layers]
        gate = None
        if probes.gate:
            gate = [_masked_mean(probes.gate[i], selected) if i in probes.gate else None for i in layers]
        results[name] = QueryGroupStats(num_queries=count, first_token_share=share, gate_mean=gate)
    return results
