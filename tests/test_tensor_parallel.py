"""Tensor parallelism (transformers' tp_plan and distributed_config) on 2 CPU processes: gated checkpoints give the
one-process logits and tokens, with and without the plugin; what cannot be split by heads is refused at load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_gates, tiny_model, torchrun
from safetensors.torch import load_file

import gated_patch
from gated_patch import GateConfig

WORKER = Path(__file__).parent / "distributed" / "tp_worker.py"
ROUTES = ("tp_plan", "distributed_config")
CASES = {  # name: (family, gate config or None for an ungated checkpoint)
    "ungated": ("llama", None),
    "elementwise": ("llama", GateConfig()),
    "headwise": ("llama", GateConfig(granularity="headwise", bias=False)),
    "qwen3_headwise_silu_paper": ("qwen3", GateConfig(granularity="headwise", init="paper", activation="silu")),
    "qwen2_elementwise_layers": ("qwen2", GateConfig(layers=[0, 2])),
    "attn_output": ("llama", GateConfig(gate_input="attn_output")),
}
REFUSED = {"attn_output"}


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    cases = []
    for name, (family, gate) in CASES.items():
        model = tiny_model(family)
        if gate is not None:
            gated_patch.patch_model(model, gate)
            randomize_gates(model)
        model.save_pretrained(root / name)
        ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            reference = {"input_ids": ids, "logits": model(ids).logits,
                         "generated": model.generate(ids[:1, :4], max_new_tokens=4, do_sample=False)}
        torch.save(reference, root / name / "reference.pt")
        cases.append({"name": name, "path": str(root / name), "routes": list(ROUTES)})
    cases[1].update(save=str(root / "saved_from_tp"), patch_sharded=str(root / "ungated"))
    (root / "cases.json").write_text(json.dumps(cases))
    completed = torchrun(str(WORKER), str(root / "cases.json"), str(root / "results.json"))
    assert completed.returncode == 0, completed.stderr[-4000:]
    return root, json.loads((root / "results.json").read_text())


@pytest.mark.slow  # two processes
@pytest.mark.parametrize("loader", ["remote", "plugin"])
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", [name for name in CASES if name not in REFUSED])
def test_tp_logits_and_tokens_equal_one_process(tp_results, name, route, loader):
    result = tp_results[1][f"{name}|{route}|{loader}"]
    assert "error" not in result, result.get("traceback")
    assert result["max_diff"] < 1e-5  # the split sums in another order; a gate on the wrong heads differs by ~0.1
    assert result["generate_equal"]


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["remote", "plugin"])
@pytest.mark.parametrize("route", ROUTES)
def test_tp_refuses_a_gate_on_the_attention_output(tp_results, route, loader):
    result = tp_results[1][f"attn_output|{route}|{loader}"]
    assert "GatedCheckpointError" in result["error"]
    assert "not split across ranks as its heads are" in result["error"] and "load without tp_plan" in result["error"]


@pytest.mark.slow
def test_checkpoint_saved_from_tp_is_the_normal_gated_format(tp_results):
    root = tp_results[0]
    original, saved = load_file(root / "elementwise" / "model.safetensors"), load_file(root / "saved_from_tp" / "model.safetensors")
    assert sorted(saved) == sorted(original)
    assert all(torch.equal(saved[key], original[key]) for key in original)
    assert json.loads((root / "saved_from_tp" / "config.json").read_text())["model_type"] == "gated_llama"


@pytest.mark.slow
def test_patching_a_tp_sharded_model_is_refused(tp_results):
    for route in ROUTES:
        message = tp_results[1][f"elementwise|{route}|plugin"]["patch_sharded"]
        assert message.startswith("UnsupportedModelError") and "Patch the model before sharding it" in message


@pytest.mark.parametrize("gate, style", [(GateConfig(), "colwise"), (GateConfig(granularity="headwise"), "colwise"),
                                         (GateConfig(gate_input="attn_output"), None)])
def test_tp_plan_entry_of_the_gate(gate, style):
    model = tiny_model("llama")
    before = dict(model.tp_plan)
    gated_patch.patch_model(model, gate)
    assert model.tp_plan.get("model.layers.*.self_attn.attn_gate") == style
    assert {key: value for key, value in model.tp_plan.items() if "attn_gate" not in key} == before
    gated_patch.unpatch_model(model)
    assert model.tp_plan == before

