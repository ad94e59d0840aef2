"""Diagnostics: the paper's attention-sink (F-Attn), massive-activation (M-Act) and gate-sparsity metrics.

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
    token_windows,
    tokenize_for_inspection,
    uniform_first_token_share,
)
from .probes import GATE_THRESHOLDS, eager_attention
from .report import format_layer_table, format_summary_table, plot_inspections, write_json

__all__ = [
    "FIRST_TOKEN_NOTE",
    "GATE_THRESHOLDS",
    "MAX_ACTIVATION_NOTE",
    "UNIFORM_NOTE",
    "Inspection",
    "LayerStats",
    "default_text",
    "eager_attention",
    "format_layer_table",
    "format_summary_table",
    "inspect_model",
    "plot_inspections",
    "token_windows",
    "tokenize_for_inspection",
    "uniform_first_token_share",
    "write_json",
]
