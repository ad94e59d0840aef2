"""`inspect_model`: the paper's attention-sink, massive-activation and gate-sparsity metrics for one model."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import UpstreamStructureError
from ..core.hooks import is_gated_attention
from ..core.model import GATE_CONFIG_KEY
from ..patching import base_model_of
from .probes import GATE_THRESHOLDS, MetricProbes, eager_attention, eval_mode

FIRST_TOKEN_NOTE = (
    "first-token share (F-Attn): attention weight on position 0 of each window, averaged over heads and over query "
    "positions 1..T-1 (query 0 is excluded: it can only attend to itself)"
)
MAX_ACTIVATION_NOTE = "massive activation (M-Act): max |value| of each decoder layer's output hidden state"
UNIFORM_NOTE = (
    "uniform reference: the F-Attn that uniform causal attention would give on the same windows (mean of 1/(q+1)); "
    "values well above it mean a first-token attention sink"
)


def reference_prose(start_topic: Optional[str] = None) -> str:
    """Python's reference prose that ships with CPython (`pydoc_data.topics`): the topics in sorted order, from
    `start_topic` on (all of them if it is None or not a topic)."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    start = keys.index(start_topic) if start_topic in keys else 0
    return "\n\n".join(topics[key] for key in keys[start:])


def default_text(num_chars: int = 24_000, start_topic: str = "assert") -> str:
    """A slice of the Python reference prose in `pydoc_data.topics` (topics in sorted order from `start_topic`)."""
    return reference_prose(start_topic)[:num_chars]


@dataclass
class LayerStats:
    layer: int
    first_token_share: float
    first_token_share_per_head: list[float]
    max_abs_activation: float
    max_abs_position: int
    max_abs_channel: int
    mean_abs_attn_output: float  # mean |SDPA output| (before the gate, if any)
    gated: bool = False
    mean_abs_gated_output: Optional[float] = None  # mean |SDPA output * gate|
    gate_mean: Optional[float] = None
    gate_mean_per_head: Optional[list[float]] = None
    gate_fraction_below: Optional[dict[str, float]] = None  # threshold -> fraction of scores below it
    gate_fraction_below_per_head: Optional[dict[str, list[float]]] = None
    gate_min: Optional[float] = None
    gate_max: Optional[float] = None


@dataclass
class Inspection:
    """Per-layer metrics of one model on one text, plus summaries. `to_dict()` holds every number."""

    label: str
    model_type: str
    attn_implementation: str
    gate_config: Optional[dict]
    num_tokens: int
    window: int
    num_windows: int
    layers: list[LayerStats] = field(default_factory=list)
    uniform_first_token_share: float = float("nan")
    notes: list[str] = field(default_factory=lambda: [FIRST_TOKEN_NOTE, MAX_ACTIVATION_NOTE, UNIFORM_NOTE])

    @property
    def first_token_share_mean(self) -> float:
        return sum(l.first_token_share for l in self.layers) / len(self.layers)

    @property
    def first_token_share_max(self) -> tuple[float, int]:
        best = max(self.layers, key=lambda l: l.first_token_share)
        return best.first_token_share, best.layer

    @property
    def max_activation(self) -> tuple[float, int]:
        best = max(self.layers, key=lambda l: l.max_abs_activation)
        return best.max_abs_activation, best.layer

    @property
    def gated_layers(self) -> list[LayerStats]:
        return [l for l in self.layers if l.gated]

    @property
    def gate_mean(self) -> Optional[float]:
        gated = self.gated_layers
        return sum(l.gate_mean for l in gated) / len(gated) if gated else None

    def gate_fraction_below(self, threshold: float) -> Optional[float]:
        gated = self.gated_layers
        key = str(threshold)
        return sum(l.gate_fraction_below[key] for l in gated) / len(gated) if gated else None

    def summary(self) -> dict:
        share_max, share_layer = self.first_token_share_max
        act_max, act_layer = self.max_activation
        return {
            "first_token_share_mean": self.first_token_share_mean,
            "first_token_share_max": share_max,
            "first_token_share_max_layer": share_layer,
            "uniform_first_token_share": self.uniform_first_token_share,
            "max_abs_activation": act_max,
            "max_abs_activation_layer": act_layer,
            "gate_mean": self.gate_mean,
            **{f"gate_fraction_below_{t}": self.gate_fraction_below(t) for t in GATE_THRESHOLDS},
        }

    def to_dict(self) -> dict:
        data = asdict(self)
        data["summary"] = self.summary()
        return data


def uniform_first_token_share(window_lengths: Sequence[int]) -> float:
    """F-Attn of uniform causal attention: query q (1..T-1) puts 1/(q+1) on position 0; averaged over all queries."""
    total = sum(1.0 / (q + 1) for length in window_lengths for q in range(1, length))
    return total / sum(length - 1 for length in window_lengths)


def token_windows(token_ids: Sequence[int], window: int, min_length: int = 2) -> list[list[int]]:
    """Consecutive, non-overlapping windows of `window` tokens; a last shorter window is kept if it has at least
    `min_length` tokens (F-Attn needs a query besides position 0)."""
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens (got {window}): position 0 plus one query.")
    ids = list(token_ids)
    windows = [ids[i : i + window] for i in range(0, len(ids), window)]
    return [w for w in windows if len(w) >= min_length]


def tokenize_for_inspection(tokenizer, text: str, max_tokens: Optional[int]) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("The inspection text is empty after tokenization; pass a longer text.")
    return ids[:max_tokens] if max_tokens else ids


@torch.no_grad()
def _layer_stats(index: int, attention: nn.Module, acc) -> "LayerStats":
    """One layer's statistics from what its probes accumulated."""
    per_head = (acc.first_token_sum / acc.first_token_count).tolist()
    stats = LayerStats(
        layer=index,
        first_token_share=sum(per_head) / len(per_head),
        first_token_share_per_head=per_head,
        max_abs_activation=acc.max_abs,
        max_abs_position=acc.max_abs_position,
        max_abs_channel=acc.max_abs_channel,
        mean_abs_attn_output=acc.attn_output_abs_sum / max(acc.attn_output_count, 1),
    )
    if not is_gated_attention(attention):
        return stats
    if not acc.gate_count:
        raise UpstreamStructureError(
            f"Layer {index} is gated but its gate module was never called during the forward pass, so its gate "
            "scores could not be observed. Was the gate replaced by something that bypasses the module call?"
        )
    gate_per_head = (acc.gate_sum / acc.gate_count).tolist()
    below_per_head = {str(t): (acc.gate_below[t] / acc.gate_count).tolist() for t in GATE_THRESHOLDS}
    stats.gated = True
    stats.mean_abs_gated_output = acc.gated_output_abs_sum / max(acc.gated_output_count, 1)
    stats.gate_mean = sum(gate_per_head) / len(gate_per_head)
    stats.gate_mean_per_head = gate_per_head
    stats.gate_fraction_below_per_head = below_per_head
    stats.gate_fraction_below = {t: sum(v) / len(v) for t, v in below_per_head.items()}
    stats.gate_min, stats.gate_max = acc.gate_min, acc.gate_max
    return stats


def inspect_model(
    model: nn.Module,
    tokens: Union[Sequence[int], torch.Tensor],
    *,
    window: int = 512,
    batch_size: int = 4,
    label: Optional[str] = None,
    progress: bool = True,
) -> Inspection:
    """Measure F-Attn, M-Act and (for patched models) gate statistics of `model` on `tokens`.

    `tokens` are split into windows of `window` tokens, each an independent sequence starting at position 0, run
    `batch_size` windows at a time. Works with any attention implementation: the model runs with eager attention
    inside the call and gets its previous implementation back afterwards. The model is put in eval mode for the
    call and its previous mode restored. A PEFT model is measured through its base model, adapters active (an
    adapter on the gate projection changes the gate scores reported).
    """
    model = base_model_of(model)  # a PEFT model: measure the model it wraps (adapters stay active)
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.reshape(-1).tolist()
    windows = token_windows(tokens, window)
    if not windows:
        raise ValueError(f"Need at least 2 tokens to measure attention on the first token; got {len(tokens)}.")
    device = next(model.parameters()).device
    batches = []
    for length in sorted({len(w) for w in windows}, reverse=True):
        same = [w for w in windows if len(w) == length]
        batches += [same[i : i + batch_size] for i in range(0, len(same), batch_size)]
    with eval_mode(model), eager_attention(model) as original_implementation, MetricProbes(model) as probes:
        for batch in tqdm(batches, desc=f"inspect {label or type(model).__name__}", disable=not progress):
            model(input_ids=torch.tensor(batch, device=device), use_cache=False)

    layers = [_layer_stats(index, attention, probes.accumulators[index]) for index, _, attention in probes.layers]
    gate = getattr(model.config, GATE_CONFIG_KEY, None)
    result = Inspection(
        label=label or ("gated" if gate else "baseline"),
        model_type=model.config.model_type,
        attn_implementation=original_implementation,
        gate_config=dict(gate) if gate else None,
        num_tokens=sum(len(w) for w in windows),
        window=window,
        num_windows=len(windows),
        layers=layers,
        uniform_first_token_share=uniform_first_token_share([len(w) for w in windows]),
    )
    if any(math.isnan(l.first_token_share) for l in layers):
        raise RuntimeError("Attention weights contain NaN; the model's forward produced non-finite values.")
    return result
