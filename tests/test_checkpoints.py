"""Gated checkpoints: save_pretrained of a patched model, loading with the plugin, and the checks on gate tensors."""

from __future__ import annotations

import json
import types

import pytest
import torch
from conftest import FAMILIES, randomize_gates, tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import gated_patch
from gated_patch import GateConfig, GatedCheckpointError, gate_config, is_patched, patch_model, unpatch_model
from gated_patch.checkpoints.remote_code import REMOTE_CODE_FILE, imported_top_level_modules
from gated_patch.checkpoints.saving import GatedModelMixin
from gated_patch.core.model import gated_subclass
from gated_patch.core.model import GATE_CONFIG_KEY, gated_config_class, load_checked

IDS = torch.tensor([[1, 5, 7, 9, 11, 13, 17, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])


def gated_tiny(family, gate=None, seed=0, **overrides):
    model = tiny_model(family, seed=seed, **overrides)
    patch_model(model, gate or GateConfig())
    randomize_gates(model, seed=seed + 1)
    return model


def load(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", **kwargs).eval()


def expected_gate_names(gate: GateConfig, num_layers: int) -> set[str]:
    layers = range(num_layers) if gate.layers is None else gate.layers
    suffixes = ("weight", "bias") if gate.bias else ("weight",)
    return {f"model.layers.{i}.self_attn.attn_gate.{s}" for i in layers for s in suffixes}


def test_save_writes_gated_format(tmp_path, family):
    gate = GateConfig(granularity="headwise", layers=[0, 2])
    model = gated_tiny(family, gate)
    model.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == f"gated_{family}"
    assert GateConfig.from_dict(config["attn_output_gate"]) == gate
    module = REMOTE_CODE_FILE[:-3]
    cls = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral", "qwen3": "Qwen3"}[family]
    heads = {"AutoModel": "Model", "AutoModelForCausalLM": "ForCausalLM", "AutoModelForQuestionAnswering":
             "ForQuestionAnswering", "AutoModelForSequenceClassification": "ForSequenceClassification",
             "AutoModelForTokenClassification": "ForTokenClassification"}  # every Auto class of these families
    expected = {"AutoConfig": f"{module}.Gated{cls}Config", **{auto: f"{module}.Gated{cls}{head}" for auto, head in heads.items()}}
    assert {auto: name for auto, name in config["auto_map"].items() if auto in expected} == expected
    assert all(name.startswith(f"{module}.Gated") for name in config["auto_map"].values())  # and other heads, if any
    with safe_open(tmp_path / "model.safetensors", "pt") as handle:
        names = set(handle.keys())
    assert {n for n in names if ".attn_gate." in n} == expected_gate_names(gate, 3)
    # saving does not change the model in memory
    assert model.config.model_type == family and "auto_map" not in model.config.__dict__
    assert not (set(tmp_path.iterdir()) - {tmp_path / f for f in
                ("config.json", "generation_config.json", "model.safetensors", REMOTE_CODE_FILE)})


def test_remote_code_is_one_file_importing_only_torch_and_transformers(tmp_path):
    texts = set()
    for family in ("llama", "qwen3"):
        gated_tiny(family).save_pretrained(tmp_path / family)
        texts.add((tmp_path / family / REMOTE_CODE_FILE).read_text())
    assert len(texts) == 1  # the same file for every checkpoint
    source = texts.pop()
    import sys

    third_party = {m for m in imported_top_level_modules(source) if m not in sys.stdlib_module_names}
    assert third_party <= {"torch", "transformers", "__future__"}
    assert "gated_patch" not in {m for m in imported_top_level_modules(source)}


def test_remote_code_command_prints_the_file_checkpoints_carry(tmp_path, capsys):
    from gated_patch.cli import main

    gated_tiny("llama").save_pretrained(tmp_path)
    capsys.readouterr()
    assert main(["remote-code"]) == 0
    assert capsys.readouterr().out == (tmp_path / REMOTE_CODE_FILE).read_text()


def test_plugin_loads_the_patched_model(tmp_path, family):
    gate = GateConfig(gate_input="attn_output", bias=False, layers=[1])
    model = gated_tiny(family, gate, attn_implementation="eager")
    reference = model(IDS).logits
    model.save_pretrained(tmp_path)

    loaded = load(tmp_path)
    upstream = type(tiny_model(family))
    assert type(loaded) is gated_subclass(upstream, GatedModelMixin) is type(model)  # exactly what patch_model makes
    assert type(loaded.config) is type(model.config) and loaded.config.model_type == family
    assert is_patched(loaded) and gate_config(loaded) == gate
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    assert torch.equal(loaded(IDS).logits, reference)
    unpatch_model(loaded)
    assert type(loaded) is upstream and not hasattr(loaded.config, "attn_output_gate")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tied_low_precision_sharded_round_trip(tmp_path, dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in `dtype`, as from_pretrained builds it (rotary buffers stay float32)
    try:
        model = gated_tiny("llama", tie_word_embeddings=True)
    finally:
        torch.set_default_dtype(previous)
    assert model.dtype == dtype
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reference = model(IDS).logits
    model.save_pretrained(tmp_path, max_shard_size="20KB")

    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    loaded = load(tmp_path)
    assert loaded.dtype == dtype
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    gates = dict(gated_patch.gate_parameters(loaded))
    assert len(gates) == 6 and all(p.dtype == dtype for p in gates.values())
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    assert torch.equal(loaded(IDS).logits, reference)


def _rewrite_weights(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_gate_tensor_is_an_error(tmp_path):
    gated_tiny("llama").save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, lambda t: t.pop("model.layers.1.self_attn.attn_gate.weight"))
    with pytest.raises(GatedCheckpointError, match=r"(no gate tensor|missing gate tensors).*layers\.1\.self_attn\.attn_gate\.weight"):
        load(tmp_path)


def test_wrong_shaped_gate_tensor_is_an_error(tmp_path):
    gated_tiny("qwen2").save_pretrained(tmp_path)
    name = "model.layers.2.self_attn.attn_gate.weight"
    _rewrite_weights(tmp_path, lambda t: t.__setitem__(name, t[name][:4].contiguous()))
    with pytest.raises(GatedCheckpointError, match=r"layers\.2\.self_attn\.attn_gate\.weight.*\(4, 64\)"):
        load(tmp_path)


def test_gate_tensors_without_a_place_are_an_error(tmp_path):
    gated_tiny("llama").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["attn_output_gate"]["layers"] = [0]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(GatedCheckpointError, match=r"no place for.*layers\.1\.self_attn\.attn_gate"):
        load(tmp_path)


def test_gated_checkpoint_without_gate_config_is_an_error(tmp_path):
    gated_tiny("llama").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["attn_output_gate"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(GatedCheckpointError, match="no 'attn_output_gate' (entry|section)"):
        load(tmp_path)


class LoadedHead(torch.nn.Linear):
    """What a load returns, for the loading-info check: a module whose config names the class it was saved from."""

    def __init__(self, saved_as=None):
        super().__init__(2, 2)
        self.config = types.SimpleNamespace(architectures=saved_as)


def test_loading_info_check_lists_every_problem():
    # the check that runs after transformers loaded the weights (with and without the plugin)
    info = {
        "missing_keys": {"model.layers.0.self_attn.attn_gate.weight", "model.layers.0.mlp.up_proj.weight"},
        "unexpected_keys": {"model.layers.5.self_attn.attn_gate.bias"},
        "mismatched_keys": {("model.layers.1.self_attn.attn_gate.weight", (4, 64), (64, 64))},
    }
    with pytest.raises(GatedCheckpointError) as excinfo:
        load_checked(lambda *args, **kwargs: (LoadedHead(), info), "ckpt")
    message = str(excinfo.value)
    assert "missing tensors ['model.layers.0.mlp.up_proj.weight', 'model.layers.0.self_attn.attn_gate.weight']" in message
    assert "wrong-shaped tensors ['model.layers.1.self_attn.attn_gate.weight (checkpoint (4, 64), model (64, 64))']" in message
    assert "unused tensors ['model.layers.5.self_attn.attn_gate.bias']" in message
    clean = {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set()}
    model = LoadedHead(["LoadedHead"])
    assert load_checked(lambda *args, **kwargs: (model, clean), "ckpt") is model


def test_loaded_as_another_head_only_the_gate_tensors_are_held_to_the_checkpoint():
    """A causal LM's checkpoint as a classifier: the new head's weights are transformers' to initialise and report; a
    gate tensor is still never made up or dropped."""
    head_change = {"missing_keys": {"score.weight"}, "unexpected_keys": {"lm_head.weight"}, "mismatched_keys": set()}
    model = LoadedHead(["GatedLlamaForCausalLM"])
    assert load_checked(lambda *args, **kwargs: (model, head_change), "ckpt") is model
    with pytest.raises(GatedCheckpointError, match=r"missing tensors \['model.layers.0.self_attn.attn_gate.weight'\]: "):
        load_checked(lambda *args, **kwargs: (model, {**head_change, "missing_keys": {
            "score.weight", "model.layers.0.self_attn.attn_gate.weight"}}), "ckpt")
    with pytest.raises(GatedCheckpointError, match="missing tensors .'score.weight'."):  # the same head: every tensor
        load_checked(lambda *args, **kwargs: (LoadedHead(["LoadedHead"]), head_change), "ckpt")


def test_a_family_outside_transformers_patches_but_saving_it_is_refused_with_the_reason(tmp_path):
    """A causal LM registered with transformers' Auto classes at run time: its checkpoints' remote code could not
    rebuild it (it rebuilds transformers' own classes by name), so registration warns and saving refuses."""
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaAttention
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    class OutsideConfig(LlamaConfig):
        model_type = "outside_llama"

    class OutsideForCausalLM(LlamaForCausalLM):
        config_class = OutsideConfig

    AutoConfig.register("outside_llama", OutsideConfig, exist_ok=True)
    AutoModelForCausalLM.register(OutsideConfig, OutsideForCausalLM, exist_ok=True)
    with CaptureLogger(logging.get_logger("gated_patch.families")) as captured:
        gated_patch.register_model_type("outside_llama", LlamaAttention)
    try:
        assert "'outside_llama' is not one of transformers' own models" in captured.out
        assert "not saved as a gated checkpoint" in captured.out
        model = OutsideForCausalLM(OutsideConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2)).eval()
        patch_model(model)
        assert is_patched(model) and len(dict(gated_patch.gate_parameters(model))) == 2 * 2  # weight and bias
        with pytest.raises(GatedCheckpointError, match=r"OutsideConfig.*rebuilds the model from transformers' own"):
            model.save_pretrained(tmp_path / "outside")
        assert not (tmp_path / "outside").exists()
    finally:
        gated_patch.unregister_model_type("outside_llama")


def test_pushing_from_save_pretrained_is_refused(tmp_path):
    model = gated_tiny("llama")
    with pytest.raises(GatedCheckpointError, match="gated-patch-push DIR"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)
    assert not (tmp_path / "hub").exists()


def test_state_dict_without_gates_is_refused(tmp_path):
    model = gated_tiny("llama")
    state = {k: v for k, v in model.state_dict().items() if "attn_gate" not in k}
    with pytest.raises(GatedCheckpointError, match=r"lacks the gate tensors \['model\.layers\.0\.self_attn\.attn_gate"):
        model.save_pretrained(tmp_path / "x", state_dict=state)
    model.save_pretrained(tmp_path / "y", state_dict=model.state_dict())
    assert torch.equal(load(tmp_path / "y")(IDS).logits, model(IDS).logits)


def test_unpatched_model_saves_plain(tmp_path):
    model = gated_tiny("llama")
    unpatch_model(model)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config and "attn_output_gate" not in config
    assert not (tmp_path / REMOTE_CODE_FILE).exists()


def test_a_loaded_gated_checkpoint_unpatched_saves_a_plain_checkpoint_that_loads_everywhere(tmp_path):
    """Unpatching a model loaded from a gated checkpoint also drops what loading set: the remote-code auto_map and the
    gated architecture, so the saved checkpoint is plain, also with trust_remote_code and over the gated directory."""
    reference = tiny_model("llama")
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        plain = reference(ids).logits
    patch_model(reference)
    randomize_gates(reference)
    reference.save_pretrained(tmp_path / "gated")
    config = json.loads((tmp_path / "gated" / "config.json").read_text())
    config["auto_map"]["AutoTokenizer"] = ["tokenization_own.OwnTokenizer", None]  # not the model's: kept
    (tmp_path / "gated" / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gated", attn_implementation="eager").eval()
    unpatch_model(model)
    assert model.config.architectures == ["LlamaForCausalLM"] and GATE_CONFIG_KEY not in model.config.to_dict()
    assert model.config.auto_map == {"AutoTokenizer": ["tokenization_own.OwnTokenizer", None]}
    for directory in (tmp_path / "plain", tmp_path / "gated"):  # a new directory, and back over the gated one
        model.save_pretrained(directory)
        saved = json.loads((directory / "config.json").read_text())
        assert saved["model_type"] == "llama" and saved["architectures"] == ["LlamaForCausalLM"]
        assert saved["auto_map"] == {"AutoTokenizer": ["tokenization_own.OwnTokenizer", None]}
        for trust in (False, True):
            reloaded = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=trust,
                                                            attn_implementation="eager").eval()
            assert type(reloaded).__name__ == "LlamaForCausalLM" and not is_patched(reloaded)
            with torch.no_grad():
                assert torch.equal(reloaded(ids).logits, plain)


def test_from_config_builds_a_gated_model():
    from conftest import tiny_config
    from transformers import Qwen3Config

    config = gated_config_class(Qwen3Config)(**tiny_config("qwen3").to_dict())
    config.attn_output_gate = GateConfig(granularity="headwise").to_dict()
    model = AutoModelForCausalLM.from_config(config)
    assert is_patched(model) and gate_config(model) == GateConfig(granularity="headwise")
    assert model.config.model_type == "qwen3"
    for name, parameter in gated_patch.gate_parameters(model):
        assert torch.count_nonzero(parameter) == 0, name  # identity init, not the generic normal init


@pytest.mark.parametrize("family_", FAMILIES[:1])
def test_double_save_is_byte_identical(tmp_path, family_):
    model = gated_tiny(family_)
    model.save_pretrained(tmp_path / "a")
    load(tmp_path / "a").save_pretrained(tmp_path / "b")
    for name in ("config.json", "model.safetensors", REMOTE_CODE_FILE):
        a, b = (tmp_path / "a" / name).read_bytes(), (tmp_path / "b" / name).read_bytes()
        if name == "config.json":
            a, b = json.loads(a), json.loads(b)
        assert a == b, name


def test_loading_initialises_what_the_upstream_init_computes(tmp_path):
    """transformers skips the weight init of parameter-less modules for classes it thinks are custom code; FalconH1
    computes its non-persistent mup_vector buffer there. A gated load must give the upstream values, not raw memory."""
    from transformers import FalconH1Config

    torch.manual_seed(0)
    config = FalconH1Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, mamba_d_ssm=64, mamba_n_heads=4,
                            mamba_d_head=16, mamba_d_state=16, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    patch_model(model)
    randomize_gates(model)
    model.save_pretrained(tmp_path)
    loaded = load(tmp_path)
    buffers = dict(loaded.named_buffers())
    for name, buffer in model.named_buffers():
        assert torch.equal(buffers[name], buffer), name
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)
