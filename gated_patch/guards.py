"""Guards on the upstream code the plugin hooks into: the shape of an attention class and the output-recording
registry. Both fail loudly rather than produce a silently ungated or wrongly gated model."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import textwrap
from functools import lru_cache

from torch import nn
from transformers.pytorch_utils import Conv1D

from .core.errors import UpstreamStructureError
from .core.versions import MAX_TRANSFORMERS, MIN_TRANSFORMERS

PROJECTIONS = (nn.Linear, Conv1D)  # what an attention module's projections are: nn.Linear, or Conv1D (GPT-2)


@lru_cache(maxsize=None)
def forward_source(attention_class: type) -> str:
    """The source of ``attention_class.forward`` without comments and docstrings ('' if it cannot be read)."""
    try:
        source = inspect.getsource(attention_class.forward)
    except (OSError, TypeError):
        return ""
    return re.sub(r"#.*|\"\"\"[\s\S]*?\"\"\"", "", source)


@lru_cache(maxsize=None)
def projection_calls(attention_class: type) -> dict[str, list[tuple[ast.Call, tuple]]] | None:
    """``{name: [(call, branches)]}`` for every ``self.<name>(...)`` in ``forward``: the one reading of forward sources.

    ``branches`` are the ``(if-statement, arm)`` pairs the call sits in, outermost first, so two calls in different
    arms of one ``if`` never run in the same forward. None when the source cannot be read.
    """
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(attention_class.forward)))
    except (OSError, TypeError, SyntaxError):
        return None
    found: dict[str, list] = {}

    def visit(node: ast.AST, branches: tuple) -> None:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(
                node.func.value, ast.Name) and node.func.value.id == "self":
            found.setdefault(node.func.attr, []).append((node, branches))
        for field, value in ast.iter_fields(node):
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, ast.AST):
                    arm = (id(node), field) if isinstance(node, ast.If) and field in ("body", "orelse") else None
                    visit(child, branches + (arm,) if arm else branches)

    visit(tree, ())
    return found


def _exclusive(first: tuple, second: tuple) -> bool:
    """Whether two calls sit in different arms of one ``if`` (never run in the same call)."""
    return any(a[0] == b[0] and a[1] != b[1] for a, b in zip(first, second))


@lru_cache(maxsize=None)
def forward_calls_projection_once(attention_class: type, projection: str, others: tuple[str, ...] = ()) -> tuple[bool, str]:
    """Whether ``forward(self, hidden_states, ...)`` calls ``self.<projection>(`` once per call (one call site, or
    several on exclusive branches) and after every call of the other projections `others` (the output projection is
    the last one applied)."""
    found = projection_calls(attention_class)
    if found is None:
        return False, "its forward source cannot be read"
    parameters = list(inspect.signature(attention_class.forward).parameters)
    if parameters[:2] != ["self", "hidden_states"]:
        return False, f"its forward takes {parameters[:2]} first, not ['self', 'hidden_states']"
    sites = found.get(projection, [])
    if not sites or any(not _exclusive(a[1], b[1]) for i, a in enumerate(sites) for b in sites[i + 1:]):
        return False, f"its forward calls self.{projection}(...) {len(sites)} times, not exactly once per call"
    first = min((call.lineno, call.col_offset) for call, _ in sites)
    later = [name for name in others if any((call.lineno, call.col_offset) > first for call, _ in found.get(name, []))]
    if later:
        return False, f"its forward calls {', '.join(f'self.{name}' for name in later)} after self.{projection}, so " \
                      f"{projection} is not the output projection"
    return True, ""


def input_width(projection: nn.Module) -> int:
    """The input features of an output projection: an `nn.Linear`'s, or a `Conv1D`'s (GPT-2; weight ``[in, out]``)."""
    return projection.in_features if isinstance(projection, nn.Linear) else projection.nx


def check_attention_structure(attention: nn.Module, where: str, output_projection: str, num_heads: int,
                              head_size: int, expected: type | None = None, model_type: str | None = None) -> None:
    """Raise `UpstreamStructureError` unless `attention` (an instance of `expected`, when given) is what the gate
    mechanism relies on: its output projection takes the attention output head by head, ``num_heads`` heads of
    ``head_size`` (what the config says), and its forward applies that projection last, once per call."""

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
    if not isinstance(projection, PROJECTIONS):
        fail(f"it has no nn.Linear or Conv1D named {output_projection!r}")
    if input_width(projection) != num_heads * head_size:
        fail(f"{output_projection} takes {input_width(projection)} features, not the config's {num_heads} heads x "
             f"{head_size} = {num_heads * head_size}: it does not take the attention output head by head (a "
             "low-rank or otherwise transformed output projection?)")
    others = tuple(sorted(name for name, child in attention.named_children()
                          if isinstance(child, PROJECTIONS) and name != output_projection))
    ok, reason = forward_calls_projection_once(expected, output_projection, others)
    if not ok:
        fail(reason)


def check_loaded_attention(attention: nn.Module, where: str, output_projection: str, text_config) -> None:
    """The structure guard of an attention module a gated checkpoint places its gate in."""
    check_attention_structure(attention, where, output_projection, text_config.num_attention_heads,
                              value_head_size(text_config), model_type=getattr(text_config, "model_type", None))


def value_head_size(text_config) -> int:
    """The width per head of the attention output, as a (text) config gives it: ``v_head_dim`` (multi-head latent
    attention), else ``head_dim``, else hidden size / heads."""
    heads = text_config.num_attention_heads
    return int(getattr(text_config, "v_head_dim", None) or getattr(text_config, "head_dim", None)
               or text_config.hidden_size // heads)


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
