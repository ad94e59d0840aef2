"""examples/accelerate_fsdp2.yaml: accelerate's FSDP2 wrap policy picks exactly the modules `fully_shard_gated` shards.

accelerate does not run FSDP on CPU (with ``cpu=True`` it becomes DDP), so this checks the config, not a run."""

from __future__ import annotations

from pathlib import Path

import yaml
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from conftest import tiny_model

import gated_patch

CONFIG = Path(__file__).resolve().parent.parent / "examples" / "accelerate_fsdp2.yaml"


def test_accelerate_policy_wraps_what_fully_shard_gated_wraps():
    config = yaml.safe_load(CONFIG.read_text())
    fsdp = config["fsdp_config"]
    assert config["distributed_type"] == "FSDP" and fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # what save_pretrained of a gated model needs
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"].lower(),
        transformer_cls_names_to_wrap=fsdp["fsdp_transformer_layer_cls_to_wrap"].split(","),
        reshard_after_forward=fsdp["fsdp_reshard_after_forward"], state_dict_type=fsdp["fsdp_state_dict_type"])
    model = gated_patch.patch_model(tiny_model("llama"))
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = {name for name, module in model.named_modules() if policy(module)}
    assert wrapped == {f"model.layers.{index}" for index in range(3)}  # accelerate then shards the root as well
