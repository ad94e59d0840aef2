"""Export to a native architecture: a gated Qwen3 becomes a plain transformers Qwen3.5 that computes exactly the same
function; gate configs and models with no exact native form are refused with the reason."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize_gates, tiny_model
from transformers import AutoModelForCausalLM

import gated_patch as gp
from conversion.convert import main as convert_main
from conversion.convert import convert
from gated_patch.core.errors import GatedCheckpointError

CONFIGS = {
    "elementwise, identity scale, bias": gp.GateConfig(),
    "headwise, identity scale, bias": gp.GateConfig(granularity="headwise"),
    "elementwise, paper, no bias": gp.GateConfig(init="paper", bias=False),
    "headwise, paper, layer subset": gp.GateConfig(granularity="headwise", init="paper", layers=[1]),
    "elementwise, identity, bias, layer subset": gp.GateConfig(layers=[0, 2]),
}


def gated_qwen3(gate: gp.GateConfig, **overrides):
    model = gp.patch_model(tiny_model("qwen3", **overrides), gate)
    randomize_gates(model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # norm weights away from 1, so that storing them as w - 1 is exercised
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(torch.empty(parameter.shape).uniform_(0.5, 1.5, generator=generator))
    return model


def export(model, tmp_path, **kwargs):
    model.save_pretrained(tmp_path / "gated")
    convert(str(tmp_path / "gated"), tmp_path / "native", target_layout="qwen3_5", progress=False, log=lambda _: None,
            **kwargs)
    return tmp_path / "native"


@pytest.mark.parametrize("name", CONFIGS)
def test_the_export_is_a_plain_qwen3_5_with_the_gated_logits(name, tmp_path):
    model = gated_qwen3(CONFIGS[name])
    native = AutoModelForCausalLM.from_pretrained(export(model, tmp_path), attn_implementation="eager").eval()
    assert type(native).__name__ == "Qwen3_5ForCausalLM" and not gp.is_patched(native)
    ids = torch.randint(3, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # bit for bit on some CPUs; a wider q_proj (headwise gates repeated per head dimension) can make BLAS sum in
        # another order (AMD EPYC: up to 3e-7)
        torch.testing.assert_close(native(ids).logits, model(ids).logits, atol=1e-6, rtol=0)
        ungated = gp.unpatch_model(gated_qwen3(CONFIGS[name]))(ids).logits
        assert not torch.allclose(ungated, model(ids).logits, atol=1e-3)  # the gates act, so equality means something
        kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(native.generate(ids[:1], **kwargs), model.generate(ids[:1], **kwargs))


def test_the_exported_config_is_native_and_the_checkpoint_has_no_remote_code(tmp_path):
    out = export(gated_qwen3(gp.GateConfig(granularity="headwise", bias=True)), tmp_path, verify=True)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3_5_text" and config["architectures"] == ["Qwen3_5ForCausalLM"]
    assert config["layer_types"] == ["full_attention"] * 3
    # llama.cpp's converter, mlx-lm and SGLang find full-attention layers through the interval (default 4: three in
    # four would be linear attention); llama.cpp's loader needs the linear-attention sizes even so
    assert config["full_attention_interval"] == 1
    assert {"linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
            "linear_num_value_heads"} <= set(config)
    assert config["rope_parameters"]["partial_rotary_factor"] == 1.0
    assert config["attention_bias"] is True and config["qkv_bias"] is True  # vLLM's Qwen3.5 reads qkv_bias
    assert not {"auto_map", "attn_output_gate", "attn_output_gate_modules"} & set(config)
    assert not list(out.glob("*.py"))
    weights = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert not [name for name in weights if "attn_gate" in name]
    assert {"model.layers.0.self_attn.k_proj.bias", "model.layers.0.self_attn.o_proj.bias"} <= set(weights)


REFUSED = {
    "silu": (dict(gate=gp.GateConfig(activation="silu")), "activation='silu'"),
    "attn_output": (dict(gate=gp.GateConfig(gate_input="attn_output")), "gate_input='attn_output'"),
    "llama": (dict(gate=gp.GateConfig(), family="llama"), "only a gated Qwen3 has an exact native form"),
    "sliding window": (dict(gate=gp.GateConfig(), use_sliding_window=True, sliding_window=8),
                       "sliding-window attention"),
    "attention bias": (dict(gate=gp.GateConfig(), attention_bias=True), "vLLM's Qwen3.5 has no o_proj bias"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_a_gated_model_with_no_exact_native_form_is_refused_with_the_reason(name, tmp_path):
    options, reason = REFUSED[name]
    options = dict(options)
    gate, family = options.pop("gate"), options.pop("family", "qwen3")
    model = gp.patch_model(tiny_model(family, **options), gate)
    with pytest.raises(GatedCheckpointError, match=f"Cannot export this gated model to the native qwen3_5 layout "
                                                   f"exactly: .*{reason}"):
        export(model, tmp_path)
    assert not (tmp_path / "native").exists()


def test_the_command_line_exports_and_refuses(tmp_path, capsys):
    gated_qwen3(gp.GateConfig()).save_pretrained(tmp_path / "gated")
    assert convert_main([str(tmp_path / "gated"), str(tmp_path / "native"), "--target-layout", "qwen3_5", "--verify",
                         "--no-progress"]) == 0
    assert "verify: OK, Qwen3_5ForCausalLM reproduces the gated logits (max |diff| 0)" in capsys.readouterr().out
    gp.patch_model(tiny_model("llama"), gp.GateConfig()).save_pretrained(tmp_path / "llama")
    assert convert_main([str(tmp_path / "llama"), str(tmp_path / "out"), "--target-layout", "qwen3_5"]) != 0
    assert "only a gated Qwen3 has an exact native form" in capsys.readouterr().err
