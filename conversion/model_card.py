"""Model cards of converted checkpoints (huggingface_hub `ModelCard` / `ModelCardData`)."""

from __future__ import annotations

import json
from typing import Optional

from huggingface_hub import ModelCard, ModelCardData

from gated_patch.core.config import GateConfig

MODEL_CARD_FILE = "README.md"

_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}

## Gate

| setting | value |
|---|---|
{% for key, value in gate_rows %}| `{{ key }}` | `{{ value }}` |
{% endfor %}
{{ details }}
"""


def _gate_rows(gate: GateConfig) -> list[tuple[str, str]]:
    return [(key, json.dumps(value)) for key, value in gate.to_dict().items()]


def gated_model_card(base_model: Optional[str], source: str, gate: GateConfig, source_layout: str) -> ModelCard:
    """The card of a gated checkpoint written by ``gated-patch-convert``."""
    data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["gated-attention", "gated_patch"],
    )
    origin = {
        "plain": "attention output gates were added",
        "paper": "the gates fused into `q_proj` (the paper authors' layout) were split out",
        "qwen3-next": "the gates fused into `q_proj` (Qwen3-Next layout) were split out",
    }[source_layout]
    summary = (
        f"`{source}` with the gated attention of Qiu et al. 2025 (arXiv 2505.06708): every gated attention layer "
        f"computes `o_proj(Y * gate)`. Converted by gated_patch ({origin})."
    )
    if gate.init == "identity":
        summary += " The gates are identity-initialised (weights 0, `2 * sigmoid(0) = 1`): before any training this model computes exactly what the base model computes."
    details = """## How to load

With the plugin (`pip install gated_patch`):

```python
import gated_patch  # registers the gated model types
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(PATH)  # a patched model: gated_patch.gate_config(model), ...
```

Without the plugin, the checkpoint carries its modeling code (`modeling_gated_attention.py`, torch + transformers only):

```python
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)
```

Without either, loading fails (the `gated_*` model type is unknown) rather than silently dropping the gate weights.
"""
    card = ModelCard.from_template(
        data,
        template_str=_TEMPLATE,
        title=f"{source.rstrip('/').split('/')[-1]} with gated attention",
        summary=summary,
        gate_rows=_gate_rows(gate),
        details=details,
    )
    return card


def exported_model_card(source: str, gate: GateConfig, layout: str) -> ModelCard:
    """The card of a checkpoint exported to a fused gate layout or a native architecture."""
    data = ModelCardData(library_name="transformers", tags=["gated-attention", f"gate-layout-{layout}"])
    if layout == "qwen3_5":
        details = ("A native `Qwen3_5ForCausalLM` (`qwen3_5_text`, every layer full attention) that computes exactly "
                   "the gated model; plain transformers (`AutoModelForCausalLM`) and engines that support Qwen3.5 load it.")
    else:
        flags = (
            "config flag `" + ("elementwise" if gate.granularity == "elementwise" else "headwise") + "_attn_output_gate`"
            if layout == "paper"
            else "no config flag (load it with code that expects the Qwen3-Next attention layout)"
        )
        details = (
            f"`q_proj` produces the query and the gate ({layout} layout, {flags}); the gate is `sigmoid(x @ W)`. "
            "Plain transformers classes refuse this checkpoint (the `q_proj` shape does not match); use code that "
            "implements this layout, or import it back with `gated-patch-convert --source-layout "
            f"{layout} SRC OUT`."
        )
    return ModelCard.from_template(
        data,
        template_str=_TEMPLATE,
        title=f"{source.rstrip('/').split('/')[-1]} exported to the {layout} gate layout",
        summary=f"Exported by gated_patch from the gated checkpoint `{source}`.",
        gate_rows=_gate_rows(gate),
        details=details,
    )
