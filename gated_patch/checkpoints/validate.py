"""Checks of a gated checkpoint's files before anything reads its tensors, each error naming the file at fault.

Used by the plugin's loader (local directories, before transformers opens the weights) and by the converter. Without
them a truncated shard surfaces as safetensors' "incomplete metadata" with no file name, a malformed gate section of
``config.json`` as a bare ``TypeError``, and an integer gate tensor is silently cast to float and loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional

from ..core.config import GateConfig
from ..core.errors import GateConfigError, GatedCheckpointError
from .remote_model import GATE_CONFIG_KEY, gate_tensor_names
from .tensor_files import read_safetensors_header

#: Gate tensors must hold floating-point values (an integer or boolean gate is a corrupt or hand-edited file).
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def gate_config_from(config: Mapping, config_path: Path | str) -> GateConfig:
    """The gate config of a gated ``config.json`` (as a dict), or a `GatedCheckpointError` naming the file."""

    def bad(problem: str) -> GatedCheckpointError:
        return GatedCheckpointError(
            f"{config_path}: {problem}. Its {GATE_CONFIG_KEY!r} section must be the gate config written by "
            "save_pretrained of a patched model, e.g. {\"granularity\": \"elementwise\", \"gate_input\": "
            "\"hidden_states\", \"init\": \"identity\", \"bias\": true, \"layers\": null, \"activation\": \"sigmoid\"}. "
            "Restore the file from the original checkpoint or re-save / re-convert it."
        )

    data = config.get(GATE_CONFIG_KEY)
    if data is None:
        raise bad(f"model_type {config.get('model_type')!r} but no {GATE_CONFIG_KEY!r} entry")
    if not isinstance(data, dict):
        raise bad(f"{GATE_CONFIG_KEY!r} is a {type(data).__name__} ({data!r}), not an object")
    try:
        gate = GateConfig.from_dict(dict(data))
        num_layers = config.get("num_hidden_layers")
        if isinstance(num_layers, int):
            gate.layer_indices(num_layers)
    except (GateConfigError, TypeError) as exc:
        raise bad(f"invalid {GATE_CONFIG_KEY!r}: {str(exc).rstrip('.')}") from exc
    return gate


def expected_gate_shapes(gate: GateConfig, config: Mapping, config_path: Path | str) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of every gate tensor a checkpoint with this config must hold."""
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        head_dim = int(config.get("head_dim") or hidden // heads)
        num_layers = int(config["num_hidden_layers"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise GatedCheckpointError(
            f"{config_path}: missing or invalid attention sizes ({type(exc).__name__}: {exc}); fix config.json."
        ) from exc
    rows = heads * head_dim if gate.granularity == "elementwise" else heads
    columns = hidden if gate.gate_input == "hidden_states" else heads * head_dim
    return {
        name: ((rows, columns) if name.endswith(".weight") else (rows,))
        for name in gate_tensor_names(gate, num_layers)
    }


def check_gate_tensors(
    gate: GateConfig,
    config: Mapping,
    config_path: Path | str,
    entries: Mapping[str, tuple[str, tuple[int, ...]]],
    files: Mapping[str, Path | str],
    listing: Path | str,
) -> None:
    """Every gate tensor the config asks for is present with its shape and a floating dtype, and there are no others.

    Args:
        entries: ``{tensor name: (safetensors dtype, shape)}`` of the whole checkpoint.
        files: ``{tensor name: file holding it}`` (for the messages).
        listing: the file that lists the tensors (the index, or the single weight file), named for missing tensors.
    """
    expected = expected_gate_shapes(gate, config, config_path)
    marker = ".attn_gate."
    problems = []
    for name, shape in expected.items():
        if name not in entries:
            problems.append(f"{listing}: missing gate tensors [{name!r}]")
            continue
        dtype, found = entries[name]
        if tuple(found) != shape:
            problems.append(f"{files[name]}: wrong-shaped gate tensors [{name!r}] (shape {tuple(found)}, the config needs {shape})")
        if dtype not in FLOAT_DTYPES:
            problems.append(f"{files[name]}: gate tensors of a non-float dtype [{name!r}] (dtype {dtype})")
    for name in sorted(entries):
        if marker in f".{name}" and name not in expected:
            problems.append(f"{files[name]}: gate tensors the gate config in {config_path} has no place for [{name!r}]")
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise GatedCheckpointError(
            f"Gated checkpoint does not match its gate config: {shown}. A truncated or hand-edited checkpoint? "
            "Re-save it from the patched model or re-convert it; it is not loaded with made-up gates."
        )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GatedCheckpointError(f"{path}: cannot read it as JSON ({exc}); restore or re-download the file.") from exc
    if not isinstance(data, dict):
        raise GatedCheckpointError(f"{path}: expected a JSON object; restore or re-download the file.")
    return data


def weight_file_entries(directory: Path) -> Optional[tuple[dict, dict, Path]]:
    """``(entries, files, listing)`` of the safetensors weights of a local checkpoint, every file's header validated;
    None when it has no safetensors weights (e.g. a ``pytorch_model.bin``, which transformers reads with
    ``weights_only=True``)."""
    single, index = directory / SINGLE_FILE, directory / INDEX_FILE
    if single.exists():  # transformers gives it precedence over an index
        paths, listing, weight_map = [single], single, None
    elif index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
            raise GatedCheckpointError(f"{index}: no valid weight_map; restore or re-download the index.")
        listing = index
        paths = [directory / name for name in dict.fromkeys(weight_map.values())]
        for path in paths:
            if not path.is_file():
                raise GatedCheckpointError(
                    f"{path}: listed in {index} but missing; download or copy the complete checkpoint."
                )
    else:
        return None
    entries: dict = {}
    files: dict = {}
    for path in paths:
        for name, info in read_safetensors_header(path).items():
            entries[name] = (info["dtype"], tuple(info["shape"]))
            files[name] = path
    if weight_map is not None:
        for name, file in weight_map.items():
            if files.get(name) is None or Path(files[name]).name != file:
                raise GatedCheckpointError(
                    f"{directory / file}: does not hold {name!r}, which {index} lists there; the checkpoint is "
                    "incomplete or mixed up. Download or copy it again."
                )
    return entries, files, listing


def check_local_checkpoint(directory: Path | str) -> None:
    """Validate a local gated checkpoint directory before loading it (no-op for anything else)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        return
    config = _read_json(config_path)
    if not str(config.get("model_type", "")).startswith("gated_"):
        return
    gate = gate_config_from(config, config_path)
    found = weight_file_entries(directory)
    if found is None:
        return
    entries, files, listing = found
    check_gate_tensors(gate, config, config_path, entries, files, listing)


def check_no_dropped_weights(loading_info: Mapping, source: Path | str) -> None:
    """Refuse a gated checkpoint whose tensors did not all land in the model, or that lacks some of the model's:
    transformers only warns and would initialise the missing ones (e.g. a tensor name with a flipped bit)."""
    unexpected = sorted(loading_info.get("unexpected_keys", ()))
    missing = sorted(loading_info.get("missing_keys", ()))
    if not unexpected and not missing:
        return
    where = {}
    if isinstance(source, Path) and source.is_dir():
        found = weight_file_entries(source)
        where = found[1] if found else {}
    described = [f"{where.get(name, source)}: tensor {name!r} that the model has no place for" for name in unexpected]
    described += [f"{source}: no tensor {name!r}" for name in missing]
    shown = "; ".join(described[:4]) + (f"; and {len(described) - 4} more" if len(described) > 4 else "")
    raise GatedCheckpointError(
        f"Gated checkpoint {source} does not match its model: {shown}. Loading it would drop or re-initialise weights. "
        "Restore or re-download the checkpoint (a corrupt or hand-edited file?)."
    )
