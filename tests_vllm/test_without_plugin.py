"""A gated checkpoint served by a vLLM without gated_patch (not installed, or not loaded): vLLM's Transformers backend
builds the checkpoint's own remote code (``trust_remote_code=True``), which gates the attention as the plugin does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def test_without_the_plugin_vllm_refuses_a_gate_tensor_of_an_ungated_layer(tmp_path):
    """vLLM's own check on this route: a tensor the model has no module for. (It ignores a surplus ``.bias`` and does
    not notice a missing or wrong-shaped gate tensor: docs/serving.md, "vLLM without the plugin".)"""
    model = gp.patch_model(tiny_model("llama"), gp.GateConfig(bias=False, layers=[0, 1]))
    path = save_with_tokenizer(model, tmp_path / "llama")
    weights = load_file(tmp_path / "llama" / "model.safetensors")
    weights["model.layers.2.self_attn.attn_gate.weight"] = weights["model.layers.1.self_attn.attn_gate.weight"].clone()
    save_file(weights, tmp_path / "llama" / "model.safetensors", metadata={"format": "pt"})
    done = subprocess.run([sys.executable, str(HERE / "serve_without_plugin.py"), str(tmp_path / "answers.json"), path],
                          timeout=600, cwd=HERE, capture_output=True, text=True)
    assert done.returncode != 0 and "model.layers.2.self_attn.attn_gate" in done.stderr
    assert not (tmp_path / "answers.json").exists()
