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
def forward_calls_projection_once(attention_class: type, projection: str) -> tuple[bool, str]:
    """Whether the class's ``forward(self, hidden_states, ...)`` source calls ``self.<projection>(`` exactly once."""
    try:
        source = inspect.getsource(attention_class.forward)
    except (OSError, TypeError) as exc:
        return False, f"its forward source cannot be read ({exc})"
    parameters = list(inspect.signature(attention_class.forward).parameters)
    if parameters[:2] != ["self", "hidden_states"]:
        return False, f"its forward takes {parameters[:2]} first, not ['self', 'hidden_states']"
    calls = len(re.findall(rf"self\.{re.escape(projection)}\(", source))
    if calls != 1:
        return False, f"its forward calls self.{projection}(...) {calls} times, not exactly once"
    return True, ""


def check_attention_structure(attention: nn.Module, family, where: str) -> None:
    """Raise `UpstreamStructureError` unless `attention` is what the gate mechanism relies on."""

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
    ok, reason = forward_calls_projection_once(expected, family.output_projection)
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
