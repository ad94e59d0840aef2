"""examples/pretrain_fsdp.py under torchrun with FSDP2 (2 CPU processes) gives the one-process result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import single_threaded_env, torchrun
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import gated_patch

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "pretrain_fsdp.py"
SMALL = ["--steps", "6", "--batch-size", "4", "--seq-len", "32", "--d-model", "64", "--layers", "2",
         "--granularity", "headwise"]


@pytest.mark.slow  # two processes
def test_fsdp_pretraining_equals_one_process(tmp_path):
    one = subprocess.run([sys.executable, str(EXAMPLE), *SMALL, "--output-dir", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600, env=single_threaded_env())
    assert one.returncode == 0, one.stderr[-3000:]
    sharded = torchrun(str(EXAMPLE), *SMALL, "--output-dir", str(tmp_path / "fsdp"))
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    results = {run: json.loads((tmp_path / run / "results.json").read_text()) for run in ("one", "fsdp")}
    assert results["one"]["processes"] == 1 and results["fsdp"]["processes"] == 2
    assert results["fsdp"]["losses"] == pytest.approx(results["one"]["losses"], rel=1e-5)
    assert results["one"]["losses"][-1] < results["one"]["losses"][0]  # it trains
    weights = {run: load_file(tmp_path / run / "checkpoint" / "model.safetensors") for run in ("one", "fsdp")}
    assert sorted(weights["fsdp"]) == sorted(weights["one"]) and any("attn_gate" in name for name in weights["one"])
    for name, tensor in weights["one"].items():
        torch.testing.assert_close(weights["fsdp"][name], tensor, atol=1e-5, rtol=1e-5, msg=name)
    # saved from the FSDP2-wrapped model: a normal gated checkpoint
    configs = {run: json.loads((tmp_path / run / "checkpoint" / "config.json").read_text()) for run in ("one", "fsdp")}
    assert configs["fsdp"] == configs["one"] and configs["fsdp"]["architectures"] == ["GatedLlamaForCausalLM"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "checkpoint")
    assert gated_patch.gate_config(loaded).granularity == "headwise"
