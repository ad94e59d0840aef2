"""Diagnostics: the paper's attention-sink (F-Attn), massive-activation (M-Act) and gate-sparsity metrics; F-Attn and
gate scores by group of queries (`query_group_stats`); the loss without the first tokens in the KV cache
(`streaming_losses`); and Bigram-Backcopy, a task on which a small model forms a sink in minutes.

Example::

    from gated_patch.diagnostics import default_text, inspect_model, tokenize_for_inspection
    tokens = tokenize_for_inspection(tokenizer, default_text(), max_tokens=1024)
    result = inspect_model(model, tokens, window=512)
    print(result.summary())
"""

from .measure import (
    FIRST_TOKEN_NOTE,
    MAX_ACTIVATION_NOTE,
    UNIFORM_NOTE,
    Inspection,
    LayerStats,
    default_text,
    inspect_model,
    reference_prose,
    token_windows,
    tokenize_for_inspection,
    uniform_first_token_share,
)
from .positions import QueryGroupStats, query_group_stats
from .probes import GATE_THRESHOLDS, eager_attention
from .streaming import streaming_losses, token_losses, window_attention_mask
from .tasks import BOS_TOKEN_ID, BigramBackcopy, TaskBatch
from ..files import write_json
from .report import environment, format_layer_table, format_summary_table, plot_inspections

__all__ = [
    "BOS_TOKEN_ID",
    "BigramBackcopy",
    "FIRST_TOKEN_NOTE",
    "GATE_THRESHOLDS",
    "MAX_ACTIVATION_NOTE",
    "UNIFORM_NOTE",
    "Inspection",
    "LayerStats",
    "QueryGroupStats",
    "TaskBatch",
    "default_text",
    "eager_attention",
    "environment",
    "format_layer_table",
    "format_summary_table",
    "inspect_model",
    "plot_inspections",
    "query_group_stats",
    "reference_prose",
    "streaming_losses",
    "token_losses",
    "token_windows",
    "tokenize_for_inspection",
    "uniform_first_token_share",
    "window_attention_mask",
    "write_json",
]
