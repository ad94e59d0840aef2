"""Sink-free streaming: the loss when the first tokens leave the KV cache.

StreamingLLM (Xiao et al., ICLR 2024) showed that window attention -- a KV cache that keeps only the last `window`
tokens -- breaks a softmax model once position 0 is evicted, and that keeping a few first "sink" tokens repairs it.
If gated attention removes the sink, a gated model should lose far less when position 0 goes.

Here query q sees keys ``max(0, q - window + 1) .. q``, plus keys ``0 .. sink_tokens - 1``; this is a KV cache of
`window` tokens (and the sinks) with every token at its original position. Rotary attention depends only on the
distance between query and key, so without sinks this equals a rolling cache that renumbers its positions.
Losses are compared on the same targets: those whose query is at position >= `window` (targets at >= window + 1),
where the cache has evicted something. Example::

    result = streaming_losses(model, input_ids, window=64, sink_tokens=(1, 4))
    result["window"] - result["full"]      # the cost of evicting everything older than 64 tokens
    result["window"] - result["window+1"]  # how much of it position 0 alone gives back
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .probes import eval_mode


def window_attention_mask(seq_len: int, window: int, sink_tokens: int = 0, *, dtype: torch.dtype = torch.float32,
                          device=None) -> torch.Tensor:
    """An additive ``[1, 1, seq_len, seq_len]`` mask: 0 where query q may attend to key k, the dtype's minimum
    elsewhere. Allowed: ``q - window < k <= q``, and ``k < sink_tokens`` (for k <= q)."""
    if window < 1:
        raise ValueError(f"window must be at least 1 token (the query itself); got {window}.")
    if sink_tokens < 0:
        raise ValueError(f"sink_tokens must be >= 0; got {sink_tokens}.")
    query = torch.arange(seq_len, device=device).unsqueeze(1)
    key = torch.arange(seq_len, device=device).unsqueeze(0)
    allowed = (key <= query) & ((key > query - window) | (key < sink_tokens))
    mask = torch.zeros(seq_len, seq_len, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


@torch.no_grad()
def token_losses(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor = None) -> torch.Tensor:
    """Next-token cross-entropy at every query position but the last: ``[batch, seq - 1]``, in the model's current
    mode. `attention_mask`, if given, is an additive ``[1 or batch, 1, seq, seq]`` mask (`window_attention_mask`)."""
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        if attention_mask.dim() != 4:
            raise ValueError(
                f"attention_mask must be a 4D additive mask [1 or batch, 1, seq, seq] (got {attention_mask.dim()}D); "
                "build one with window_attention_mask(seq_len, window, sink_tokens)."
            )
        attention_mask = attention_mask.to(device).expand(input_ids.shape[0], -1, -1, -1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")


@torch.no_grad()
def streaming_losses(model: nn.Module, input_ids: torch.Tensor, window: int,
                     sink_tokens: Sequence[int] = (1, 4)) -> dict[str, float]:
    """Mean next-token loss on the targets whose query is at position >= `window`, with full causal attention
    (``"full"``), with a `window`-token cache (``"window"``) and with that cache plus the first n tokens
    (``"window+n"`` for each n in `sink_tokens`). `input_ids` is ``[batch, seq]`` with seq > window + 1.
    The model runs in eval mode inside the call; its mode is restored afterwards."""
    if input_ids.dim() != 2 or input_ids.shape[1] <= window + 1:
        raise ValueError(
            f"input_ids must be [batch, seq] with seq > window + 1 = {window + 1} so that some query has lost "
            f"position 0; got shape {tuple(input_ids.shape)}."
        )
    seq_len = input_ids.shape[1]
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation not in ("eager", "sdpa"):
        raise ValueError(
            f"streaming_losses needs eager or sdpa attention, which apply a 4D mask as given; the model runs "
            f"{implementation!r}. Call model.set_attn_implementation('sdpa') first."
        )
    sliding = getattr(model.config, "sliding_window", None)
    if sliding and seq_len > sliding:
        raise ValueError(
            f"The model has its own sliding window of {sliding} tokens, which the window mask would replace; pass "
            f"sequences of at most {sliding} tokens (got {seq_len})."
        )
    dtype = next(model.parameters()).dtype
    settings = {"full": None, "window": window_attention_mask(seq_len, window, dtype=dtype)}
    settings.update({f"window+{n}": window_attention_mask(seq_len, window, n, dtype=dtype) for n in sink_tokens})
    with eval_mode(model):
        return {name: float(token_losses(model, input_ids, mask)[:, window:].mean()) for name, mask in settings.items()}
