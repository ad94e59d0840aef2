"""Checks of a local gated checkpoint's files before anything reads its tensors; each error names the file at fault.

Used by the plugin's loader and by the converter. Without them a malformed gate section of ``config.json`` surfaces
as a bare ``TypeError``, and an integer gate tensor is silently cast to float and loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from transformers.utils import CONFIG_NAME

from ..core.config import GateConfig
from ..core.errors import GateConfigError, GatedCheckpointError
from ..core.gate import is_gate_name
from ..core.model import GATE_CONFIG_KEY, GATE_MODULES_KEY, gate_modules_of
from ..files import read_json
from .format import config_object, gate_tensor_shapes, is_gated_model_type
from .names import CHECKPOINT_ATTENTION
from .weights import FLOAT_DTYPES, find_weight_files, open_shards


def gate_config_from(config: Mapping, config_path: Path | str) -> tuple[GateConfig, dict[str, str]]:
    """The gate config and gated-module paths of a gated ``config.json`` (a dict); errors name the file."""

    def bad(problem: str) -> GatedCheckpointError:
        return GatedCheckpointError(
            f"{config_path}: {problem}. Its {GATE_CONFIG_KEY!r} section must be the gate config written by save_pretrained "
            'of a patched model, e.g. {"granularity": "elementwise", "gate_input": "hidden_states", "init": "identity", '
            '"bias": true, "layers": null, "activation": "sigmoid"}. Restore the file or re-save / re-convert it.')

    data = config.get(GATE_CONFIG_KEY)
    if data is None:
        raise bad(f"model_type {config.get('model_type')!r} but no {GATE_CONFIG_KEY!r} entry")
    if not isinstance(data, dict):
        raise bad(f"{GATE_CONFIG_KEY!r} is a {type(data).__name__} ({data!r}), not an object")
    try:
        gate = GateConfig.from_dict(dict(data))
        num_layers = (config.get("text_config") or config).get("num_hidden_layers")
        if isinstance(num_layers, int):
            modules = config.get(GATE_MODULES_KEY)
            gate.layer_indices(num_layers, modules.get("attention_layers") if isinstance(modules, dict) else None)
    except (GateConfigError, TypeError) as exc:
        raise bad(f"invalid {GATE_CONFIG_KEY!r}: {str(exc).rstrip('.')}") from exc
    try:
        modules = gate_modules_of(dict(config))
    except GatedCheckpointError as exc:
        raise GatedCheckpointError(f"{config_path}: {exc}") from None
    saved_as = modules.get(CHECKPOINT_ATTENTION)
    if saved_as is not None and (not isinstance(saved_as, str) or "{}" not in saved_as or
                                 saved_as.count("{") + saved_as.count("}") != 2):
        raise GatedCheckpointError(f"{config_path}: {GATE_MODULES_KEY}.{CHECKPOINT_ATTENTION} must be a module path "
                                   f"with one {{}} for the layer index, got {saved_as!r}. Restore the file or re-save "
                                   "/ re-convert it.")
    return gate, modules


def check_gate_tensors(gate: GateConfig, modules: Mapping[str, str], config_path: Path | str,
                       entries: Mapping[str, tuple[str, tuple[int, ...]]], files: Mapping[str, Path | str],
                       listing: Path | str) -> None:
    """Every gate tensor the config asks for is present with its shape and a floating dtype, and there are no others.

    Args:
        entries: ``{tensor name: (safetensors dtype, shape)}`` of the whole checkpoint.
        files: ``{tensor name: file holding it}`` (for the messages).
        listing: the file that lists the tensors (the index, or the single weight file), named for missing tensors.
    """
    expected = gate_tensor_shapes(gate, modules, config_object(config_path), config_path)
    problems = []
    for name, shape in expected.items():
        if name not in entries:
            problems.append(f"{listing}: missing gate tensors [{name!r}]")
            continue
        dtype, found = entries[name]
        if tuple(found) != shape:
            problems.append(f"{files[name]}: wrong-shaped gate tensors [{name!r}] (shape {tuple(found)}, the config "
                            f"needs {shape})")
        if dtype not in FLOAT_DTYPES:
            problems.append(f"{files[name]}: gate tensors of a non-float dtype [{name!r}] (dtype {dtype})")
    problems += [f"{files[name]}: gate tensors the gate config in {config_path} has no place for [{name!r}]"
                 for name in sorted(entries) if is_gate_name(name) and name not in expected]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise GatedCheckpointError(
            f"Gated checkpoint does not match its gate config: {shown}. A truncated or hand-edited checkpoint? Re-save it "
            "from the patched model or re-convert it; it is not loaded with made-up gates.")


def check_local_checkpoint(directory: Path | str, variant: str | None = None) -> None:
    """Validate a local gated checkpoint directory (the weights of `variant`, as ``from_pretrained`` reads them)
    before loading it (no-op for anything else)."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        return
    config = read_json(config_path)
    if not is_gated_model_type(config.get("model_type")):
        return
    gate, modules = gate_config_from(config, config_path)
    weights = find_weight_files(directory, variant)
    if weights is None:
        return
    try:  # headers only; pickled weights read as transformers reads them (weights_only=True), checked against the index
        _, by_name = open_shards(weights, allow_pickle=True)
    except GatedCheckpointError:
        if not weights.pickled:
            raise
        return  # e.g. the legacy pickle format, which cannot be memory-mapped: transformers reads and reports it, and
        # the check after loading still runs
    entries = {name: shard.entries[name] for name, shard in by_name.items()}
    files = {name: shard.path for name, shard in by_name.items()}
    check_gate_tensors(gate, modules, config_path, entries, files, weights.listing)
