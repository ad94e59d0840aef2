"""Forward hooks that reduce what the paper's metrics need while the model runs, one window batch at a time.

Nothing here copies upstream forward code or the gate math: attention weights come from the attention module's own
output (eager attention returns them), hidden states from the decoder layers' outputs, gate scores from the gate
projection's output passed through `gated_patch.core.gate.gate_scores`, and the attention output before / after the
gate from two forward pre-hooks on the output projection placed around the gating hook.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import nn

from ..core.errors import UpstreamStructureError
from ..core.gate import GATE_MODULE_NAME, gate_scores
from ..core.hooks import hook_output_projection, is_gated_attention
from ..core.model import decoder_layers_path
from ..families import family_for

#: Gate-score thresholds whose fractions are reported (the paper discusses scores near zero as "sparse").
GATE_THRESHOLDS = (0.1, 0.01)


@dataclass
class LayerAccumulator:
    """Running sums for one decoder layer over every window seen so far."""

    first_token_sum: Optional[torch.Tensor] = None  # [heads]: sum of attention on key 0 over queries 1..T-1
    first_token_count: int = 0  # number of (window, query) pairs summed, per head
    max_abs: float = 0.0
    max_abs_position: int = -1  # token position (within its window) of the maximum
    max_abs_channel: int = -1  # hidden dimension of the maximum
    attn_output_abs_sum: float = 0.0  # sum |Y| (SDPA output, before the gate)
    attn_output_count: int = 0
    gated_output_abs_sum: float = 0.0  # sum |Y * g|
    gated_output_count: int = 0
    gate_sum: Optional[torch.Tensor] = None  # [heads]
    gate_below: dict = field(default_factory=dict)  # threshold -> [heads] counts
    gate_count: int = 0  # scores per head
    gate_min: float = float("inf")
    gate_max: float = float("-inf")


def attention_layers(model: nn.Module) -> list[tuple[int, nn.Module, nn.Module]]:
    """``(decoder-layer index, layer, attention module)`` of every layer with softmax attention (in a hybrid, not
    its state-space or linear-attention layers); `model` is any head of its family, or its base model."""
    family = family_for(model)
    try:
        layers = model.get_submodule(decoder_layers_path(model, family.decoder_layers))
    except AttributeError as exc:
        raise UpstreamStructureError(
            f"{type(model).__name__} has no `{family.decoder_layers}` (the decoder layers of model_type "
            f"{family.model_type!r}); pass a causal-LM model, e.g. AutoModelForCausalLM.from_pretrained(...).") from exc
    found = []
    for i in range(len(layers)) if family.attention_layers is None else family.attention_layers:
        attention = getattr(layers[i], family.attention, None)
        if attention is None:
            raise UpstreamStructureError(f"Decoder layer {type(layers[i]).__name__} has no `{family.attention}` module.")
        found.append((i, layers[i], attention))
    return found


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[str]:
    """Run `model` with eager attention (the only implementation that materialises attention weights) inside the
    block and restore its previous implementation afterwards, so `sdpa` models need no reload."""
    previous = model.config._attn_implementation
    if previous == "eager":
        yield previous
        return
    model.set_attn_implementation("eager")
    if model.config._attn_implementation != "eager":
        raise UpstreamStructureError(
            f"{type(model).__name__} refused to switch its attention implementation from {previous!r} to 'eager' "
            "(needed to read attention weights). Load the model with attn_implementation='eager' instead."
        )
    try:
        yield previous
    finally:
        model.set_attn_implementation(previous)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode inside the block; its previous mode (train or eval) afterwards, even on an error."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def attention_weights(model: nn.Module, index: int, attention: nn.Module, output) -> torch.Tensor:
    """The ``[batch, heads, queries, keys]`` weights in attention layer `index`'s output (eager attention returns
    them), or an error that says how to get them."""
    weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
    if weights is None:
        raise UpstreamStructureError(
            f"Attention layer {index} ({type(attention).__name__}) returned no attention weights although the model "
            f"runs with {model.config._attn_implementation!r} attention; this model family's attention does not "
            "expose its weights. Load it with attn_implementation='eager'."
        )
    return weights


class HookSet:
    """A context manager: `install` registers hooks (appending their handles to `_handles`) on entry; every handle
    is removed on exit, and at once if installing fails half-way."""

    def __init__(self) -> None:
        self._handles: list = []

    def install(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            self.install()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class MetricProbes(HookSet):
    """Installs the hooks on entry, removes them on exit; `accumulators[i]` holds layer i's running sums."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.layers = attention_layers(model)  # (decoder-layer index, layer, attention)
        self.output_projection = family_for(model).output_projection  # of an ungated attention
        self.accumulators = {index: LayerAccumulator() for index, _, _ in self.layers}

    def install(self) -> None:
        for index, layer, attention in self.layers:
            self._handles.append(attention.register_forward_hook(self._attention_hook(index)))
            self._handles.append(layer.register_forward_hook(self._layer_hook(index)))
            self._install_output_hooks(index, attention)

    def _install_output_hooks(self, index: int, attention: nn.Module) -> None:
        gated = is_gated_attention(attention)
        name = attention.gate_projection_name if gated else self.output_projection
        projection = hook_output_projection(attention) if gated else getattr(attention, name, None)  # the gate's hook first
        if projection is None:
            raise UpstreamStructureError(f"Attention module {type(attention).__name__} has no `{name}` projection.")
        self._handles.append(projection.register_forward_pre_hook(self._before_gate_hook(index), prepend=True))
        if gated:
            self._handles.append(projection.register_forward_pre_hook(self._after_gate_hook(index)))
            gate = getattr(attention, GATE_MODULE_NAME)
            self._handles.append(gate.register_forward_hook(self._gate_hook(index, attention)))

    # -- hooks ---------------------------------------------------------------------------------------------------

    def _attention_hook(self, index: int):
        def hook(module, args, output):
            weights = attention_weights(self.model, index, module, output)
            queries = weights.shape[-2]
            if queries < 2:
                return
            # [batch, heads, queries, keys]: weight on key 0 for queries 1..T-1 (query 0 can only see itself).
            on_first = weights[..., 1:, 0].detach().float()
            acc = self.accumulators[index]
            per_head = on_first.sum(dim=(0, 2))
            acc.first_token_sum = per_head if acc.first_token_sum is None else acc.first_token_sum + per_head
            acc.first_token_count += on_first.shape[0] * on_first.shape[2]

        return hook

    def _layer_hook(self, index: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            magnitude = hidden.detach().abs()
            value, flat = magnitude.reshape(-1).max(dim=0)
            value = float(value)
            acc = self.accumulators[index]
            if value > acc.max_abs or acc.max_abs_position < 0:
                channels = hidden.shape[-1]
                positions = hidden.shape[-2]
                acc.max_abs = value
                acc.max_abs_channel = int(flat) % channels
                acc.max_abs_position = (int(flat) // channels) % positions

        return hook

    def _before_gate_hook(self, index: int):
        def hook(module, args):
            acc = self.accumulators[index]
            acc.attn_output_abs_sum += float(args[0].detach().abs().float().sum())
            acc.attn_output_count += args[0].numel()

        return hook

    def _after_gate_hook(self, index: int):
        def hook(module, args):
            acc = self.accumulators[index]
            acc.gated_output_abs_sum += float(args[0].detach().abs().float().sum())
            acc.gated_output_count += args[0].numel()

        return hook

    def _gate_hook(self, index: int, attention: nn.Module):
        def hook(module, args, output):
            scores = gate_scores(output.detach().float(), attention.gate_config)
            heads = attention.gate_num_heads
            per_head = scores.reshape(-1, heads, scores.shape[-1] // heads)  # headwise: [N, heads, 1]
            acc = self.accumulators[index]
            sums = per_head.sum(dim=(0, 2))
            acc.gate_sum = sums if acc.gate_sum is None else acc.gate_sum + sums
            for threshold in GATE_THRESHOLDS:
                below = (per_head < threshold).sum(dim=(0, 2)).float()
                acc.gate_below[threshold] = below + acc.gate_below.get(threshold, 0)
            acc.gate_count += per_head.shape[0] * per_head.shape[2]
            acc.gate_min = min(acc.gate_min, float(scores.min()))
            acc.gate_max = max(acc.gate_max, float(scores.max()))

        return hook
