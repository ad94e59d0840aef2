"""gated_patch: add the gated attention of Qiu et al. (2025) to Hugging Face Transformers models."""

from .adapters import (
    GatedAdapterError,
    gate_lora_config,
    gate_only_config,
    gate_param_groups,
    gates_and_lora_config,
    get_gated_peft_model,
    load_gated_adapter,
)
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
from .core.gate import GATE_MODULE_NAME, AttentionGateLinear
from .families import (
    ModelFamily,
    family_for,
    get_model_family,
    register_model_type,
    registered_model_types,
    unregister_model_type,
)
from .patching import gate_config, gate_parameters, gated_model_from_config, is_patched, patch_model, unpatch_model
from .loading import intercept_concrete_loads, register_gated_auto_classes
from .sharding import fully_shard_gated
from .version import __version__

register_gated_auto_classes()
intercept_concrete_loads()

__all__ = [
    "GATE_MODULE_NAME",
    "AlreadyPatchedError",
    "AttentionGateLinear",
    "GateConfig",
    "GateConfigError",
    "GatedAdapterError",
    "GatedCheckpointError",
    "GatedPatchError",
    "ModelFamily",
    "NotPatchedError",
    "UnsupportedModelError",
    "UpstreamStructureError",
    "__version__",
    "family_for",
    "fully_shard_gated",
    "gate_config",
    "gate_lora_config",
    "gate_only_config",
    "gate_param_groups",
    "gate_parameters",
    "gated_model_from_config",
    "gates_and_lora_config",
    "get_gated_peft_model",
    "get_model_family",
    "is_patched",
    "load_gated_adapter",
    "patch_model",
    "register_model_type",
    "registered_model_types",
    "unpatch_model",
    "unregister_model_type",
]
