"""Guards on the upstream code the plugin hooks into: the shape of an attention class and the output-recording
registry. Both fail loudly rather than produce a silently ungated or wrongly gated model."""

from __future__ import annotations

import importlib
import inspect
import re
from functools import lru_cache

from torch import nn

from .core.errors import UpstreamStructureError
from .core.versions import MAX_TRANSFORMERS, MIN_TRANSFORMERS


@lru_cache(maxsize=None)
def forward_source(attention_class: type) -> str:
    """The source of ``attention_class.forward`` without comments and docstrings ('' if it cannot be read)."""
    try:
        source = inspect.getsource(attention_class.forward)
    except (OSError, TypeError):
        return ""
    return re.sub(r"#.*|\"\"\"[\s\S]*?\"\"\"", "", source)


@lru_cache(maxsize=None)
def forward_calls_projection_once(attention_class: type, projection: str, others: tuple[str, ...] = ()) -> tuple[bool, str]:
    """Whether ``forward(self, hidden_states, ...)`` calls ``self.<projection>(`` exactly once, and after every call of
    the other projections `others` (the output projection is the last one applied)."""
    source = forward_source(attention_class)
    if not source:
        return False, "its forward source cannot be read"
    parameters = list(inspect.signature(attention_class.forward).parameters)
    if parameters[:2] != ["self", "hidden_states"]:
        return False, f"its forward takes {parameters[:2]} first, not ['self', 'hidden_states']"
    calls = [m.start() for m in re.finditer(rf"self\.{re.escape(projection)}\(", source)]
    if len(calls) != 1:
        return False, f"its forward calls self.{projection}(...) {len(calls)} times, not exactly once"
    later = [name for name in others if any(m.start() > calls[0] for m in re.finditer(rf"self\.{re.escape(name)}\(", source))]
    if later:
        return False, f"its forward calls {', '.join(f'self.{name}' for name in later)} after self.{projection}, so " \
                      f"{projection} is not the output projection"
    return True, ""


def check_attention_structure(attention: nn.Module, family, where: str, num_heads: int | None = None) -> None:
    """Raise `UpstreamStructureError` unless `attention` is what the gate mechanism relies on. `num_heads`: the
    config's attention heads, which the output projection must take ``num_heads * head_dim`` features of."""

    def fail(reason: str) -> None:
        raise UpstreamStructureError(
            f"Cannot gate {where} ({type(attention).__qualname__}) for model_type {family.model_type!r}: {reason}. "
            f"gated_patch relies on attention whose forward(hidden_states, ...) calls "
            f"`self.{family.output_projection}(attn_output)` once. If transformers changed this class, install a "
            f"supported version (transformers>={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS}); if this is a custom family, fix "
            "its register_model_type(...) entry.")

    expected = family.resolve_attention_class()
    if not isinstance(attention, expected):
        fail(f"expected an instance of {expected.__qualname__}")
    projection = getattr(attention, family.output_projection, None)
    if not isinstance(projection, nn.Linear):
        fail(f"it has no nn.Linear named {family.output_projection!r}")
    head_dim = getattr(attention, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim <= 0:
        fail("it has no positive integer `head_dim` attribute")
    if projection.in_features % head_dim:
        fail(f"{family.output_projection}.in_features={projection.in_features} is not a multiple of head_dim={head_dim}")
    if num_heads is not None and projection.in_features != num_heads * head_dim:
        fail(f"{family.output_projection} takes {projection.in_features} features, not the config's {num_heads} heads x "
             f"head_dim {head_dim} = {num_heads * head_dim}: it does not take the attention output head by head (a "
             "low-rank or otherwise transformed output projection?)")
    others = tuple(sorted(name for name, child in attention.named_children()
                          if isinstance(child, nn.Linear) and name != family.output_projection))
    ok, reason = forward_calls_projection_once(expected, family.output_projection, others)
    if not ok:
        fail(reason)


def refresh_output_recording(model: nn.Module) -> None:
    """Re-register `_can_record_outputs` for a model whose class was swapped.

    transformers 5 records ``output_attentions`` / ``output_hidden_states`` through a registry filled in
    ``PreTrainedModel.__init__`` and keyed by the model (its class name before 5.13); a class swapped afterwards must be
    registered again or those outputs silently come back as ``None``.
    """
    registry = None
    for module_name in ("transformers.utils.output_capturing", "transformers.utils.generic"):  # new, <5.8 location
        try:
            registry = getattr(importlib.import_module(module_name), "_CAN_RECORD_REGISTRY", None)
        except ImportError:
            continue
        if registry is not None:
            break
    if registry is None:
        return
    if type(registry) is dict:
        registry[str(type(model))] = model._can_record_outputs
    else:
        registry[model] = model._can_record_outputs
