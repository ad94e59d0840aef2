"""Guards on the upstream code the plugin depends on: the transformers version range and the shape of the
attention classes it hooks into. Both fail loudly rather than produce a silently wrong model."""

from __future__ import annotations

import importlib
import inspect
import re
from functools import lru_cache

import transformers
from packaging.version import Version
from torch import nn

from .core.errors import UpstreamStructureError
from .registry import ModelFamily

#: transformers versions this release supports. The minimum is the oldest release on which the core and checkpoint
#: tests pass (`.ci/oldest-transformers`; on 5.12.x a device_map="auto" load with disk offload comes back with
#: every parameter on "meta" and no hf_device_map, failing tests/test_core_api.py); the newest
#: is what `make test` installs. See README, "Reliability".
MIN_TRANSFORMERS = Version("5.13.0")
MAX_TRANSFORMERS_EXCLUSIVE = Version("6.0.0")


def check_transformers_version(version: str | None = None) -> None:
    installed = Version(version or transformers.__version__)
    if not (MIN_TRANSFORMERS <= installed < MAX_TRANSFORMERS_EXCLUSIVE):
        raise UpstreamStructureError(
            f"gated_patch supports transformers >={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS_EXCLUSIVE}; "
            f"transformers {installed} is installed. Install a supported version, e.g. "
            f"`pip install 'transformers>={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS_EXCLUSIVE}'`."
        )


@lru_cache(maxsize=None)
def _forward_calls_projection_once(attention_class: type, projection: str) -> tuple[bool, str]:
    try:
        source = inspect.getsource(attention_class.forward)
    except (OSError, TypeError) as exc:
        return False, f"its forward source cannot be read ({exc})"
    parameters = list(inspect.signature(attention_class.forward).parameters)
    if parameters[:2] != ["self", "hidden_states"]:
        return False, f"its forward takes {parameters[:2]} first, not ['self', 'hidden_states']"
    calls = re.findall(rf"self\.{re.escape(projection)}\(", source)
    if len(calls) != 1:
        return False, f"its forward calls self.{projection}(...) {len(calls)} times, not exactly once"
    return True, ""


def check_attention_structure(attention: nn.Module, family: ModelFamily, where: str) -> None:
    """Raise `UpstreamStructureError` unless `attention` is what the gate mechanism relies on."""

    def fail(reason: str) -> None:
        raise UpstreamStructureError(
            f"Cannot gate {where} ({type(attention).__qualname__}) for model_type {family.model_type!r}: {reason}. "
            f"gated_patch relies on Llama-style attention whose forward(hidden_states, ...) ends with "
            f"`self.{family.output_projection}(attn_output)`. If transformers changed this class, install a supported "
            f"version (transformers>={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS_EXCLUSIVE}); if this is a custom family, fix "
            "its register_model_type(...) entry."
        )

    expected = family.resolve_attention_class()
    if not isinstance(attention, expected):
        fail(f"expected an instance of {expected.__qualname__}")
    projection = attention._modules.get(family.output_projection)
    if not isinstance(projection, nn.Linear):
        fail(f"it has no nn.Linear named {family.output_projection!r}")
    head_dim = getattr(attention, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim <= 0:
        fail("it has no positive integer `head_dim` attribute")
    if projection.in_features % head_dim:
        fail(f"{family.output_projection}.in_features={projection.in_features} is not a multiple of head_dim={head_dim}")
    ok, reason = _forward_calls_projection_once(expected, family.output_projection)
    if not ok:
        fail(reason)
    _drop_stale_instance_forward(attention, fail)


def _drop_stale_instance_forward(attention: nn.Module, fail) -> None:
    """A ``forward`` stored on the instance hides the class's, so the gated class swapped in would be bypassed and the
    model silently stay ungated. transformers 5.0 and 5.1 leave one behind after any ``output_attentions=True`` call (the
    original forward, bound to the module); that one is dropped. accelerate's hook wrapper is handled by patching
    (``_old_forward``); anything else is refused."""
    forward = attention.__dict__.get("forward")
    if forward is None or "_old_forward" in attention.__dict__:
        return
    if getattr(forward, "__self__", None) is attention and getattr(forward, "__func__", None) is type(attention).forward:
        del attention.__dict__["forward"]
        return
    fail(f"its `forward` was replaced on the instance ({forward!r}), which would bypass the gate")


def refresh_output_recording(model: nn.Module) -> None:
    """Re-register `_can_record_outputs` for a model whose class was swapped.

    transformers 5.x records ``output_attentions`` / ``output_hidden_states`` through a registry keyed by the model's
    class name, filled in ``PreTrainedModel.__init__``; a class swapped afterwards must be registered again or the
    outputs silently come back as ``None`` (tests/test_core_identity.py::test_output_attentions_still_returned).
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
    if type(registry) is dict:  # before ~5.13 a plain dict keyed by str(class) (the newer registry keys it itself)
        registry[str(type(model))] = model._can_record_outputs
    else:
        registry[model] = model._can_record_outputs
