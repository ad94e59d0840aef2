"""The public API: GateConfig validation, patch/unpatch contract, registry, initialisation, devices, bad input."""

import copy
import re

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import gated_patch as gp
from gated_patch.core.versions import MAX_TRANSFORMERS, MIN_TRANSFORMERS, check_transformers_version
from conftest import randomize_gates, tiny_config, tiny_model

INPUT_IDS = torch.tensor([[5, 17, 42, 8, 91, 33, 12, 64, 7, 29]])


# --- GateConfig ---------------------------------------------------------------------------------------------------


def test_gate_config_defaults_follow_the_paper():
    config = gp.GateConfig()
    assert (config.granularity, config.gate_input, config.init, config.activation) == (
        "elementwise", "hidden_states", "identity", "sigmoid"
    )


def test_gate_config_dict_round_trip():
    config = gp.GateConfig(granularity="headwise", gate_input="attn_output", init="paper", bias=False, layers=[3, 1])
    data = config.to_dict()
    assert data["layers"] == [1, 3]
    assert gp.GateConfig.from_dict(data) == config


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"granularity": "channelwise"}, "granularity"),
        ({"init": "zeros"}, "init"),
        ({"gate_input": "query"}, "gate_input"),
        ({"activation": "relu"}, "activation"),
        ({"bias": "yes"}, "bias"),
        ({"layers": [0, -1]}, "layers"),
        ({"layers": [1, 1]}, "duplicate"),
        ({"layers": "0,1"}, "layers"),
        ({"layers": []}, "non-empty list"),  # no gate at all would leave a half-patched model
    ],
)
def test_gate_config_rejects_invalid_values(kwargs, fragment):
    with pytest.raises(gp.GateConfigError, match=fragment):
        gp.GateConfig(**kwargs)


def test_gate_config_from_dict_rejects_unknown_keys():
    with pytest.raises(gp.GateConfigError, match="Unknown gate config keys"):
        gp.GateConfig.from_dict({"granularity": "headwise", "gate_temperature": 2.0})


# --- patch / unpatch contract ---------------------------------------------------------------------------------------


def test_patch_is_in_place_idempotent_and_refuses_a_different_config():
    model = tiny_model("llama")
    assert gp.patch_model(model) is model
    params = dict(model.named_parameters())
    assert gp.patch_model(model, gp.GateConfig()) is model  # same config: no-op
    assert dict(model.named_parameters()).keys() == params.keys()
    with pytest.raises(gp.AlreadyPatchedError, match="unpatch_model"):
        gp.patch_model(model, gp.GateConfig(granularity="headwise"))


def test_introspection():
    model = tiny_model("qwen3")
    assert not gp.is_patched(model)
    with pytest.raises(gp.NotPatchedError, match="patch_model"):
        gp.gate_config(model)
    gp.patch_model(model, {"granularity": "headwise", "layers": [1]})
    assert gp.is_patched(model)
    assert gp.gate_config(model) == gp.GateConfig(granularity="headwise", layers=[1])
    names = [name for name, _ in gp.gate_parameters(model)]
    assert names == ["model.layers.1.self_attn.attn_gate.weight", "model.layers.1.self_attn.attn_gate.bias"]
    assert model.config.attn_output_gate == gp.GateConfig(granularity="headwise", layers=[1]).to_dict()


def test_gate_module_name_cannot_collide_with_the_mlp_gate_proj():
    model = gp.patch_model(tiny_model("llama"))
    gate_modules = [name for name, module in model.named_modules() if isinstance(module, gp.AttentionGateLinear)]
    assert gate_modules and all(name.endswith(".self_attn.attn_gate") for name in gate_modules)
    assert not any(name.endswith("gate_proj") for name in gate_modules)
    assert not any(name.endswith(".attn_gate") for name, m in model.named_modules() if "mlp" in name)


def test_unpatch_restores_the_exact_original():
    model = tiny_model("mistral")
    original_state = copy.deepcopy(model.state_dict())
    original_classes = {name: type(module) for name, module in model.named_modules()}
    original_config = model.config.to_dict()
    reference = model(INPUT_IDS).logits

    gp.patch_model(model, gp.GateConfig(init="paper"))
    randomize_gates(model)
    gp.unpatch_model(model)

    assert not gp.is_patched(model)
    assert {name: type(module) for name, module in model.named_modules()} == original_classes
    state = model.state_dict()
    assert state.keys() == original_state.keys()
    assert all(torch.equal(state[key], original_state[key]) for key in state)
    assert model.config.to_dict() == original_config
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(model(INPUT_IDS).logits, reference)
    with pytest.raises(gp.NotPatchedError):
        gp.unpatch_model(model)


def test_patched_model_is_an_instance_of_the_original_classes():
    model = tiny_model("llama")
    classes = {name: type(module) for name, module in model.named_modules()}
    gp.patch_model(model)
    for name, cls in classes.items():
        assert isinstance(model.get_submodule(name), cls)


# --- parameters survive moves, casts, state dicts and initialisation -------------------------------------------------


def test_gate_parameters_follow_dtype_and_state_dict_round_trip():
    model = gp.patch_model(tiny_model("qwen2"), gp.GateConfig(init="paper"))
    model.to(torch.float64)
    assert all(p.dtype == torch.float64 for _, p in gp.gate_parameters(model))
    model.to(torch.float32)
    state = model.state_dict()
    assert any(".attn_gate." in key for key in state)

    fresh = gp.patch_model(tiny_model("qwen2", seed=7), gp.GateConfig(init="paper"))
    missing, unexpected = fresh.load_state_dict(state)
    assert not missing and not unexpected
    torch.testing.assert_close(fresh(INPUT_IDS).logits, model(INPUT_IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("init", ["identity", "paper"])
def test_transformers_weight_initialisation_applies_the_gate_init(init):
    """transformers re-initialises weights through `_init_weights`; the generic nn.Linear rule (normal 0.02) must not
    apply to gates: an identity gate stays exactly identity, a paper gate gets N(0, initializer_range) and zero bias."""
    model = gp.patch_model(tiny_model("llama", num_hidden_layers=2, hidden_size=256, intermediate_size=64), {"init": init})
    randomize_gates(model)
    for parameter in model.parameters():
        parameter.__dict__.pop("_is_hf_initialized", None)
    for module in model.modules():
        module.__dict__.pop("_is_hf_initialized", None)
    model.initialize_weights()
    weights = [p for name, p in gp.gate_parameters(model) if name.endswith("weight")]
    biases = [p for name, p in gp.gate_parameters(model) if name.endswith("bias")]
    assert all(torch.count_nonzero(b) == 0 for b in biases)
    if init == "identity":
        assert all(torch.count_nonzero(w) == 0 for w in weights)
    else:
        std = torch.cat([w.flatten() for w in weights]).std().item()
        assert abs(std - model.config.initializer_range) < 0.002


def test_gated_model_from_config_uses_the_paper_init_by_default():
    config = tiny_config("llama", hidden_size=256, num_hidden_layers=2)
    model = gp.gated_model_from_config(config)
    assert gp.gate_config(model).init == "paper"
    weights = torch.cat([p.flatten() for name, p in gp.gate_parameters(model) if name.endswith("weight")])
    assert abs(weights.std().item() - config.initializer_range) < 0.002
    identity = gp.gated_model_from_config(config, gp.GateConfig(init="identity"), attn_implementation="eager")
    assert all(torch.count_nonzero(p) == 0 for _, p in gp.gate_parameters(identity))
    assert identity.config._attn_implementation == "eager"


def test_patch_on_meta_device_then_load_weights():
    source = gp.patch_model(tiny_model("qwen3"), gp.GateConfig(granularity="headwise"))
    randomize_gates(source)
    with torch.device("meta"):
        empty = AutoModelForCausalLM.from_config(tiny_config("qwen3"))
    gp.patch_model(empty, gp.GateConfig(granularity="headwise"))
    assert all(p.device.type == "meta" for _, p in gp.gate_parameters(empty))
    empty.load_state_dict(source.state_dict(), assign=True)
    empty.model.rotary_emb.to_empty(device="cpu")
    empty.model.rotary_emb.inv_freq.copy_(source.model.rotary_emb.inv_freq)
    empty.model.rotary_emb.original_inv_freq = source.model.rotary_emb.original_inv_freq
    with torch.no_grad():
        torch.testing.assert_close(empty.eval()(INPUT_IDS).logits, source(INPUT_IDS).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("max_memory", [None, "120KB"], ids=["in-memory", "disk-offload"])
def test_device_map_auto_loaded_model(tmp_path, max_memory):
    """accelerate's dispatch (device_map="auto"), including layers offloaded to disk whose forward runs through
    accelerate hooks: the gate must be applied, not bypassed."""
    source = tiny_model("llama")
    source.save_pretrained(tmp_path / "ckpt")
    options = {"max_memory": {"cpu": max_memory}, "offload_folder": tmp_path / "offload"} if max_memory else {}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", device_map="auto", **options).eval()
    if max_memory:
        assert "disk" in model.hf_device_map.values()
    with torch.no_grad():
        reference = model(INPUT_IDS).logits
        gp.patch_model(model)
        assert (model(INPUT_IDS).logits - reference).abs().max().item() <= 1e-5
        randomize_gates(model)
        gp.patch_model(source)
        randomize_gates(source)
        expected = source(INPUT_IDS).logits
        assert (expected - reference).abs().max().item() > 1e-3
        assert (model(INPUT_IDS).logits - expected).abs().max().item() <= 1e-5
        gp.unpatch_model(model)
        assert (model(INPUT_IDS).logits - reference).abs().max().item() <= 1e-5


# --- registry -------------------------------------------------------------------------------------------------------


def test_builtin_model_types():
    assert set(gp.registered_model_types()) >= {"llama", "qwen2", "mistral", "qwen3"}


def test_a_family_that_does_not_fit_is_refused_with_the_reason_and_how_to_register():
    from transformers import MambaConfig

    model = AutoModelForCausalLM.from_config(MambaConfig(num_hidden_layers=1, hidden_size=32, vocab_size=50, state_size=4))
    with pytest.raises(gp.UnsupportedModelError) as info:
        gp.patch_model(model)
    message = str(info.value)
    assert "'mamba'" in message and "no decoder layer (MambaBlock) has a self-attention module" in message
    assert "register_model_type('mamba'" in message and not gp.is_patched(model)


def _tiny_mixtral():
    from transformers import MixtralConfig

    config = MixtralConfig(
        vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_an_unregistered_family_is_found_by_structure():
    model = _tiny_mixtral()
    reference = model(INPUT_IDS).logits
    family = gp.family_for(model)
    assert "mixtral" not in gp.registered_model_types()
    assert (family.decoder_layers, family.attention, family.output_projection) == ("model.layers", "self_attn", "o_proj")
    assert family.attention_class.__name__ == "MixtralAttention"
    gp.patch_model(model)
    assert (model(INPUT_IDS).logits - reference).abs().max().item() <= 1e-5


def test_a_registered_family_overrides_the_structure():
    from transformers.models.mixtral.modeling_mixtral import MixtralAttention

    model = _tiny_mixtral()
    gp.register_model_type("mixtral", MixtralAttention, output_projection="q_proj")  # a wrong registration wins
    try:
        with pytest.raises(ValueError, match="already registered"):
            gp.register_model_type("mixtral", MixtralAttention)
        assert gp.family_for(model).output_projection == "q_proj"
        with pytest.raises(gp.UpstreamStructureError, match=r"calls self\.k_proj, self\.o_proj, self\.v_proj after self\.q_proj, so q_proj is not the output"):
            gp.patch_model(model)  # ... and is checked: q_proj is not the output projection
    finally:
        gp.unregister_model_type("mixtral")
    assert gp.family_for(model).output_projection == "o_proj"


# --- bad input ------------------------------------------------------------------------------------------------------


def test_layers_out_of_range():
    model = tiny_model("llama")
    with pytest.raises(gp.GateConfigError, match=r"out of range.*3 decoder layers"):
        gp.patch_model(model, gp.GateConfig(layers=[0, 3]))
    assert not gp.is_patched(model)


@pytest.mark.parametrize("registration, named", [
    (dict(attention_class=42), "attention_class must be a class or a 'module.path:ClassName' string, got 42"),
    (dict(attention_class=None), "attention_class must be a class or .* got None"),
    (dict(attention_class="transformers.models.llama.modeling_llama.LlamaAttention"), "'module.path:ClassName'"),
    (dict(attention_class=torch.Tensor), "attention_class Tensor is not an nn.Module subclass"),
    (dict(decoder_layers=""), "decoder_layers must be a dotted module path such as 'model.layers', got ''"),
    (dict(decoder_layers=None), "decoder_layers must be a dotted module path"),
    (dict(attention="self_attn.o_proj"), "attention must be a module name, got 'self_attn.o_proj'"),
    (dict(output_projection=None), "output_projection must be a module name, got None"),
    (dict(output_projection="o-proj"), "output_projection must be a module name"),
])  # fmt: skip
def test_a_malformed_registration_is_refused_and_changes_nothing(registration, named):
    from transformers.models.llama.modeling_llama import LlamaAttention

    before = gp.get_model_family("llama")
    with pytest.raises(ValueError, match=named):
        gp.register_model_type("llama", **{"attention_class": LlamaAttention, **registration}, overwrite=True)
    assert gp.get_model_family("llama") == before


def test_decoder_layers_that_are_not_a_module_list_are_refused_before_anything_changes():
    from transformers.models.llama.modeling_llama import LlamaAttention

    model = tiny_model("llama")
    model.config.model_type = "odd_llama"
    gp.register_model_type("odd_llama", LlamaAttention, decoder_layers="lm_head")
    try:
        with pytest.raises(gp.NotPatchedError, match=r"`lm_head` of LlamaForCausalLM is a Linear, not the list of "
                                                     r"decoder layers \(nn\.ModuleList\); fix the registration"):
            gp.patch_model(model)
    finally:
        gp.unregister_model_type("odd_llama")
    assert not gp.is_patched(model) and type(model).__name__ == "LlamaForCausalLM"


def test_attention_without_the_expected_structure_is_refused():
    class OddAttention(nn.Module):  # forward never calls o_proj
        def __init__(self, hidden):
            super().__init__()
            self.head_dim = 16
            self.o_proj = nn.Linear(hidden, hidden)

        def forward(self, hidden_states, **kwargs):
            return hidden_states, None

    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.self_attn = OddAttention(model.config.hidden_size)
    model.config.model_type = "odd"
    gp.register_model_type("odd", OddAttention)
    try:
        with pytest.raises(gp.UpstreamStructureError, match=r"calls self\.o_proj\(\.\.\.\) 0 times"):
            gp.patch_model(model)
    finally:
        gp.unregister_model_type("odd")
    assert not gp.is_patched(model)


def test_attention_class_mismatch_is_refused():
    model = tiny_model("llama")
    model.config.model_type = "qwen2"  # registry says Qwen2Attention, the modules are LlamaAttention
    with pytest.raises(gp.UpstreamStructureError, match="expected an instance of Qwen2Attention"):
        gp.patch_model(model)


def test_unsupported_transformers_version_is_refused():
    with pytest.raises(gp.UpstreamStructureError, match="transformers 4.57.0 is installed"):
        check_transformers_version("4.57.0")
    check_transformers_version()  # the installed version is supported
    for inside in (MIN_TRANSFORMERS, MIN_TRANSFORMERS.rsplit(".", 1)[0], "5.99.1.dev0"):  # "5.13" is 5.13.0
        check_transformers_version(inside)
    for outside in ("5.12.99", MAX_TRANSFORMERS, MAX_TRANSFORMERS.rsplit(".", 1)[0]):
        with pytest.raises(gp.UpstreamStructureError, match=f"transformers {re.escape(outside)} is installed"):
            check_transformers_version(outside)


def test_gates_take_the_models_train_or_eval_mode():
    model = tiny_model("llama").eval()
    gp.patch_model(model, gp.GateConfig())
    assert not any(module.training for module in model.modules())
    gp.unpatch_model(model)
    model.train()
    gp.patch_model(model, gp.GateConfig())
    assert all(module.training for module in model.modules())
