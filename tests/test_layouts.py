"""Fused gate layouts (paper authors' Qwen3 code, Qwen3-Next): import into the plugin layout, export from it, exact
round trips. The reference is an independent forward of the fused layout written here from its description."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, tiny_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from conversion import convert as convert_cli
from gated_patch import GateConfig, gate_config, gated_model_from_config, patch_model

IDS = torch.tensor([[1, 5, 7, 9, 11, 13, 17, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
FLAGS = {"elementwise": "elementwise_attn_output_gate", "headwise": "headwise_attn_output_gate"}


def fused_reference(config, state_dict, layout: str, granularity: str):
    """An upstream model whose q_proj is fused and whose forward applies the fused gate (hooks), as the fused
    implementations do: paper: view [kv_heads, -1], split [d*G | gate]; qwen3-next: view [heads, 2d], chunk."""
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    heads, kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    group = heads // kv
    for layer in model.model.layers:
        attention = layer.self_attn
        old = attention.q_proj
        gate_rows = heads * d if granularity == "elementwise" else heads
        attention.q_proj = nn.Linear(old.in_features, heads * d + gate_rows, bias=old.bias is not None)
        store = {}

        def split(module, args, output, store=store):
            b, t, _ = output.shape
            if layout == "paper":
                grouped = output.view(b, t, kv, -1)
                query, gate = torch.split(grouped, [d * group, grouped.shape[-1] - d * group], dim=-1)
            else:
                query, gate = torch.chunk(output.view(b, t, heads, 2 * d), 2, dim=-1)
            store["gate"] = gate.reshape(b, t, -1)
            return query.reshape(b, t, heads * d)

        def gate_output(module, args, store=store):
            y, score = args[0], torch.sigmoid(store["gate"])
            if granularity == "headwise":
                return ((y.view(*y.shape[:-1], heads, d) * score.unsqueeze(-1)).view(y.shape),)
            return (y * score,)

        attention.q_proj.register_forward_hook(split)
        attention.o_proj.register_forward_pre_hook(gate_output)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model


def fused_checkpoint(path: Path, family: str, layout: str, granularity: str, seed: int = 0, **overrides):
    """A synthetic checkpoint in a fused layout (random weights) and its reference logits."""
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = fused_reference(config, None, layout, granularity)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.normal_(0, 0.3)
            if layer.self_attn.q_proj.bias is not None:
                layer.self_attn.q_proj.bias.normal_(0, 0.3)
        logits = model(IDS).logits
    path.mkdir()
    data = config.to_dict()
    if layout == "paper":
        data[FLAGS[granularity]] = True
        data[FLAGS["headwise" if granularity == "elementwise" else "elementwise"]] = False
    (path / "config.json").write_text(json.dumps(data))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors",
              metadata={"format": "pt"})
    return logits


def convert(capsys, *argv):
    capsys.readouterr()
    code = convert_cli.main([*map(str, argv), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


CASES = [
    ("qwen3", "paper", "elementwise", {}),
    ("qwen3", "paper", "headwise", {}),
    ("qwen3", "qwen3-next", "elementwise", {}),
    ("llama", "qwen3-next", "elementwise", {}),  # q_proj bias (attention_bias=True): the gate gets the bias rows
    ("qwen3", "paper", "elementwise", {"num_key_value_heads": 4}),  # G = 1
]


@pytest.mark.parametrize("family, layout, granularity, overrides", CASES)
def test_import_then_export_round_trip(tmp_path, capsys, family, layout, granularity, overrides):
    src = tmp_path / "fused"
    reference = fused_checkpoint(src, family, layout, granularity, **overrides)
    extra = [] if layout == "paper" else ["--source-layout", layout]
    convert(capsys, src, tmp_path / "plugin", *extra, "--verify")

    model = load(tmp_path / "plugin")
    has_bias = family == "llama"
    assert gate_config(model) == GateConfig(granularity=granularity, init="paper", bias=has_bias)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference, rtol=0, atol=1e-5)

    convert(capsys, tmp_path / "plugin", tmp_path / "back", "--target-layout", layout, "--verify")
    original = load_file(src / "model.safetensors")
    back = {}
    for file in (tmp_path / "back").glob("model-*.safetensors"):
        back.update(load_file(file))
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)  # bit-exact round trip
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["model_type"] == family and "attn_output_gate" not in config and "auto_map" not in config
    if layout == "paper":
        assert config[FLAGS[granularity]] is True


@pytest.mark.parametrize("layout, granularity", [("paper", "elementwise"), ("paper", "headwise"),
                                                 ("qwen3-next", "elementwise")])
def test_export_plugin_model_to_fused_layout(tmp_path, capsys, layout, granularity):
    config = tiny_config("qwen3")
    torch.manual_seed(0)
    model = gated_model_from_config(config, GateConfig(init="paper", bias=False, granularity=granularity),
                                    attn_implementation="eager").eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "attn_gate" in name:
                parameter.normal_(0, 0.5)
        reference = model(IDS).logits
    model.save_pretrained(tmp_path / "gated")
    convert(capsys, tmp_path / "gated", tmp_path / "fused", "--target-layout", layout)

    state = {}
    for file in (tmp_path / "fused").glob("model-*.safetensors"):
        state.update(load_file(file))
    fused = fused_reference(config, state, layout, granularity)
    with torch.no_grad():
        torch.testing.assert_close(fused(IDS).logits, reference, rtol=0, atol=1e-5)
    assert "gate-layout-" in (tmp_path / "fused" / "README.md").read_text()


def _saved(path, gate, family="qwen3", zero_bias=False):
    model = tiny_model(family)
    patch_model(model, gate)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "attn_gate" in name:
                parameter.copy_(torch.zeros_like(parameter) if name.endswith("bias") and zero_bias
                                else torch.randn_like(parameter))
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "gate, layout, zero_bias, message",
    [
        (GateConfig(bias=False), "paper", False, r"init='identity' computes 2 \* sigmoid\(xW \+ b \+ 0\).*no exact fused"),
        (GateConfig(init="paper", bias=False, granularity="headwise"), "qwen3-next", False,
         "qwen3-next layout has elementwise gates only"),
        (GateConfig(init="paper", bias=False, activation="silu"), "paper", False, "activation='silu'"),
        (GateConfig(init="paper", bias=False, layers=[1]), "paper", False, r"layers=\[1\] \(fused layouts gate every"),
        (GateConfig(init="paper", bias=True), "paper", False, "attn_gate.bias is non-zero, but q_proj has no bias"),
    ],
    ids=["identity", "headwise-qwen3-next", "silu", "layers", "bias"],
)
def test_inexact_exports_are_refused(tmp_path, capsys, gate, layout, zero_bias, message):
    import re

    _saved(tmp_path / "gated", gate, zero_bias=zero_bias)
    capsys.readouterr()
    assert convert_cli.main([str(tmp_path / "gated"), str(tmp_path / "out"), "--target-layout", layout]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_zero_gate_bias_exports_exactly(tmp_path, capsys):
    _saved(tmp_path / "gated", GateConfig(init="paper", bias=True), zero_bias=True)
    convert(capsys, tmp_path / "gated", tmp_path / "out", "--target-layout", "paper", "--verify")


def test_wide_q_proj_without_layout_is_refused(tmp_path, capsys):
    fused_checkpoint(tmp_path / "fused", "qwen3", "qwen3-next", "elementwise")
    capsys.readouterr()
    assert convert_cli.main([str(tmp_path / "fused"), str(tmp_path / "out")]) == 2
    assert "a fused gate layout? Pass --source-layout qwen3-next" in capsys.readouterr().err
