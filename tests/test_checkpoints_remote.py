"""Gated checkpoints without the plugin: a subprocess in which `gated_patch` cannot be imported loads them with
``trust_remote_code=True`` (equal logits), refuses them without it, and refuses missing gate tensors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch
from conftest import FAMILIES, randomize_gates, tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from gated_patch import GateConfig, gate_config, patch_model

IDS = [[1, 5, 7, 9, 11, 13, 17, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]

GATES = {
    "llama": GateConfig(),
    "qwen2": GateConfig(granularity="headwise", bias=False),
    "mistral": GateConfig(gate_input="attn_output", layers=[0, 2]),
    "qwen3": GateConfig(init="paper", activation="silu"),
}

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockGatedPatch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "gated_patch":
                raise ImportError("gated_patch is blocked in this test")

    sys.meta_path.insert(0, BlockGatedPatch())
    import torch
    from transformers import AutoModelForCausalLM

    try:
        import gated_patch  # noqa: F401
        sys.exit("gated_patch is importable: the test would not show loading without the plugin")
    except ImportError:
        pass
    checkpoints, ids, out = sys.argv[1], torch.tensor(json.loads(sys.argv[2])), sys.argv[3]
    results = {}
    for family in json.loads(sys.argv[4]):
        path = f"{checkpoints}/{family}"
        try:
            AutoModelForCausalLM.from_pretrained(path)
            results[family + ":untrusted"] = "loaded"
        except Exception as exc:
            results[family + ":untrusted"] = f"{type(exc).__name__}: {exc}"
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, attn_implementation="eager")
        results[family + ":class"] = f"{type(model).__module__}.{type(model).__name__}"
        with torch.no_grad():
            torch.save(model.eval()(ids).logits, f"{out}/{family}.pt")
        if family == "llama":
            model.save_pretrained(f"{out}/resaved")
    try:
        AutoModelForCausalLM.from_pretrained(f"{checkpoints}/broken", trust_remote_code=True)
        results["broken"] = "loaded"
    except Exception as exc:
        results["broken"] = f"{type(exc).__name__}: {exc}"
    print("RESULTS", json.dumps(results))
    """
)


def test_loads_without_plugin_only_with_trust_remote_code(tmp_path):
    checkpoints, out, cwd = tmp_path / "checkpoints", tmp_path / "out", tmp_path / "cwd"
    for path in (checkpoints, out, cwd):
        path.mkdir()
    ids = torch.tensor(IDS)
    references = {}
    for seed, family in enumerate(FAMILIES):
        model = tiny_model(family, seed=seed)
        patch_model(model, GATES[family])
        randomize_gates(model, seed=seed + 10)
        with torch.no_grad():
            references[family] = model(ids).logits
        model.save_pretrained(checkpoints / family)
    broken = checkpoints / "broken"
    tiny = tiny_model("llama")
    patch_model(tiny)
    tiny.save_pretrained(broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.0.self_attn.attn_gate.bias"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})

    (tmp_path / "check.py").write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "check.py"), str(checkpoints), json.dumps(IDS), str(out), json.dumps(FAMILIES)],
        cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULTS ", 1)[1])

    for family in FAMILIES:
        assert results[family + ":untrusted"].startswith("ValueError") and "trust_remote_code" in results[
            family + ":untrusted"
        ]
        assert results[family + ":class"].startswith("transformers_modules.")
        assert results[family + ":class"].endswith(".modeling_gated_attention.Gated" + {
            "llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral", "qwen3": "Qwen3"}[family] + "ForCausalLM")
        assert torch.equal(torch.load(out / f"{family}.pt"), references[family]), family
    assert results["broken"].startswith("GatedCheckpointError") and "missing gate tensors" in results["broken"]

    # a checkpoint re-saved by the remote code is a gated checkpoint the plugin loads back identically
    config = json.loads((out / "resaved" / "config.json").read_text())
    assert config["model_type"] == "gated_llama" and "AutoModelForCausalLM" in config["auto_map"]
    reloaded = AutoModelForCausalLM.from_pretrained(out / "resaved", attn_implementation="eager").eval()
    assert gate_config(reloaded) == GATES["llama"]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, references["llama"])
