"""A gated checkpoint served by a vLLM without gated_patch (not installed, or not loaded): vLLM's Transformers backend
builds the checkpoint's own remote code (``trust_remote_code=True``), which gates the attention as the plugin does."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_gates, save_with_tokenizer, tiny_model, transformers_greedy
from safetensors.torch import load_file, save_file
from test_parallel_and_server import TWO_CORES
from test_serving import assert_gates_act, assert_same_answers

import gated_patch as gp

HERE = Path(__file__).parent
FAMILIES = ("llama", "gemma2", "phi")  # vLLM has classes of its own for Llama and Gemma2, none for Phi


def test_the_remote_code_serves_each_family_exactly_without_the_plugin(tmp_path):
    want, paths = {}, []
    for model_type in FAMILIES:
        model = gp.patch_model(tiny_model(model_type), gp.GateConfig(granularity="headwise"))
        randomize_gates(model)
        paths.append(save_with_tokenizer(model, tmp_path / model_type))
        want[paths[-1]] = transformers_greedy(model)
        assert_gates_act(want[paths[-1]], transformers_greedy(tiny_model(model_type)))
    subprocess.run([sys.executable, str(HERE / "serve_without_plugin.py"), str(tmp_path / "answers.json"), *paths],
                   check=True, timeout=600, cwd=HERE)
    served = json.loads((tmp_path / "answers.json").read_text())
    for path in paths:
        assert served[path]["class"] == "TransformersForCausalLM"  # vLLM's backend, not the plugin's classes
        assert_same_answers([tuple(answer) for answer in served[path]["answers"]], want[path])


def test_tensor_parallel_2_without_the_plugin_splits_the_gate_by_the_remote_codes_plan(tmp_path):
    """The remote code's tensor-parallel plan gives the gate ``colwise``: vLLM's backend splits it with the heads."""
    model = gp.patch_model(tiny_model("phi"), gp.GateConfig(granularity="headwise"))
    randomize_gates(model)
    path = save_with_tokenizer(model, tmp_path / "phi")
    subprocess.run([sys.executable, str(HERE / "serve_without_plugin.py"), str(tmp_path / "answers.json"), path],
                   check=True, timeout=600, cwd=HERE, env={**os.environ, **TWO_CORES, "TENSOR_PARALLEL": "2"})
    served = json.loads((tmp_path / "answers.json").read_text())[path]
    assert served["class"] == "TransformersForCausalLM"
    assert_same_answers([tuple(answer) for answer in served["answers"]], transformers_greedy(model))


GATE = "model.layers.1.self_attn.attn_gate.weight"


@pytest.mark.parametrize("edit, message", [
    (lambda w: w.pop(GATE), r"1 gate tensors missing \(\['layers.1.self_attn.attn_gate.weight'\]\)"),
    (lambda w: w.update({GATE: torch.zeros(w[GATE].shape[0] + 1, w[GATE].shape[1])}), r"attn_gate.weight \(257, 256\): the config implies \(256, 256\)"),
    (lambda w: w.update({GATE.replace("weight", "bias"): torch.zeros(256)}), r"attn_gate.bias \(256,\): no gate of"),
    (lambda w: w.update({GATE.replace("1", "2", 1): w[GATE].clone()}), r"layers.2.self_attn.attn_gate.weight \(256, 256\): no gate of"),
], ids=["missing", "reshaped", "surplus-bias", "ungated-layer"])
def test_without_the_plugin_the_remote_code_refuses_a_broken_gate_tensor(tmp_path, edit, message):
    """vLLM's loader alone serves a missing gate as uninitialised memory, cuts a longer one and ignores a surplus bias;
    the remote code's ``load_weights`` (vLLM's loading hook) refuses each before anything is served."""
    model = gp.patch_model(tiny_model("llama"), gp.GateConfig(bias=False, layers=[0, 1]))
    path = save_with_tokenizer(model, tmp_path / "llama")
    weights = load_file(tmp_path / "llama" / "model.safetensors")
    edit(weights)
    save_file(weights, tmp_path / "llama" / "model.safetensors", metadata={"format": "pt"})
    done = subprocess.run([sys.executable, str(HERE / "serve_without_plugin.py"), str(tmp_path / "answers.json"), path],
                          timeout=600, cwd=HERE, capture_output=True, text=True)
    assert done.returncode != 0 and "GatedCheckpointError" in done.stderr and re.search(message, done.stderr), done.stderr[-3000:]
    assert not (tmp_path / "answers.json").exists()
