"""PEFT recipes for attention output gates: gate-only, gates + LoRA, LoRA on the gate; a gate record beside every
saved adapter; loading that patches the base as recorded and never drops a gate tensor silently.

Named ``adapters`` (not ``peft``) so it never shadows the `peft` package."""

from .configs import (
    GATE_ONLY_ROUTES,
    check_gates_reproducible,
    gate_lora_config,
    gate_only_config,
    gates_and_lora_config,
    gates_reproducible,
)
from .model import (
    GatedPeftModelMixin,
    adapter_record,
    gate_storage,
    get_gated_peft_model,
    load_gated_adapter,
    verify_adapter_loaded,
)
from .optim import gate_param_groups
from .record import SIDECAR_NAME, GatedAdapterError, read_record

__all__ = [
    "GATE_ONLY_ROUTES",
    "SIDECAR_NAME",
    "GatedAdapterError",
    "GatedPeftModelMixin",
    "adapter_record",
    "check_gates_reproducible",
    "gate_lora_config",
    "gate_only_config",
    "gate_param_groups",
    "gate_storage",
    "gates_and_lora_config",
    "gates_reproducible",
    "get_gated_peft_model",
    "load_gated_adapter",
    "read_record",
    "verify_adapter_loaded",
]
