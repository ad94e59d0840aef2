"""Training behaviour of patched models: gradients, checkpointing, torch.compile, half precision."""

import pytest
import torch

import gated_patch as gp
from gated_patch.core.gate import apply_gate
from conftest import randomize_gates, tiny_model

INPUT_IDS = torch.tensor([[5, 17, 42, 8, 91, 33, 12, 64, 7, 29, 50, 3], [9, 61, 24, 85, 46, 11, 70, 39, 6, 58, 22, 93]])


def _freeze_all_but_gates(model):
    gate_names = {name for name, _ in gp.gate_parameters(model)}
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in gate_names)
    return gate_names


@pytest.mark.parametrize("granularity", ["elementwise", "headwise"])
@pytest.mark.parametrize("gate_input", ["hidden_states", "attn_output"])
def test_identity_gate_receives_gradients_when_only_gates_train(granularity, gate_input):
    model = tiny_model("llama").train()
    gp.patch_model(model, gp.GateConfig(granularity=granularity, gate_input=gate_input))
    gate_names = _freeze_all_but_gates(model)
    model(INPUT_IDS, labels=INPUT_IDS).loss.backward()
    for name, parameter in model.named_parameters():
        if name in gate_names:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


def test_identity_gate_can_close():
    """From identity init, one gradient step lowers the loss, and a strongly negative bias shuts the gate (g -> 0)."""
    model = tiny_model("llama").train()
    gp.patch_model(model)
    _freeze_all_but_gates(model)
    optimizer = torch.optim.SGD([p for _, p in gp.gate_parameters(model)], lr=0.5)
    first = model(INPUT_IDS, labels=INPUT_IDS).loss
    first.backward()
    optimizer.step()
    assert model(INPUT_IDS, labels=INPUT_IDS).loss.item() < first.item()

    model.eval()
    attention = model.model.layers[0].self_attn
    y = torch.randn(1, 3, attention.o_proj.in_features)
    x = torch.randn(1, 3, model.config.hidden_size)
    with torch.no_grad():
        attention.attn_gate.weight.zero_()
        attention.attn_gate.bias.fill_(-30.0)
        closed = apply_gate(y, x, attention.attn_gate, attention.gate_config, attention.gate_num_heads)
    assert closed.abs().max().item() < 1e-9


def test_gradient_checkpointing_gives_the_same_gradients():
    def gate_grads(checkpointing: bool):
        model = tiny_model("qwen3").train()
        gp.patch_model(model)
        randomize_gates(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(INPUT_IDS, labels=INPUT_IDS).loss.backward()
        return {name: p.grad.clone() for name, p in gp.gate_parameters(model)}

    plain, checkpointed = gate_grads(False), gate_grads(True)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_torch_compile_fullgraph_matches_eager():
    model = tiny_model("llama", attn_implementation="sdpa")
    gp.patch_model(model, gp.GateConfig(granularity="headwise"))
    randomize_gates(model)
    with torch.no_grad():
        eager = model(INPUT_IDS).logits
        compiled = torch.compile(model, fullgraph=True, backend="inductor")(INPUT_IDS).logits
    assert (compiled - eager).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_backward_and_generate(dtype):
    model = tiny_model("mistral", attn_implementation="sdpa")
    gp.patch_model(model)
    randomize_gates(model)
    model.to(dtype)
    assert all(p.dtype == dtype for _, p in gp.gate_parameters(model))
    reference = tiny_model("mistral", attn_implementation="sdpa")
    gp.patch_model(reference)
    randomize_gates(reference)
    with torch.no_grad():
        low = model(INPUT_IDS).logits
        high = reference(INPUT_IDS).logits
    assert low.dtype == dtype
    assert (low.float() - high).abs().max().item() < 0.1  # rounding only: the gated computation is the same
    model.train()
    model(INPUT_IDS, labels=INPUT_IDS).loss.backward()
    assert all(torch.isfinite(p.grad).all() for _, p in gp.gate_parameters(model))
    tokens = model.eval().generate(INPUT_IDS[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert tokens.shape == (1, INPUT_IDS.shape[1] + 4)
