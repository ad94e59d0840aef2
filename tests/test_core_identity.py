"""Identity at init and correct generation, for every registered family, granularity and gate input."""

import itertools

import pytest
import torch

import gated_patch as gp
from conftest import FAMILIES, randomize_gates, tiny_model

VARIANTS = list(itertools.product(("elementwise", "headwise"), ("hidden_states", "attn_output")))
INPUT_IDS = torch.tensor([[5, 17, 42, 8, 91, 33, 12, 64, 7, 29, 50, 3, 77, 18], [9, 61, 24, 85, 46, 11, 70, 39, 6, 58, 22, 93, 15, 44]])


def _greedy(model, input_ids, **kwargs):
    return model.generate(input_ids, max_new_tokens=6, do_sample=False, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("granularity,gate_input", VARIANTS)
@pytest.mark.parametrize("model_type", FAMILIES)
@torch.no_grad()
def test_identity_init_reproduces_logits_and_greedy_tokens(model_type, granularity, gate_input):
    model = tiny_model(model_type)
    reference_logits = model(INPUT_IDS).logits
    reference_tokens = _greedy(model, INPUT_IDS)

    gp.patch_model(model, gp.GateConfig(granularity=granularity, gate_input=gate_input))

    assert (model(INPUT_IDS).logits - reference_logits).abs().max().item() <= 1e-5
    assert torch.equal(_greedy(model, INPUT_IDS), reference_tokens)


@pytest.mark.parametrize("activation", ["sigmoid", "silu"])
@pytest.mark.parametrize("bias", [True, False])
@torch.no_grad()
def test_identity_for_each_activation_and_bias(activation, bias):
    model = tiny_model("llama")
    reference = model(INPUT_IDS).logits
    gp.patch_model(model, gp.GateConfig(activation=activation, bias=bias))
    assert (model(INPUT_IDS).logits - reference).abs().max().item() <= 1e-5


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa", "flex_attention"])
@torch.no_grad()
def test_each_cpu_attention_implementation(attn_implementation):
    """Identity under the implementation, and a non-trivial gate gives the same output as under eager."""
    model = tiny_model("qwen2", attn_implementation=attn_implementation)
    reference = model(INPUT_IDS).logits
    gp.patch_model(model)
    assert (model(INPUT_IDS).logits - reference).abs().max().item() <= 1e-5

    randomize_gates(model)
    eager = tiny_model("qwen2", attn_implementation="eager")
    gp.patch_model(eager)
    randomize_gates(eager)
    gated = model(INPUT_IDS).logits
    assert (gated - reference).abs().max().item() > 1e-3  # the gate does something
    assert (gated - eager(INPUT_IDS).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("model_type", FAMILIES)
@torch.no_grad()
def test_kv_cache_generation_matches_uncached_with_non_identity_gates(model_type):
    model = tiny_model(model_type, attn_implementation="sdpa")
    gp.patch_model(model, gp.GateConfig(granularity="headwise" if model_type == "qwen3" else "elementwise"))
    randomize_gates(model)
    cached = _greedy(model, INPUT_IDS, use_cache=True)
    uncached = _greedy(model, INPUT_IDS, use_cache=False)
    static = _greedy(model, INPUT_IDS, cache_implementation="static")
    assert torch.equal(cached, uncached)
    assert torch.equal(static, uncached)


@torch.no_grad()
def test_gate_is_computed_per_new_token():
    """Teacher-forced logits of the whole sequence equal the logits produced step by step with the cache."""
    model = tiny_model("llama", attn_implementation="sdpa")
    gp.patch_model(model)
    randomize_gates(model)
    full = model(INPUT_IDS[:1]).logits
    prefix = model(INPUT_IDS[:1, :8], use_cache=True)
    cache, steps = prefix.past_key_values, [prefix.logits]
    for position in range(8, INPUT_IDS.shape[1]):
        out = model(INPUT_IDS[:1, position : position + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


@torch.no_grad()
def test_batched_generation_with_left_padding_matches_single_sequences():
    model = tiny_model("mistral", attn_implementation="sdpa")
    gp.patch_model(model)
    randomize_gates(model)
    short = INPUT_IDS[0, :9]
    long = INPUT_IDS[1]
    pad = long.shape[0] - short.shape[0]
    batch = torch.stack([torch.cat([torch.zeros(pad, dtype=torch.long), short]), long])
    mask = torch.ones_like(batch)
    mask[0, :pad] = 0
    batched = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    alone_short = _greedy(model, short[None])
    alone_long = _greedy(model, long[None])
    assert torch.equal(batched[0, pad:], alone_short[0])
    assert torch.equal(batched[1], alone_long[0])


@torch.no_grad()
def test_output_attentions_still_returned():
    model = tiny_model("llama", attn_implementation="eager")
    reference = model(INPUT_IDS, output_attentions=True).attentions
    gp.patch_model(model)
    randomize_gates(model)
    attentions = model(INPUT_IDS, output_attentions=True).attentions
    assert len(attentions) == model.config.num_hidden_layers
    for weights in attentions:
        assert weights.shape == (2, 4, INPUT_IDS.shape[1], INPUT_IDS.shape[1])
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    # Layer 0 attends before any gate acts: same pattern; later layers see gated residuals: different.
    torch.testing.assert_close(attentions[0], reference[0])
    assert (attentions[-1] - reference[-1]).abs().max().item() > 1e-4


@pytest.mark.parametrize("layers", [[0], [0, 2]])
@torch.no_grad()
def test_subset_of_layers(layers):
    model = tiny_model("llama")
    reference = model(INPUT_IDS).logits
    gp.patch_model(model, gp.GateConfig(layers=layers))
    gated_layers = sorted({int(name.split(".")[2]) for name, _ in gp.gate_parameters(model)})
    assert gated_layers == layers
    assert (model(INPUT_IDS).logits - reference).abs().max().item() <= 1e-5
