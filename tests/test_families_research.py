"""The families attention-sink research uses, gated with no registration through the one mechanism: GPT-2 (a Conv1D
output projection), Pythia (GPT-NeoX: fused query/key/value, ``head_size``), Falcon, multi-head latent attention
(DeepSeek V2/V3: the gate acts per head on the value head size ``o_proj`` takes) and hybrids (Jamba, Bamba,
GraniteMoeHybrid, Nemotron-H, MiniMax: only the softmax-attention layers get a gate). Tiny models from each family's
own config (`benchmarks/family_coverage.py`); the save/load, remote-code and PEFT checks of every family run in
`tests/test_families.py`."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_gates
from torch import nn
from transformers import AutoModelForCausalLM

import gated_patch
from gated_patch import GateConfig
from gated_patch.diagnostics import inspect_model
from gated_patch.guards import forward_calls_projection_once

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import family_coverage  # noqa: E402

RESEARCH = ("gpt2", "gpt_neox", "falcon", "deepseek_v2", "deepseek_v3", "jamba", "bamba", "granitemoehybrid",
            "nemotron_h", "minimax")
HYBRIDS = {"jamba": [1], "bamba": [1], "granitemoehybrid": [1], "nemotron_h": [2], "minimax": [0]}  # attention layers
IDS = torch.tensor([[1, 5, 7, 9, 11, 13, 17, 3, 4, 5, 6, 7]])


def tiny(model_type: str, implementation: str = "eager", seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(family_coverage.tiny_config(model_type),
                                            attn_implementation=implementation).eval()


@torch.no_grad()
@pytest.mark.parametrize("model_type", RESEARCH)
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_identity_gates_reproduce_the_model_and_real_gates_act(model_type, implementation):
    model = tiny(model_type, implementation)
    reference = model(IDS).logits
    gated_patch.patch_model(model)
    assert (model(IDS).logits - reference).abs().max() <= 1e-5
    randomize_gates(model)
    assert (model(IDS).logits - reference).abs().max() > 1e-3  # the gates act on every family's attention output
    cached = model.generate(IDS[:, :6], max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(cached, model.generate(IDS[:, :6], max_new_tokens=4, do_sample=False, use_cache=False,
                                              pad_token_id=0))


@pytest.mark.parametrize("model_type", RESEARCH)
def test_the_output_projection_receives_exactly_y_times_gate(model_type):
    """Y * gate(X), written out from the gate's weights, against what the first gated layer's projection receives."""
    model = gated_patch.patch_model(tiny(model_type), GateConfig(granularity="headwise" if len(model_type) % 2 else
                                                                 "elementwise"))
    randomize_gates(model)
    family = gated_patch.family_for(model)
    x, y = family_coverage._first_layer_io(model, family)
    plain = tiny(model_type)  # the same weights (same seed), no gates
    _, plain_y = family_coverage._first_layer_io(plain, family)
    expected = family_coverage._independent_gate(plain_y, x, family_coverage._first_attention(model, family))
    assert (y - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("model_type, layers", HYBRIDS.items())
def test_a_hybrid_gates_its_softmax_attention_layers_only(model_type, layers):
    model = tiny(model_type)
    family = gated_patch.family_for(model)
    assert list(family.attention_layers) == layers
    gated_patch.patch_model(model)
    gated = sorted({int(name.split(".")[2]) for name, _ in gated_patch.gate_parameters(model)})
    assert gated == layers  # state-space, recurrent and linear-attention layers are left alone
    assert model.config.attn_output_gate_modules["attention_layers"] == layers
    others = [i for i in range(len(model.get_submodule(family.decoder_layers))) if i not in layers]
    with pytest.raises(gated_patch.GateConfigError, match=re.escape(f"with attention in {layers}")):
        gated_patch.patch_model(tiny(model_type), GateConfig(layers=others[:1]))
    assert gated_patch.is_patched(gated_patch.patch_model(tiny(model_type), GateConfig(layers=layers)))


@pytest.mark.parametrize("model_type", ["jamba", "nemotron_h", "deepseek_v3", "gpt_neox"])
def test_the_tensor_parallel_plan_splits_the_gate_with_the_heads(model_type):
    model = tiny(model_type)
    family = gated_patch.family_for(model)
    attention = f"{family.decoder_layers}.*.{family.attention}"
    assert model.tp_plan[f"{attention}.{family.output_projection}"] == "rowwise"
    gated_patch.patch_model(model)
    assert model.tp_plan[f"{attention}.attn_gate"] == "colwise"


def test_zamba2_and_natively_gated_attention_are_refused_with_the_reason():
    with pytest.raises(gated_patch.UnsupportedModelError, match="nested block.*shared by several layers"):
        gated_patch.patch_model(tiny("zamba2"))
    with pytest.raises(gated_patch.UnsupportedModelError, match="already has a native output gate"):
        gated_patch.patch_model(tiny("qwen3_next"))


@torch.no_grad()
@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "jamba"])
def test_inspect_measures_the_attention_layers_as_output_attentions_gives_them(model_type):
    """F-Attn of every attention layer (of a hybrid: only those) from the instrument equals the share of attention on
    the first token computed from the model's own ``output_attentions``."""
    model = gated_patch.patch_model(tiny(model_type))
    randomize_gates(model)
    inspection = inspect_model(model, IDS[0].tolist(), window=IDS.shape[1], progress=False)
    weights = [w for w in model(IDS, output_attentions=True).attentions if w is not None]
    expected = [float(w[..., 1:, 0].mean()) for w in weights]
    assert [stats.layer for stats in inspection.layers] == list(gated_patch.family_for(model).attention_layers or
                                                                range(len(expected)))
    assert [stats.first_token_share for stats in inspection.layers] == pytest.approx(expected, abs=1e-6)
    assert all(stats.gated and 0 < stats.gate_mean < 2 for stats in inspection.layers)


# ---------------------------------------------------------------------------------------- the structure guard


class ExclusiveBranches(nn.Module):
    """An output projection called on three exclusive branches (as Falcon's forward once was)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.dense = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, hidden_states, alibi=None, output_attentions=False):
        y = self.qkv(hidden_states)[..., :8]
        if alibi is None:
            out = self.dense(y)
        elif output_attentions:
            out = self.dense(2 * y)
        else:
            out = self.dense(y + 1)
        return out, None


class TwiceOnOnePath(ExclusiveBranches):
    def forward(self, hidden_states, alibi=None):
        y = self.qkv(hidden_states)[..., :8]
        if alibi is None:
            y = self.dense(y)
        return self.dense(y), None


def test_calls_on_exclusive_branches_count_as_one_call_per_forward():
    assert forward_calls_projection_once(ExclusiveBranches, "dense", ("qkv",)) == (True, "")
    ok, reason = forward_calls_projection_once(TwiceOnOnePath, "dense", ("qkv",))
    assert not ok and "calls self.dense(...) 2 times, not exactly once per call" in reason


def gpt2_forward_applying_c_proj_twice(self, hidden_states, *args, **kwargs):
    """GPT2Attention.forward as a changed release might write it: the output projection twice on one path."""
    y = self.c_attn(hidden_states)[..., : hidden_states.shape[-1]]
    return self.c_proj(self.c_proj(y)), None


def test_a_changed_gpt2_attention_is_refused_before_anything_changes(monkeypatch):
    """The upgrade guard on a Conv1D family: a forward that now applies c_proj twice on one path is refused."""
    from transformers.models.gpt2 import modeling_gpt2

    from gated_patch import guards

    model = tiny("gpt2")
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    monkeypatch.setattr(modeling_gpt2.GPT2Attention, "forward", gpt2_forward_applying_c_proj_twice)
    caches = (guards.projection_calls, guards.forward_calls_projection_once, guards.forward_source)
    for cached in caches:
        cached.cache_clear()
    try:
        with pytest.raises(gated_patch.UnsupportedModelError, match=r"calls self\.c_proj\(\.\.\.\) 2 times"):
            gated_patch.patch_model(model)
    finally:
        for cached in caches:
            cached.cache_clear()
    assert not gated_patch.is_patched(model)
    assert all(torch.equal(tensor, state[name]) for name, tensor in model.state_dict().items())


@torch.no_grad()
@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "deepseek_v3", "jamba", "mixtral", "exaone", "gemma3",
                                        "nemotron_h"])
def test_the_converter_gates_a_saved_checkpoint_as_patch_model_does(tmp_path, model_type):
    """The streaming converter reads the family from the checkpoint (a model built on the meta device, no weights):
    gate names, shapes and the hybrid's attention layers match what patch_model makes, and the identity gates leave the
    logits unchanged (`--verify` checks that too).
    The source's tensors keep their saved names (GPT-NeoX's ``embed_out``, Mixtral's per-expert weights, EXAONE's
    ``transformer.h``, Gemma 3's ``language_model.model``), the gates go where the family's files put the attention,
    and the gated class loads them all through the upstream class's conversions."""
    from conversion.convert import main as convert

    plain = tiny(model_type)
    plain.save_pretrained(tmp_path / "src")
    assert convert([str(tmp_path / "src"), str(tmp_path / "out"), "--no-progress", "--verify"]) == 0
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    patched = gated_patch.patch_model(tiny(model_type))
    shapes = {name: p.shape for name, p in gated_patch.gate_parameters(converted)}
    assert shapes == {name: p.shape for name, p in gated_patch.gate_parameters(patched)} and shapes
    patched.save_pretrained(tmp_path / "patched")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["attn_output_gate_modules"] == json.loads(
        (tmp_path / "patched" / "config.json").read_text())["attn_output_gate_modules"]
    assert family_coverage.saved_tensor_names(tmp_path / "out") == family_coverage.saved_tensor_names(
        tmp_path / "patched")
    assert torch.equal(converted(IDS).logits, plain(IDS).logits)


@pytest.mark.parametrize("model_type", ["gpt_neox", "mixtral", "qwen2_moe"])
def test_a_gated_checkpoint_names_its_tensors_as_the_upstream_class_does(tmp_path, model_type):
    """transformers renames some weights on load and back on save (GPT-NeoX's embed_out, MoE experts fused): a gated
    checkpoint is written under the names the plain family's checkpoint has, the names vLLM and llama.cpp read."""
    plain = tiny(model_type)
    plain.save_pretrained(tmp_path / "plain")
    gated = gated_patch.patch_model(tiny(model_type))
    randomize_gates(gated)
    gated.save_pretrained(tmp_path / "gated")
    gates = {name for name, _ in gated_patch.gate_parameters(gated)}
    assert family_coverage.saved_tensor_names(tmp_path / "gated") == family_coverage.saved_tensor_names(
        tmp_path / "plain") | gates  # these families rename no attention module: the gates keep their module paths
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gated", attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, gated(IDS).logits)


@pytest.mark.parametrize("model_type, saved_as", [
    ("exaone", "transformer.h.{}.attn.attention"),  # EXAONE's published layout; transformers builds a Llama
    ("gemma3", "language_model.model.layers.{}.self_attn"),  # the multimodal checkpoints' text model
    ("nemotron_h", "backbone.layers.{}.mixer"),
    ("llama", None),  # no renames: the module paths are the file names, nothing recorded
])
def test_the_config_records_where_the_files_hold_the_gates(tmp_path, model_type, saved_as):
    model = gated_patch.patch_model(tiny(model_type))
    randomize_gates(model)
    model.save_pretrained(tmp_path)
    modules = json.loads((tmp_path / "config.json").read_text())["attn_output_gate_modules"]
    assert modules.get("checkpoint_attention") == saved_as
    layers = gated_patch.family_for(model).attention_layers or range(2)
    template = saved_as or f"{modules['decoder_layers']}.{{}}.{modules['attention']}"
    assert {f"{template.format(i)}.attn_gate.{kind}" for i in layers for kind in ("weight", "bias")} == {
        name for name in family_coverage.saved_tensor_names(tmp_path) if ".attn_gate." in name}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_a_malformed_checkpoint_attention_is_refused_naming_the_file(tmp_path):
    model = gated_patch.patch_model(tiny("exaone"))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["attn_output_gate_modules"]["checkpoint_attention"] = "transformer.h.attn.attention"  # no {} for the layer
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(gated_patch.GatedCheckpointError, match=r"config\.json: attn_output_gate_modules\.checkpoint_"
                       r"attention must be a module path with one \{\} for the layer index"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
