"""gated_patch: add the gated attention of Qiu et al. (2025) to Hugging Face Transformers models."""

from .core.attention import GATE_MODULE_NAME
from .core.config import GateConfig
from .core.errors import (
    AlreadyPatchedError,
    GateConfigError,
    GatedCheckpointError,
    GatedPatchError,
    NotPatchedError,
    UnsupportedModelError,
    UpstreamStructureError,
)
from .core.gate import AttentionGateLinear
from .fused import fuse_gates, is_fused, unfuse_gates
from .patching import gate_config, gate_parameters, gated_model_from_config, is_patched, patch_model, unpatch_model
from .registry import ModelFamily, get_model_family, register_model_type, registered_model_types, unregister_model_type

__version__ = "0.1.0"

from . import checkpoints  # noqa: E402  (after __version__) registers gated checkpoints with the Auto classes

__all__ = [
    "GATE_MODULE_NAME",
    "AlreadyPatchedError",
    "AttentionGateLinear",
    "GateConfig",
    "GateConfigError",
    "GatedCheckpointError",
    "GatedPatchError",
    "ModelFamily",
    "NotPatchedError",
    "UnsupportedModelError",
    "UpstreamStructureError",
    "fuse_gates",
    "gate_config",
    "gate_parameters",
    "gated_model_from_config",
    "get_model_family",
    "is_fused",
    "is_patched",
    "patch_model",
    "register_model_type",
    "registered_model_types",
    "unfuse_gates",
    "unpatch_model",
    "unregister_model_type",
]

# PEFT recipes (gated_patch.adapters): gate-only, gates + LoRA, LoRA on the gate; loading that patches the base.
from .adapters import (  # noqa: E402
    GatedAdapterError,
    gate_lora_config,
    gate_only_config,
    gates_and_lora_config,
    get_gated_peft_model,
    load_gated_adapter,
)

__all__ += [
    "GatedAdapterError",
    "gate_lora_config",
    "gate_only_config",
    "gates_and_lora_config",
    "get_gated_peft_model",
    "load_gated_adapter",
]
