"""What PEFT really does with attention gates, in the releases gated_patch is tested with (0.21, the oldest, in
`make test-oldest`; the locked newest in `make test`). gated_patch.adapters is built on these facts; if a PEFT upgrade
changes one of them, these tests say which."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from peft import LNTuningConfig, LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.constants import DUMMY_TARGET_MODULES

import gated_patch
from conftest import randomize_gates, tiny_model
from packaging.version import Version

GATE = "attn_gate"


def _patched():
    model = tiny_model("llama")
    gated_patch.patch_model(model)
    return model


def _lora_module_names(model):
    return sorted(name for name, module in model.named_modules() if isinstance(module, LoraLayer))


def test_lora_target_modules_none_is_not_gate_only():
    peft_model = get_peft_model(_patched(), LoraConfig(target_modules=None, modules_to_save=[GATE]))
    names = _lora_module_names(peft_model)
    assert names, "target_modules=None added no LoRA layer"
    assert {name.rsplit(".", 1)[-1] for name in names} == {"q_proj", "v_proj"}  # Llama's default targets


def test_lora_target_modules_empty_list_raises():
    with pytest.raises(ValueError):  # NoMatchingPeftModuleError is a ValueError
        get_peft_model(_patched(), LoraConfig(target_modules=[], modules_to_save=[GATE]))


def test_dummy_target_modules_adds_no_lora_and_trains_only_the_gate():
    assert DUMMY_TARGET_MODULES == "dummy-target-modules"
    peft_model = get_peft_model(_patched(), LoraConfig(target_modules=DUMMY_TARGET_MODULES, modules_to_save=[GATE]))
    assert _lora_module_names(peft_model) == []
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(f".{GATE}.modules_to_save." in n for n in trainable)


def test_modules_to_save_adapter_loads_onto_ungated_base_dropping_the_gates(tmp_path):
    """No error: the gate tensors are dropped. PEFT 0.21 says nothing; 0.22 warns, naming them."""
    peft_model = get_peft_model(_patched(), LoraConfig(target_modules=DUMMY_TARGET_MODULES, modules_to_save=[GATE]))
    randomize_gates(peft_model)
    peft_model.save_pretrained(tmp_path)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)  # no error
    assert not any(GATE in name for name, _ in loaded.named_parameters())  # the gate tensors are gone
    warned = [str(w.message) for w in caught if GATE in str(w.message)]
    if Version(peft.__version__) >= Version("0.22.0"):
        assert warned and "unexpected adapter keys" in warned[0]
    else:
        assert warned == []
    # load_adapter does report them, as unexpected keys
    result = loaded.load_adapter(tmp_path, adapter_name="again")
    assert any(GATE in key for key in result.unexpected_keys)


def test_ln_tuning_on_gate_linear_and_on_ungated_base(tmp_path):
    model = _patched()
    x = torch.randint(3, 97, (1, 9))
    peft_model = get_peft_model(model, LNTuningConfig(target_modules=[GATE]))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(f".{GATE}.ln_tuning_layers." in n for n in trainable)
    before = peft_model(x).logits
    randomize_gates(peft_model)  # changes the trained copy: the forward must use it
    assert not torch.allclose(peft_model(x).logits, before)
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=GATE):  # NoMatchingPeftModuleError, without saying how to fix it
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path)


def test_suffix_matching_gate_proj_is_the_mlp_and_attn_gate_is_only_the_gate():
    peft_model = get_peft_model(_patched(), LoraConfig(target_modules=["gate_proj"]))
    assert all(name.endswith("mlp.gate_proj") for name in _lora_module_names(peft_model))
    peft_model = get_peft_model(_patched(), LoraConfig(target_modules=[GATE]))
    names = _lora_module_names(peft_model)
    assert len(names) == 3 and all(name.endswith(f"self_attn.{GATE}") for name in names)


def test_adapter_config_json_drops_unknown_keys(tmp_path):
    peft_model = get_peft_model(_patched(), LNTuningConfig(target_modules=[GATE]))
    peft_model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data["attn_output_gate"] = {"granularity": "headwise"}
    path.write_text(json.dumps(data))
    config = PeftConfig.from_pretrained(tmp_path)
    assert not hasattr(config, "attn_output_gate")
