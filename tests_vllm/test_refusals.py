"""Every broken gated checkpoint, unsupported vLLM or unfit attention class fails loudly before anything is served."""

from __future__ import annotations

import json
import re

import pytest
from conftest import randomize_gates, save_with_tokenizer, tiny_model, vllm_engine
from safetensors.torch import load_file, save_file

import gated_patch as gp
from gated_patch import guards
from gated_patch.core.errors import GateConfigError, GatedCheckpointError, UpstreamStructureError
from gated_patch.vllm import models as vllm_models


def gated_checkpoint(tmp_path, model_type="llama"):
    model = gp.patch_model(tiny_model(model_type), gp.GateConfig(bias=False, layers=[0, 1]))
    randomize_gates(model)
    return tmp_path / "gated", save_with_tokenizer(model, tmp_path / "gated")


@pytest.fixture
def checkpoint(tmp_path):
    return gated_checkpoint(tmp_path)


def edit_weights(path, edit):
    weights = load_file(path / "model.safetensors")
    edit(weights)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


def edit_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


GATE = "model.layers.1.self_attn.attn_gate"
#: the messages name each tensor as the model checking it does: vLLM's class (Llama) from the root, ``model.layers...``;
#: on the Transformers backend (Phi) the gated transformers model inside it, ``layers...``
BROKEN = {
    "missing gate weight": (lambda w: w.pop(f"{GATE}.weight"), GatedCheckpointError,
                            "layers.1.self_attn.attn_gate.weight']). Truncated?"),
    "surplus gate bias": (lambda w: w.update({f"{GATE}.bias": w[f"{GATE}.weight"][:, 0].clone()}),
                          GatedCheckpointError, "layers.1.self_attn.attn_gate.bias (256,): no gate of"),
    "gate of an ungated layer": (
        lambda w: w.update({"model.layers.2.self_attn.attn_gate.weight": w[f"{GATE}.weight"].clone()}),
        GatedCheckpointError, "layers.2.self_attn.attn_gate.weight (256, 256): no gate of"),
    "wrong-shaped gate": (lambda w: w.update({f"{GATE}.weight": w[f"{GATE}.weight"][:4].clone()}),
                          GatedCheckpointError, "layers.1.self_attn.attn_gate.weight (4, 256): the config implies (256, 256)"),
}


@pytest.mark.parametrize("model_type", ["llama", "phi"], ids=["vllm-class", "transformers-backend"])
@pytest.mark.parametrize("name", BROKEN)
def test_a_broken_gate_tensor_is_refused_naming_it(name, model_type, tmp_path):
    """On both routes: vLLM's own class (Llama) and vLLM's Transformers backend (Phi, which vLLM has no class for)."""
    path, _ = gated_checkpoint(tmp_path, model_type)
    edit, error, message = BROKEN[name]
    edit_weights(path, edit)
    with pytest.raises(error, match=re.escape(message)):
        vllm_engine(path)


def test_a_gate_config_the_plugin_cannot_run_is_refused(checkpoint):
    path, _ = checkpoint
    edit_config(path, lambda c: c["attn_output_gate"].update(activation="tanh"))
    with pytest.raises(GateConfigError, match="tanh"):
        vllm_engine(path)


def test_a_vllm_outside_the_declared_range_is_refused(checkpoint, monkeypatch):
    path, _ = checkpoint
    monkeypatch.setattr(vllm_models.vllm, "__version__", "0.33.1")
    with pytest.raises(UpstreamStructureError, match=r"supports vllm>=0\.32\.0,<0\.33\.0; vllm 0\.33\.1 is installed"):
        vllm_engine(path)


def test_a_newer_vllm_is_served_only_when_the_user_opts_in(monkeypatch):
    """GATED_PATCH_ALLOW_UNTESTED_VLLM=1 lets a newer vLLM (a GPU build) through with a warning; never an older one."""
    with pytest.raises(UpstreamStructureError, match="GATED_PATCH_ALLOW_UNTESTED_VLLM=1"):
        vllm_models.check_vllm_version("0.34.0")
    monkeypatch.setenv("GATED_PATCH_ALLOW_UNTESTED_VLLM", "1")
    with pytest.warns(UserWarning, match=r"vLLM 0\.34\.0, newer than the tested vllm>=0\.32\.0,<0\.33\.0"):
        vllm_models.check_vllm_version("0.34.0")
    with pytest.raises(UpstreamStructureError, match=r"vllm 0\.31\.2 is installed"):
        vllm_models.check_vllm_version("0.31.2")
    monkeypatch.setenv("GATED_PATCH_ALLOW_UNTESTED_VLLM", "yes")  # only 1 opts in
    with pytest.raises(UpstreamStructureError):
        vllm_models.check_vllm_version("0.34.0")


def test_opting_in_keeps_the_attention_structure_guard(checkpoint, monkeypatch, request):
    """With the opt-in and a newer version, an attention class that no longer fits is still refused."""
    from vllm.model_executor.models.llama import LlamaAttention

    path, _ = checkpoint
    monkeypatch.setenv("GATED_PATCH_ALLOW_UNTESTED_VLLM", "1")
    monkeypatch.setattr(vllm_models.vllm, "__version__", "0.34.0")
    monkeypatch.setattr(LlamaAttention, "forward", lambda self, hidden_states: hidden_states)  # as if vLLM changed it
    guards.forward_source.cache_clear()  # read per class once per process: a vLLM does not change while it runs
    request.addfinalizer(guards.forward_source.cache_clear)
    with pytest.warns(UserWarning, match="newer than the tested"), pytest.raises(
            UpstreamStructureError, match=r"does not call self\.o_proj\(\.\.\.\) exactly once"):
        vllm_engine(path)


def test_an_attention_class_whose_forward_does_not_fit_is_refused():
    from vllm.model_executor.models.llama import LlamaAttention

    class Reordered(LlamaAttention):
        def forward(self, positions, hidden_states):
            out, _ = self.o_proj(hidden_states)
            return self.o_proj(out)[0]

    attention = Reordered.__new__(Reordered)
    with pytest.raises(UpstreamStructureError, match=r"does not call self\.o_proj\(\.\.\.\) exactly once"):
        vllm_models.check_vllm_attention(attention, "model.layers.0.self_attn")


def test_an_architecture_vllm_has_no_class_for_goes_to_the_transformers_backend():
    """The route: vLLM's own class where it has one, its Transformers backend (with the gate checks) otherwise."""
    assert vllm_models.gated_model_class("LlamaForCausalLM").__bases__[0] is vllm_models.GatedVllmModelMixin
    assert vllm_models.gated_model_class("PhiForCausalLM").__name__ == "GatedTransformersForCausalLM"
    assert vllm_models.gated_model_class("NoSuchForCausalLM").__name__ == "GatedTransformersForCausalLM"


def test_a_config_vllm_reads_differently_from_transformers_is_refused(tmp_path):
    """vLLM's Qwen2 ignores head_dim (it uses hidden_size / heads): transformers' model is not the one vLLM builds."""
    from conftest import TINY, AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen2", **{**TINY, "hidden_size": 128})  # 4 heads of 64, not 128 / 4
    model = gp.patch_model(AutoModelForCausalLM.from_config(config), gp.GateConfig())
    with pytest.raises(UpstreamStructureError, match=r"has heads of 32, so its gate would be \(128, 128\), but the "
                                                     r"config implies \(256, 128\)"):
        vllm_engine(save_with_tokenizer(model, tmp_path / "gated"))


def test_lora_serving_of_a_gated_checkpoint_is_refused(checkpoint):
    """vLLM's LoRA layers replace o_proj, which applies the gate: the gate would vanish."""
    _, path = checkpoint
    with pytest.raises(UpstreamStructureError, match="Merge the adapter into the gated model"):
        vllm_engine(path, enable_lora=True)
