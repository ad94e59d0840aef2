"""The gate is a plain module call: hooks, replaced forwards, adapters, parametrizations and autocast that act on the
gate module all take effect, and nothing leaks from one run into the next."""

from __future__ import annotations

import pytest
import torch
import torch.nn.utils.prune  # noqa: F401  (torch.nn.utils does not import it)
from torch.nn.modules import module as nn_module

import gated_patch as gp
from gated_patch.core.hooks import is_gated_attention
from gated_patch.core.gate import AttentionGateLinear, apply_gate

from conftest import randomize_gates, tiny_model


def _attentions(model):
    return [module for module in model.modules() if is_gated_attention(module)]


def _reference_gate(attention, attn_output, hidden_states):
    """The gate written out: module call, Python-float constants, broadcasting per head."""
    config = attention.gate_config
    source = hidden_states if config.gate_input == "hidden_states" else attn_output
    scores = attention.attn_gate(source) + config.preactivation_offset
    scores = torch.sigmoid(scores) if config.activation == "sigmoid" else torch.nn.functional.silu(scores)
    scores = scores * config.output_scale
    if config.granularity == "elementwise":
        return attn_output * scores
    per_head = attn_output.unflatten(-1, (attention.gate_num_heads, -1))
    return (per_head * scores.unsqueeze(-1)).flatten(-2)


@pytest.mark.parametrize("granularity", ("elementwise", "headwise"))
@pytest.mark.parametrize("gate_input", ("hidden_states", "attn_output"))
@pytest.mark.parametrize("activation", ("sigmoid", "silu"))
def test_gate_equals_the_formula(granularity, gate_input, activation):
    model = gp.patch_model(tiny_model("llama"),
                           gp.GateConfig(granularity=granularity, gate_input=gate_input, activation=activation))
    randomize_gates(model)
    attention = model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(0)
    hidden_states, attn_output = torch.randn(2, 5, 64, generator=generator), torch.randn(2, 5, 64, generator=generator)
    with torch.no_grad():
        gated = apply_gate(attn_output, hidden_states, attention.attn_gate, attention.gate_config,
                           attention.gate_num_heads)
        torch.testing.assert_close(gated, _reference_gate(attention, attn_output, hidden_states), rtol=0, atol=0)


def _gate_outputs(model, ids):
    """The gate projection outputs of every layer for one forward (seen by forward hooks on the gate modules)."""
    outputs = []
    handles = [a.attn_gate.register_forward_hook(lambda m, a, out: outputs.append(out)) for a in _attentions(model)]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return outputs


def test_a_forward_hook_on_the_gate_fires_and_can_change_the_output():
    model = gp.patch_model(tiny_model("llama"), gp.GateConfig(granularity="headwise"))
    randomize_gates(model)
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        before = model(ids).logits
    assert len(_gate_outputs(model, ids)) == model.config.num_hidden_layers
    closed = [a.attn_gate.register_forward_hook(lambda m, a, out: torch.full_like(out, -1e4)) for a in _attentions(model)]
    with torch.no_grad():
        shut = model(ids).logits  # every gate closed: the attention blocks contribute (almost) nothing
    for handle in closed:
        handle.remove()
    with torch.no_grad():
        after = model(ids).logits
    assert not torch.allclose(shut, before, atol=1e-3)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_a_global_module_hook_sees_the_gate():
    model = gp.patch_model(tiny_model("llama"), gp.GateConfig())
    seen = []
    handle = nn_module.register_module_forward_hook(
        lambda module, args, output: seen.append(module) if isinstance(module, gp.AttentionGateLinear) else None)
    try:
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))
    finally:
        handle.remove()
    assert len(seen) == model.config.num_hidden_layers


def test_a_replaced_forward_is_called():
    """accelerate's offload hooks replace a module's `forward`."""
    model = gp.patch_model(tiny_model("llama"), gp.GateConfig())
    gate = model.model.layers[0].self_attn.attn_gate
    calls = []
    original = gate.forward

    def replaced(input):
        calls.append(input.shape)
        return original(input)

    gate.forward = replaced
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert calls == [torch.Size([1, 3, 64])]


def test_a_lora_adapter_on_the_gate_takes_effect():
    from peft import LoraConfig, get_peft_model

    model = gp.patch_model(tiny_model("llama"), gp.GateConfig())
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        before = model(ids).logits
    peft_model = get_peft_model(model, LoraConfig(target_modules=["attn_gate"], r=2, init_lora_weights=False))
    with torch.no_grad():
        after = peft_model(ids).logits
    assert not torch.allclose(after, before, atol=1e-4)


def test_training_after_inference_mode_generation():
    """Generating under inference_mode first, then training, works and gives gradients to the gates."""
    model = gp.patch_model(tiny_model("llama"), gp.GateConfig(granularity="headwise"))
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    model.train()
    model(ids, labels=ids).loss.backward()
    gradients = [parameter.grad for _, parameter in gp.gate_parameters(model)]
    assert all(g is not None and torch.count_nonzero(g) > 0 for g in gradients)


def _move_weight_out_of_parameters(gate):
    """What FSDP (use_orig_params=False) and similar wrappers do: the weight becomes a plain tensor attribute."""
    weight = gate.weight.detach().clone()
    del gate._parameters["weight"]
    gate.weight = weight


@pytest.mark.parametrize(
    "reparametrize",
    [
        lambda gate: torch.nn.utils.prune.l1_unstructured(gate, "weight", amount=0.5),
        lambda gate: torch.nn.utils.parametrizations.weight_norm(gate),
        lambda gate: torch.nn.utils.parametrizations.spectral_norm(gate),
        _move_weight_out_of_parameters,
    ],
    ids=["prune", "weight_norm", "spectral_norm", "plain_attribute"],
)
@pytest.mark.parametrize("tokens", [1, 4])
def test_reparametrized_gates_use_the_effective_weight(reparametrize, tokens):
    """Pruning and parametrizations move `weight` out of `_parameters` (and may swap the class): the gate computes
    with the effective weight, for one token (decode) and several."""
    model = gp.patch_model(tiny_model("llama"), gp.GateConfig(granularity="headwise"))
    randomize_gates(model)
    gate = model.model.layers[0].self_attn.attn_gate
    reparametrize(gate)
    ids = torch.tensor([[1, 5, 9, 13]])[:, :tokens]
    with torch.no_grad():
        logits = model(ids).logits
        effective = gate.weight.detach().clone()
    plain = gp.patch_model(tiny_model("llama"), gp.GateConfig(granularity="headwise"))
    plain.load_state_dict({k: v for k, v in model.state_dict().items()
                           if ".layers.0.self_attn.attn_gate.weight" not in k}, strict=False)
    with torch.no_grad():
        plain.model.layers[0].self_attn.attn_gate.weight.copy_(effective)
        expected = plain(ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gate_input", ("hidden_states", "attn_output"))
def test_cpu_autocast_gives_the_gate_the_same_precision_for_one_token_and_many(gate_input):
    model = gp.patch_model(tiny_model("llama"), gp.GateConfig(gate_input=gate_input))
    randomize_gates(model)
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        many = _gate_outputs(model, ids)
        one = _gate_outputs(model, ids[:, :1])
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)  # one-token steps under autocast
    assert {o.dtype for o in many} == {o.dtype for o in one} == {torch.bfloat16}


def test_a_fake_tensor_run_does_not_poison_later_eager_runs():
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    model = gp.patch_model(tiny_model("llama"), gp.GateConfig())
    randomize_gates(model)
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        before = model(ids).logits
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        fake = model(ids).logits
    assert isinstance(fake, FakeTensor)
    with torch.no_grad():
        after = model(ids).logits
    assert not isinstance(after, FakeTensor)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_a_gate_added_in_eval_mode_is_in_eval_mode():
    model = tiny_model("llama").eval()
    gp.patch_model(model)
    assert not any(gate.training for gate in (a.attn_gate for a in _attentions(model)))
    model.train()
    assert all(gate.training for gate in (a.attn_gate for a in _attentions(model)))


def test_an_exception_inside_the_attention_leaves_no_input_behind():
    """The hook that releases the block input runs even when the attention forward raises, so a later call of the
    output projection alone is never gated with a stale input."""
    model = gp.patch_model(tiny_model("llama"), gp.GateConfig())
    randomize_gates(model)
    attention = model.model.layers[0].self_attn
    with pytest.raises(RuntimeError):
        attention(torch.randn(1, 3, 7), position_embeddings=None, attention_mask=None)  # wrong hidden size
    y = torch.randn(1, 3, 64)
    torch.testing.assert_close(attention.o_proj(y), torch.nn.functional.linear(y, attention.o_proj.weight,
                                                                               attention.o_proj.bias))


@pytest.mark.parametrize("bias", [True, False])
def test_a_compiled_one_token_gate_is_a_matrix_vector_product_equal_to_eager(bias):
    """Eager gates are `nn.Linear`; while torch.compile traces one token, the gate is mv/addmv with the same values."""
    gate = AttentionGateLinear(16, 8, bias=bias, init="paper", init_std=0.5)
    if bias:
        torch.nn.init.normal_(gate.bias)
    traced = []

    def backend(graph_module, example_inputs):
        traced.append({node.target for node in graph_module.graph.nodes if node.op == "call_function"})
        return graph_module.forward

    compiled = torch.compile(gate, backend=backend, fullgraph=True, dynamic=False)
    one, many = torch.randn(1, 1, 16), torch.randn(1, 3, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(one), gate(one))
        torch.testing.assert_close(compiled(many), gate(many))
    product = torch.addmv if bias else torch.mv
    assert product in traced[0] and product not in traced[1]
