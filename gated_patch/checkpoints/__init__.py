"""Gated checkpoints: the on-disk format (save / load with and without the plugin), its remote code, and layout
conversion to and from the fused gate layouts of other implementations."""

from .format import auto_map, checkpoint_family, gated_model_type, register_auto_classes, save_gated_pretrained
from .remote_code import REMOTE_CODE_FILE, remote_code_source, write_remote_code
from .remote_model import GATE_CONFIG_KEY, check_loaded_gates, gate_config_of, gate_tensor_names

register_auto_classes()

__all__ = [
    "GATE_CONFIG_KEY",
    "REMOTE_CODE_FILE",
    "auto_map",
    "check_loaded_gates",
    "checkpoint_family",
    "gate_config_of",
    "gate_tensor_names",
    "gated_model_type",
    "register_auto_classes",
    "remote_code_source",
    "save_gated_pretrained",
    "write_remote_code",
]
