"""Fused gate (issue 6): query and gate pre-activations from one GEMM; same outputs, same parameters and checkpoint,
exact gradients, exact unfuse / unpatch."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gated_patch as gp
from gated_patch.fused import FusedAttentionGateLinear, FusedGateError, FusedQueryLinear
from conftest import randomize_gates, tiny_model

INPUT_IDS = torch.tensor([[5, 17, 42, 8, 91, 33, 12, 64, 7, 29, 3, 50], [9, 4, 77, 61, 2, 18, 40, 13, 88, 6, 25, 71]])
NUM_LAYERS = 3  # conftest tiny models


class _CountGemms(TorchDispatchMode):
    """Counts matrix multiplications (mm / addmm / bmm) dispatched while active."""

    GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.GEMMS
        return func(*args, **(kwargs or {}))


def _gated(family="llama", granularity="elementwise", seed=1, **gate_kwargs):
    model = tiny_model(family)
    gp.patch_model(model, gp.GateConfig(granularity=granularity, **gate_kwargs))
    randomize_gates(model, seed=seed)
    return model


def _logits(model, input_ids=INPUT_IDS):
    with torch.no_grad():
        return model(input_ids).logits


def _state(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _assert_same_state(a, b):
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("granularity", ["elementwise", "headwise"])
def test_fused_model_matches_unfused_with_one_gemm_less_per_layer(family, granularity):
    reference = _gated(family, granularity)
    fused = gp.fuse_gates(copy.deepcopy(reference))
    assert gp.is_fused(fused) and not gp.is_fused(reference)

    with _CountGemms() as unfused_count:
        expected = _logits(reference)
    with _CountGemms() as fused_count:
        actual = _logits(fused)
    assert (actual - expected).abs().max().item() <= 1e-5
    assert fused_count.count == unfused_count.count - NUM_LAYERS

    with torch.no_grad():  # cached decoding goes through the fused path token by token
        generated = fused.generate(INPUT_IDS, max_new_tokens=6, do_sample=False)
        expected_generated = reference.generate(INPUT_IDS, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, expected_generated)


def test_fusing_keeps_parameters_names_and_state_dict():
    model = _gated("qwen2", bias=True)  # qwen2: q_proj has a bias; the gate has one too
    before = _state(model)
    parameters = dict(model.named_parameters())
    gp.fuse_gates(model)
    assert dict(model.named_parameters()).keys() == parameters.keys()
    assert all(p is parameters[name] for name, p in model.named_parameters())  # same Parameter objects
    _assert_same_state(before, _state(model))
    attention = model.model.layers[0].self_attn
    assert isinstance(attention.q_proj, (nn.Linear, FusedQueryLinear))
    assert isinstance(attention.attn_gate, (gp.AttentionGateLinear, FusedAttentionGateLinear))


@pytest.mark.parametrize("q_bias,gate_bias", [(True, False), (False, True), (False, False)])
def test_fusion_handles_every_bias_combination(q_bias, gate_bias):
    reference = tiny_model("llama", attention_bias=q_bias)
    gp.patch_model(reference, gp.GateConfig(bias=gate_bias))
    randomize_gates(reference)
    fused = gp.fuse_gates(copy.deepcopy(reference))
    assert (_logits(fused) - _logits(reference)).abs().max().item() <= 1e-5
    _assert_same_state(_state(reference), _state(fused))


def test_save_pretrained_of_fused_model_writes_the_unfused_checkpoint(tmp_path):
    reference = _gated("llama")
    fused = gp.fuse_gates(copy.deepcopy(reference))
    reference.save_pretrained(tmp_path / "unfused")
    fused.save_pretrained(tmp_path / "fused")
    saved_unfused = load_file(tmp_path / "unfused" / "model.safetensors")
    saved_fused = load_file(tmp_path / "fused" / "model.safetensors")
    assert sorted(saved_fused) == sorted(saved_unfused)
    assert any(".attn_gate." in name for name in saved_fused)
    for name in saved_unfused:
        assert torch.equal(saved_fused[name], saved_unfused[name]), name

    # The checkpoint loads into a fresh (unfused or fused) gated model and reproduces the reference.
    for fuse in (False, True):
        target = _gated("llama", seed=7)  # different gate values, overwritten by the load
        if fuse:
            gp.fuse_gates(target)
        missing, unexpected = target.load_state_dict(saved_fused, strict=False)
        assert not unexpected and all("lm_head" in name or "rotary" in name for name in missing)
        assert (_logits(target) - _logits(reference)).abs().max().item() <= 1e-5


def test_in_place_weight_updates_reach_the_fused_gemm():
    model = gp.fuse_gates(_gated("llama"))
    other = _gated("llama", seed=5)
    model.load_state_dict(other.state_dict())  # in-place copies into the fused storage
    assert (_logits(model) - _logits(other)).abs().max().item() <= 1e-5
    with torch.no_grad():
        model.model.layers[1].self_attn.attn_gate.bias.add_(0.75)
        other.model.layers[1].self_attn.attn_gate.bias.add_(0.75)
    assert (_logits(model) - _logits(other)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("how", ["to_dtype", "assign", "data"])
def test_replaced_parameter_storage_is_refused_from_the_parameters(how):
    reference = _gated("llama")
    model = gp.fuse_gates(copy.deepcopy(reference))
    if how == "to_dtype":
        model.to(torch.float64)
        reference.to(torch.float64)
    elif how == "assign":
        other = _gated("llama", seed=9)
        model.load_state_dict(other.state_dict(), assign=True)
        reference = other
    else:
        gate = model.model.layers[2].self_attn.attn_gate
        gate.weight.data = torch.randn_like(gate.weight)
        reference.model.layers[2].self_attn.attn_gate.weight.data = gate.weight.data.clone()
    assert (_logits(model) - _logits(reference)).abs().max().item() <= 1e-5
    assert gp.is_fused(model)


def test_deepcopy_of_a_fused_model_is_independent():
    model = gp.fuse_gates(_gated("llama"))
    expected = _logits(model)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(2)
    assert torch.equal(_logits(clone), expected)


def test_training_a_fused_model_gives_exact_unfused_gradients():
    reference = _gated("llama")
    fused = gp.fuse_gates(copy.deepcopy(reference))
    labels = INPUT_IDS.clone()
    for model in (reference, fused):
        model.train()
        model(INPUT_IDS, labels=labels).loss.backward()
    fused_parameters = dict(fused.named_parameters())
    for name, parameter in reference.named_parameters():
        assert torch.equal(fused_parameters[name].grad, parameter.grad), name

    # One optimizer step on each: the fused GEMM then uses the updated weights.
    for model in (reference, fused):
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        model.eval()
    assert (_logits(fused) - _logits(reference)).abs().max().item() <= 1e-5


def test_gate_only_training_of_a_fused_model_matches_unfused():
    reference = _gated("llama")
    fused = gp.fuse_gates(copy.deepcopy(reference))
    for model in (reference, fused):
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(".attn_gate." in name)
        model(INPUT_IDS, labels=INPUT_IDS).loss.backward()
    fused_parameters = dict(fused.named_parameters())
    for name, parameter in gp.gate_parameters(reference):
        assert torch.equal(fused_parameters[name].grad, parameter.grad), name


def test_unfuse_restores_plain_modules_with_their_own_storage():
    model = _gated("qwen2")
    before = _state(model)
    expected = _logits(model)
    gp.fuse_gates(model)
    gp.unfuse_gates(model)
    assert not gp.is_fused(model)
    for layer in model.model.layers:
        assert type(layer.self_attn.q_proj) is nn.Linear
        assert type(layer.self_attn.attn_gate) is gp.AttentionGateLinear
        assert "_gated_patch_fused_scores" not in layer.self_attn.attn_gate.__dict__
        for parameter in (layer.self_attn.q_proj.weight, layer.self_attn.attn_gate.weight):
            assert parameter.data._base is None and parameter.is_contiguous()
    _assert_same_state(before, _state(model))
    assert torch.equal(_logits(model), expected)


def test_unpatch_model_unfuses_first_and_restores_the_original_model():
    original = tiny_model("llama")
    original_state = _state(original)
    expected = _logits(original)
    model = copy.deepcopy(original)
    gp.patch_model(model, gp.GateConfig())
    gp.fuse_gates(model)
    gp.unpatch_model(model)
    assert not gp.is_patched(model) and not gp.is_fused(model)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    _assert_same_state(original_state, _state(model))
    assert torch.equal(_logits(model), expected)


def test_only_gated_layers_are_fused():
    reference = _gated("mistral", layers=[1])
    fused = gp.fuse_gates(copy.deepcopy(reference))
    kinds = [type(layer.self_attn.q_proj) for layer in fused.model.layers]
    assert kinds == [nn.Linear, FusedQueryLinear, nn.Linear]
    assert (_logits(fused) - _logits(reference)).abs().max().item() <= 1e-5


def test_fusing_twice_is_a_no_op():
    model = gp.fuse_gates(_gated("llama"))
    weight = model.model.layers[0].self_attn.q_proj.weight.data_ptr()
    gp.fuse_gates(model)
    assert model.model.layers[0].self_attn.q_proj.weight.data_ptr() == weight


def test_fusion_refuses_attention_output_gates():
    model = _gated("llama", gate_input="attn_output")
    with pytest.raises(FusedGateError, match="gate_input='hidden_states'"):
        gp.fuse_gates(model)
    assert not gp.is_fused(model)


def test_fusion_refuses_unpatched_models_and_unfuse_refuses_unfused_models():
    with pytest.raises(gp.NotPatchedError, match="patch_model"):
        gp.fuse_gates(tiny_model("llama"))
    with pytest.raises(FusedGateError, match="not fused"):
        gp.unfuse_gates(_gated("llama"))


def test_fusion_refuses_adapter_wrapped_projections():
    from peft import LoraConfig, get_peft_model

    model = _gated("llama")
    peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj"], r=2))
    with pytest.raises(FusedGateError, match="PEFT"):
        gp.fuse_gates(peft_model)
    assert not gp.is_fused(peft_model)


def test_torch_compile_fullgraph_traces_the_fused_path():
    reference = _gated("llama")
    fused = gp.fuse_gates(copy.deepcopy(reference))
    linears = []

    def counting_backend(graph_module, example_inputs):
        linears.append(sum(node.target is torch._C._nn.linear for node in graph_module.graph.nodes))
        return graph_module.forward

    for model in (reference, fused):
        torch._dynamo.reset()
        with torch.no_grad():
            actual = torch.compile(model, fullgraph=True, backend=counting_backend)(INPUT_IDS).logits
        assert (actual - _logits(reference)).abs().max().item() <= 1e-5
    assert linears[1] == linears[0] - NUM_LAYERS  # one graph each (fullgraph), one GEMM less per layer


def test_fused_smollm2_matches_unfused(load_smollm2, smollm2_tokenizer):
    model = load_smollm2()
    gp.patch_model(model, gp.GateConfig())
    randomize_gates(model, std=0.02)
    input_ids = smollm2_tokenizer("The gate multiplies the attention output by a learned sigmoid.", return_tensors="pt")
    expected = _logits(model, input_ids.input_ids)
    gp.fuse_gates(model)
    assert (_logits(model, input_ids.input_ids) - expected).abs().max().item() <= 1e-5
