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


def calls(source: str, name: str) -> list[int]:
    """Where `source` calls ``self.<name>(``: the one reading of forward sources (the guard's and discovery's)."""
    return [match.start() for match in re.finditer(rf"self\.{re.escape(name)}\(", source)]


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
    found = calls(source, projection)
    if len(found) != 1:
        return False, f"its forward calls self.{projection}(...) {len(found)} times, not exactly once"
    later = [name for name in others if any(position > found[0] for position in calls(source, name))]
    if later:
        return False, f"its forward calls {', '.join(f'self.{name}' for name in later)} after self.{projection}, so " \
                      f"{projection} is not the output projection"
    return True, ""


def check_attention_structure(attention: nn.Module, where: str, output_projection: str, num_heads: int | None = None,
                              expected: type | None = None, model_type: str | None = None) -> None:
    """Raise `UpstreamStructureError` unless `attention` (an instance of `expected`, when given) is what the gate
    mechanism relies on; `num_heads`: the config's attention heads, which the output projection must take
    ``num_heads * head_dim`` features of."""

    def fail(reason: str) -> None:
        raise UpstreamStructureError(
            f"Cannot gate {where} ({type(attention).__qualname__}) for model_type {model_type!r}: {reason}. "
            f"gated_patch relies on attention whose forward(hidden_states, ...) calls "
            f"`self.{output_projection}(attn_output)` once. If transformers changed this class, install a "
            f"supported version (transformers>={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS}); if this is a custom family, fix "
            "its register_model_type(...) entry.")

    expected = expected or type(attention)
    if not isinstance(attention, expected):
        fail(f"expected an instance of {expected.__qualname__}")
    projection = getattr(attention, output_projection, None)
    if not isinstance(projection, nn.Linear):
        fail(f"it has no nn.Linear named {output_projection!r}")
    head_dim = getattr(attention, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim <= 0:
        fail("it has no positive integer `head_dim` attribute")
    if projection.in_features % head_dim:
        fail(f"{output_projection}.in_features={projection.in_features} is not a multiple of head_dim={head_dim}")
    if num_heads is not None and projection.in_features != num_heads * head_dim:
        fail(f"{output_projection} takes {projection.in_features} features, not the config's {num_heads} heads x "
             f"head_dim {head_dim} = {num_heads * head_dim}: it does not take the attention output head by head (a "
             "low-rank or otherwise transformed output projection?)")
    others = tuple(sorted(name for name, child in attention.named_children()
                          if isinstance(child, nn.Linear) and name != output_projection))
    ok, reason = forward_calls_projection_once(expected, output_projection, others)
    if not ok:
        fail(reason)


def check_loaded_attention(attention: nn.Module, where: str, output_projection: str, num_heads: int) -> None:
    """The structure guard of an attention module a gated checkpoint places its gate in (`add_gates`' check)."""
    model_type = getattr(getattr(attention, "config", None), "model_type", None)
    check_attention_structure(attention, where, output_projection, num_heads, model_type=model_type)


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
