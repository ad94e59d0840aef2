"""Gated checkpoints without the plugin: a subprocess in which `gated_patch` cannot be imported loads them with
``trust_remote_code=True`` (equal logits), for the built-in families and for families registered at run time (OPT
with its own module paths), refuses them without it, refuses missing gate tensors, and refuses a transformers release
outside the file's range."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import FAMILIES, randomize_gates, tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, MixtralConfig, OPTConfig, Phi3Config

import gated_patch
from gated_patch import GateConfig, gate_config, patch_model
from gated_patch.core.model import GATE_MODULES_KEY
from gated_patch.core.versions import MAX_TRANSFORMERS, MIN_TRANSFORMERS

IDS = [[1, 5, 7, 9, 11, 13, 17, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]

GATES = {
    "llama": GateConfig(),
    "qwen2": GateConfig(granularity="headwise", bias=False),
    "mistral": GateConfig(gate_input="attn_output", layers=[0, 2]),
    "qwen3": GateConfig(init="paper", activation="silu"),
    "mixtral": GateConfig(granularity="headwise", layers=[1]),
    "phi3": GateConfig(activation="silu"),
    "opt": GateConfig(granularity="headwise", gate_input="attn_output"),
}
#: Families registered at run time: their config class, the registration, the class name expected. OPT puts its
#: layers and output projection elsewhere (`model.decoder.layers`, `out_proj`): the registration says where.
RUNTIME_FAMILIES = {
    "mixtral": (MixtralConfig, dict(attention_class="transformers.models.mixtral.modeling_mixtral:MixtralAttention"),
                "Mixtral"),
    "phi3": (Phi3Config, dict(attention_class="transformers.models.phi3.modeling_phi3:Phi3Attention"), "Phi3"),
    "opt": (OPTConfig, dict(attention_class="transformers.models.opt.modeling_opt:OPTAttention",
                            decoder_layers="model.decoder.layers", output_projection="out_proj"), "OPT"),
}
CLASS_NAMES = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral", "qwen3": "Qwen3",
               **{family: spec[2] for family, spec in RUNTIME_FAMILIES.items()}}

BLOCK_GATED_PATCH = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockGatedPatch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "gated_patch":
                raise ImportError("gated_patch is blocked in this test")

    sys.meta_path.insert(0, BlockGatedPatch())
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    try:
        import gated_patch  # noqa: F401
        sys.exit("gated_patch is importable: the test would not show loading without the plugin")
    except ImportError:
        pass
    """
)

SCRIPT = BLOCK_GATED_PATCH + textwrap.dedent(
    """
    checkpoints, ids, out = sys.argv[1], torch.tensor(json.loads(sys.argv[2])), sys.argv[3]
    torch.set_num_threads(int(sys.argv[5]))  # the parent's: reductions (MoE experts) split by thread count
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
        results[family + ":experts"] = model.config._experts_implementation
        with torch.no_grad():
            torch.save(model.eval()(ids).logits, f"{out}/{family}.pt")
        if family in ("llama", "mixtral"):
            model.save_pretrained(f"{out}/resaved-{family}")
    try:
        AutoModelForCausalLM.from_pretrained(f"{checkpoints}/broken", trust_remote_code=True)
        results["broken"] = "loaded"
    except Exception as exc:
        results["broken"] = f"{type(exc).__name__}: {exc}"
    print("RESULTS", json.dumps(results))
    """
)

WRONG_VERSION = BLOCK_GATED_PATCH + textwrap.dedent(
    """
    transformers.__version__ = sys.argv[2]  # what the remote code reads at import
    try:
        AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
        print("RESULT loaded")
    except Exception as exc:
        print("RESULT", f"{type(exc).__name__}: {exc}")
    """
)


def _run(tmp_path, script: str, *args: str) -> str:
    (tmp_path / "check.py").write_text(script)
    (tmp_path / "cwd").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(tmp_path / "check.py"), *args], cwd=tmp_path / "cwd", env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _runtime_family_model(family: str, seed: int):
    config_class = RUNTIME_FAMILIES[family][0]
    torch.manual_seed(seed)
    sizes = dict(ffn_dim=96, word_embed_proj_dim=64) if family == "opt" else dict(intermediate_size=96, num_key_value_heads=2)
    extra = {"num_local_experts": 2, "num_experts_per_tok": 1} if family == "mixtral" else {}
    config = config_class(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, pad_token_id=0,
                          bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **sizes, **extra)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@pytest.fixture
def runtime_families():
    for family, (_, registration, _) in RUNTIME_FAMILIES.items():
        gated_patch.register_model_type(family, **registration, overwrite=True)
    yield list(RUNTIME_FAMILIES)
    for family in RUNTIME_FAMILIES:
        gated_patch.unregister_model_type(family)


def test_loads_without_plugin_only_with_trust_remote_code(tmp_path, runtime_families):
    checkpoints, out = tmp_path / "checkpoints", tmp_path / "out"
    for path in (checkpoints, out):
        path.mkdir()
    families = [*FAMILIES, *runtime_families]
    ids = torch.tensor(IDS)
    references, experts = {}, {}
    for seed, family in enumerate(families):
        model = tiny_model(family, seed=seed) if family in FAMILIES else _runtime_family_model(family, seed)
        patch_model(model, GATES[family])
        randomize_gates(model, seed=seed + 10)
        with torch.no_grad():
            references[family] = model(ids).logits
        model.save_pretrained(checkpoints / family)
        reloaded = AutoModelForCausalLM.from_pretrained(checkpoints / family, attn_implementation="eager").eval()
        with torch.no_grad():  # with the plugin, too
            assert torch.equal(reloaded(ids).logits, references[family]), family
        experts[family] = model.config._experts_implementation
        if family == "mixtral":  # the experts kernel that transformers gives a class outside its own files (below)
            eager_experts = AutoModelForCausalLM.from_pretrained(checkpoints / family, attn_implementation="eager",
                                                                 experts_implementation="eager").eval()
            with torch.no_grad():
                references["mixtral-eager-experts"] = eager_experts(ids).logits
    modules = json.loads((checkpoints / "opt" / "config.json").read_text())[GATE_MODULES_KEY]
    assert modules == {"decoder_layers": "model.decoder.layers", "attention": "self_attn", "output_projection": "out_proj"}
    broken = checkpoints / "broken"
    tiny = tiny_model("llama")
    patch_model(tiny)
    tiny.save_pretrained(broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.0.self_attn.attn_gate.bias"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})

    stdout = _run(tmp_path, SCRIPT, str(checkpoints), json.dumps(IDS), str(out), json.dumps(families),
                  str(torch.get_num_threads()))
    results = json.loads(stdout.split("RESULTS ", 1)[1])
    for family in families:
        untrusted = results[family + ":untrusted"]
        assert untrusted.startswith("ValueError") and "trust_remote_code" in untrusted, untrusted
        assert results[family + ":class"].startswith("transformers_modules.")
        assert results[family + ":class"].endswith(f".modeling_gated_attention.Gated{CLASS_NAMES[family]}ForCausalLM")
        if family == "mixtral":  # transformers gives classes outside its own files its eager MoE kernels
            assert results["mixtral:experts"] == "eager" and experts["mixtral"] == "grouped_mm"
            assert torch.equal(torch.load(out / f"{family}.pt"), references["mixtral-eager-experts"])
            torch.testing.assert_close(torch.load(out / f"{family}.pt"), references[family], rtol=0, atol=1e-6)
        else:
            assert torch.equal(torch.load(out / f"{family}.pt"), references[family]), family
    assert results["broken"].startswith("GatedCheckpointError")
    assert "missing tensors ['model.layers.0.self_attn.attn_gate.bias']" in results["broken"]

    # a checkpoint re-saved by the remote code is a gated checkpoint the plugin loads back identically
    for family in ("llama", "mixtral"):
        config = json.loads((out / f"resaved-{family}" / "config.json").read_text())
        assert config["model_type"] == f"gated_{family}" and "AutoModelForCausalLM" in config["auto_map"]
        reloaded = AutoModelForCausalLM.from_pretrained(out / f"resaved-{family}", attn_implementation="eager").eval()
        assert gate_config(reloaded) == GATES[family]
        with torch.no_grad():
            assert torch.equal(reloaded(ids).logits, references[family])


@pytest.mark.parametrize("version", ["5.12.3", MAX_TRANSFORMERS])
def test_remote_code_refuses_transformers_outside_its_range(tmp_path, version):
    model = tiny_model("llama")
    patch_model(model)
    model.save_pretrained(tmp_path / "gated")
    stdout = _run(tmp_path, WRONG_VERSION, str(tmp_path / "gated"), version)
    result = stdout.split("RESULT ", 1)[1].strip()
    assert result.startswith("UpstreamStructureError"), result
    assert f"transformers>={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS}" in result and f"transformers {version} is installed" in result
