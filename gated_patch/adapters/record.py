"""The adapter's gate record: a sidecar JSON file beside PEFT's ``adapter_config.json``.

PEFT drops unknown keys from ``adapter_config.json``, so the gate config an adapter was trained with, the gate
modules it expects and (for LoRA on the gate) a fingerprint of the base gates it was trained against live in
``gated_patch_adapter.json``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..core.gate import GATE_MODULE_NAME
from ..files import read_json, write_json
from ..gating import gated_attention_modules
from ..core.errors import GatedCheckpointError, GatedPatchError

SIDECAR_NAME = "gated_patch_adapter.json"
FORMAT = "gated_patch.adapter"
FORMAT_VERSION = 1

#: How an adapter stores the gates.
GATE_TENSORS_FULL = "full"  # whole gate weights (LNTuning copy or modules_to_save): independent of the base gates
GATE_TENSORS_DELTA = "delta"  # LoRA (or another additive tuner) on the gate: only valid on the same base gates
GATE_TENSORS_NONE = "none"  # the adapter does not touch the gates but was trained on a gated base


class GatedAdapterError(GatedPatchError, ValueError):
    """A gate adapter does not fit the model it is loaded onto, or a PEFT config cannot be used on gates."""


def original_gate(module: nn.Module) -> nn.Module:
    """The base gate behind PEFT wrappers (LoRA/LNTuning layers, modules_to_save wrappers)."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(module, "original_module") and isinstance(module.original_module, nn.Module):
            module = module.original_module
        elif hasattr(module, "get_base_layer") and module.get_base_layer() is not module:
            module = module.get_base_layer()
        else:
            break
    return module


def gate_module_names(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_modules()``) of the gate slots of a patched transformers model."""
    return [f"{name}.{GATE_MODULE_NAME}" if name else GATE_MODULE_NAME for name, _ in gated_attention_modules(model)]


def base_gate_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<slot>.weight": tensor, ...}`` of the base gates (behind any PEFT wrapper)."""
    tensors = {}
    for slot in gate_module_names(model):
        gate = original_gate(model.get_submodule(slot))
        for pname, param in gate.named_parameters(recurse=False):
            tensor = param.detach()
            if type(tensor) is not torch.Tensor and not hasattr(tensor, "full_tensor"):  # neither plain nor a DTensor
                raise GatedAdapterError(
                    f"Gate tensor {slot}.{pname} is a {type(tensor).__name__}, not a float tensor: the gates were quantized. "
                    "Quantize the model before patch_model (the gates stay float), or keep the gates out of the "
                    "quantization, e.g. torchao's quantize_(model, config, filter_fn=lambda m, fqn: "
                    "isinstance(m, torch.nn.Linear) and not fqn.endswith('attn_gate')).")
            tensors[f"{slot}.{pname}"] = tensor
    return tensors


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes (exact: any changed bit changes it). A sharded tensor (FSDP2,
    tensor parallelism) is gathered first: a collective, so every rank must call this."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        tensor = (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).to("cpu").contiguous()  # DTensor
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def write_record(directory: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write the sidecar atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return write_json(directory / SIDECAR_NAME, record, sort_keys=True)


def read_record(directory: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The sidecar of an adapter directory, or ``None`` when it has none (a plain PEFT adapter)."""
    path = Path(directory) / SIDECAR_NAME
    if not path.is_file():
        return None
    try:
        record = read_json(path, "re-save the adapter")
    except GatedCheckpointError as exc:
        raise GatedAdapterError(f"{exc} Or re-save the adapter.") from exc
    if record.get("format") != FORMAT:
        raise GatedAdapterError(f"{path} is not a gated_patch adapter record (missing format={FORMAT!r}).")
    if record.get("format_version", 0) > FORMAT_VERSION:
        raise GatedAdapterError(
            f"{path} has format_version {record.get('format_version')}, newer than this gated_patch supports "
            f"({FORMAT_VERSION}); upgrade gated_patch."
        )
    for key in ("gate_config", "gate_modules", "gate_tensors"):
        if key not in record:
            raise GatedAdapterError(f"{path} lacks the required key {key!r}; re-save the adapter.")
    return record
