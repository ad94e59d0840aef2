"""Diagnostics instruments against hand-built models whose answers are known in closed form."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FAMILIES, randomize_gates, tiny_model

import gated_patch
from gated_patch.diagnostics import inspect_model, token_windows

SINK_TOKEN = 5


def _silence_blocks(model) -> None:
    """Zero every attention output and MLP output, so each decoder layer's output equals the embedding (plus any
    planted bias): the residual stream is known exactly at every layer."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            if layer.self_attn.o_proj.bias is not None:
                layer.self_attn.o_proj.bias.zero_()
            layer.mlp.down_proj.weight.zero_()
            if layer.mlp.down_proj.bias is not None:
                layer.mlp.down_proj.bias.zero_()


def _force_attention_to_first_token(model) -> None:
    """Only the sink token has a non-zero key; every query looks for it with a huge score.

    The sink token's embedding is a single spike on hidden dim 0 (no other token uses dim 0). Keys read dim 0 into
    head dim d/2-1, the lowest-frequency rotary pair (rotation < 0.02 rad over 64 positions), so after RoPE the key
    at position 0 and the constant query (from the q bias) still align: score ~ 8 * 100 * 0.25 = 200 vs 0."""
    _silence_blocks(model)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    slot = head_dim // 2 - 1
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed[:, 0] = 0.0
        embed[SINK_TOKEN] = 0.0
        embed[SINK_TOKEN, 0] = 10.0
        for layer in model.model.layers:
            attention = layer.self_attn
            attention.k_proj.weight.zero_()
            attention.k_proj.bias.zero_()
            for kv_head in range(model.config.num_key_value_heads):
                attention.k_proj.weight[kv_head * head_dim + slot, 0] = 100.0
            attention.q_proj.weight.zero_()
            attention.q_proj.bias.zero_()
            for head in range(model.config.num_attention_heads):
                attention.q_proj.bias[head * head_dim + slot] = 1.0


def _tokens_with_sink_every(window: int, num_windows: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    tokens = []
    for _ in range(num_windows):
        body = torch.randint(6, 97, (window - 1,), generator=generator).tolist()
        tokens += [SINK_TOKEN, *body]
    return tokens


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_attention_forced_onto_token_zero_gives_share_one(attn_implementation):
    model = tiny_model("llama", attn_implementation=attn_implementation)
    _force_attention_to_first_token(model)
    tokens = _tokens_with_sink_every(window=32, num_windows=3)

    result = inspect_model(model, tokens, window=32, batch_size=2, progress=False)

    assert model.config._attn_implementation == attn_implementation  # restored after reading weights in eager
    assert result.attn_implementation == attn_implementation
    assert len(result.layers) == 3
    for layer in result.layers:
        assert layer.first_token_share == pytest.approx(1.0, abs=1e-6)
        assert layer.first_token_share_per_head == pytest.approx([1.0] * 4, abs=1e-6)
    assert result.first_token_share_mean == pytest.approx(1.0, abs=1e-6)
    assert result.num_windows == 3 and result.num_tokens == 96


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_attention_share_is_mean_of_one_over_q_plus_one(family):
    """With zero queries, causal attention is uniform: query q puts exactly 1/(q+1) on position 0. 50 tokens in
    windows of 8 give six full windows and a 2-token tail (window 8 <= Mistral's sliding window of 8)."""
    model = tiny_model(family)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.zero_()
            if layer.self_attn.q_proj.bias is not None:
                layer.self_attn.q_proj.bias.zero_()
    tokens = torch.randint(3, 97, (50,), generator=torch.Generator().manual_seed(1)).tolist()

    result = inspect_model(model, tokens, window=8, batch_size=4, progress=False)

    full = sum(1 / (q + 1) for q in range(1, 8))  # one window of 8: queries 1..7
    expected = (6 * full + 1 / 2) / (6 * 7 + 1)  # tail window of 2: query 1 puts 1/2 on position 0
    assert result.num_windows == 7
    for layer in result.layers:
        assert layer.first_token_share == pytest.approx(expected, rel=1e-5)
    assert result.uniform_first_token_share == pytest.approx(expected, rel=1e-9)


def test_first_token_share_matches_output_attentions():
    """Cross-check against transformers' own attention recording (output_attentions=True, eager)."""
    model = tiny_model("qwen2", seed=3)
    tokens = torch.randint(3, 97, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        attentions = model(input_ids=tokens, output_attentions=True).attentions

    result = inspect_model(model, tokens.reshape(-1), window=24, progress=False)

    for layer, weights in zip(result.layers, attentions):
        on_first = weights[:, :, 1:, 0]  # [batch, heads, queries 1..T-1]
        assert layer.first_token_share == pytest.approx(on_first.mean().item(), rel=1e-5)
        assert layer.first_token_share_per_head == pytest.approx(on_first.mean(dim=(0, 2)).tolist(), rel=1e-5)


def test_planted_massive_activation_is_found_at_its_layer():
    model = tiny_model("llama", mlp_bias=True)
    _silence_blocks(model)
    with torch.no_grad():  # layer 1 adds +1000 on channel 7 at every position, layer 2 takes it out again
        model.model.layers[1].mlp.down_proj.bias[7] = 1000.0
        model.model.layers[2].mlp.down_proj.bias[7] = -1000.0
    tokens = torch.randint(3, 97, (40,), generator=torch.Generator().manual_seed(4)).tolist()

    result = inspect_model(model, tokens, window=20, progress=False)

    embedded = model.model.embed_tokens.weight.detach()[tokens]  # [40, hidden]: the residual stream before layer 1
    planted = embedded[:, 7] + 1000.0
    assert result.layers[0].max_abs_activation == pytest.approx(embedded.abs().max().item(), rel=1e-6)
    assert result.layers[1].max_abs_activation == pytest.approx(planted.abs().max().item(), rel=1e-6)
    assert result.layers[1].max_abs_channel == 7
    assert result.layers[1].max_abs_position == int(planted.argmax()) % 20
    assert result.layers[2].max_abs_activation == pytest.approx(embedded.abs().max().item(), rel=1e-4)
    assert result.max_activation == (pytest.approx(planted.abs().max().item(), rel=1e-6), 1)


def test_max_activation_matches_output_hidden_states(family):
    model = tiny_model(family, seed=5)
    tokens = torch.randint(3, 97, (1, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        hidden = model(input_ids=tokens, output_hidden_states=True).hidden_states  # embeddings, layer 0, ...
    result = inspect_model(model, tokens, window=16, progress=False)
    # the last entry of hidden_states is after the final norm, so compare the layers before it
    for layer in result.layers[:-1]:
        assert layer.max_abs_activation == pytest.approx(hidden[layer.layer + 1].abs().max().item(), rel=1e-6)


def test_identity_gates_read_one_and_leave_every_metric_unchanged():
    model = tiny_model("llama", seed=7)
    tokens = torch.randint(3, 97, (48,), generator=torch.Generator().manual_seed(8)).tolist()
    before = inspect_model(model, tokens, window=16, progress=False)
    gated_patch.patch_model(model)  # identity init: g == 1 exactly

    after = inspect_model(model, tokens, window=16, progress=False)

    assert before.gate_mean is None and not before.gated_layers
    assert after.gate_mean == 1.0
    for plain, gated in zip(before.layers, after.layers):
        assert gated.gated and gated.gate_min == 1.0 and gated.gate_max == 1.0
        assert gated.gate_fraction_below == {"0.1": 0.0, "0.01": 0.0}
        assert gated.first_token_share == plain.first_token_share
        assert gated.max_abs_activation == plain.max_abs_activation
        assert gated.mean_abs_gated_output == gated.mean_abs_attn_output == plain.mean_abs_attn_output


def test_headwise_gate_statistics_per_head_from_planted_biases():
    """W = 0, bias b_h: every score of head h is sigmoid(b_h) (paper init: no offset, no scale)."""
    model = tiny_model("llama", seed=9)
    gated_patch.patch_model(model, gated_patch.GateConfig(granularity="headwise", init="paper"))
    biases = torch.tensor([-5.0, 0.0, 5.0, -3.0])  # sigmoid: 0.0067, 0.5, 0.9933, 0.0474
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.attn_gate.weight.zero_()
            layer.self_attn.attn_gate.bias.copy_(biases)
    tokens = torch.randint(3, 97, (40,), generator=torch.Generator().manual_seed(10)).tolist()

    result = inspect_model(model, tokens, window=20, progress=False)

    expected = [1 / (1 + math.exp(-b)) for b in biases.tolist()]
    for layer in result.layers:
        assert layer.gate_mean_per_head == pytest.approx(expected, rel=1e-5)
        assert layer.gate_fraction_below_per_head == {"0.1": [1.0, 0.0, 0.0, 1.0], "0.01": [1.0, 0.0, 0.0, 0.0]}
        assert layer.gate_fraction_below == {"0.1": 0.5, "0.01": 0.25}
        assert layer.gate_mean == pytest.approx(sum(expected) / 4, rel=1e-5)


def test_elementwise_constant_gate_scales_attention_output():
    model = tiny_model("mistral", seed=11)
    gated_patch.patch_model(model, gated_patch.GateConfig(granularity="elementwise", init="paper"))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.attn_gate.weight.zero_()
            layer.self_attn.attn_gate.bias.fill_(-1.0)
    tokens = torch.randint(3, 97, (32,), generator=torch.Generator().manual_seed(12)).tolist()

    result = inspect_model(model, tokens, window=16, progress=False)

    for layer in result.layers:
        assert layer.gate_mean == pytest.approx(1 / (1 + math.e), rel=1e-6)
        assert layer.mean_abs_gated_output == pytest.approx(layer.mean_abs_attn_output / (1 + math.e), rel=1e-5)


def test_partially_gated_model_reports_gates_only_where_they_are():
    model = tiny_model("qwen3", seed=13)
    gated_patch.patch_model(model, gated_patch.GateConfig(layers=[1], init="paper"))
    randomize_gates(model)
    result = inspect_model(model, list(range(3, 35)), window=16, progress=False)
    assert [layer.gated for layer in result.layers] == [False, True, False]
    gated = result.layers[1]
    assert 0.0 < gated.gate_min <= gated.gate_mean <= gated.gate_max < 1.0
    assert result.gate_mean == gated.gate_mean
    json.dumps(result.to_dict())  # every number serialisable


def test_windows_and_bad_input():
    assert token_windows(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert token_windows(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a 1-token tail has no query
    with pytest.raises(ValueError, match="window must be at least 2"):
        token_windows([1, 2, 3], 1)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        inspect_model(tiny_model("llama"), [4], window=8, progress=False)


def test_training_mode_is_restored_and_nothing_stays_hooked():
    model = tiny_model("llama").train()
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    inspect_model(model, list(range(3, 20)), window=8, progress=False)
    assert model.training
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before


def test_peft_wrapped_gates_and_output_projections_report_the_same_statistics():
    import copy

    from gated_patch.adapters import gate_only_config, gates_and_lora_config, get_gated_peft_model

    model = tiny_model("llama", seed=14)
    gated_patch.patch_model(model, gated_patch.GateConfig(init="paper"))
    randomize_gates(model)
    tokens = torch.randint(3, 97, (32,), generator=torch.Generator().manual_seed(15)).tolist()
    reference = inspect_model(model, tokens, window=16, progress=False)

    wrapped = get_gated_peft_model(copy.deepcopy(model), gate_only_config())  # gate called through a PEFT layer
    # o_proj wrapped in a (zero-initialised) LoRA layer: the gate moves to the new module in the slot
    lora = get_gated_peft_model(copy.deepcopy(model), gates_and_lora_config(target_modules=["o_proj"]))
    for other in (inspect_model(wrapped, tokens, window=16, progress=False),
                  inspect_model(lora, tokens, window=16, progress=False)):
        for a, b in zip(reference.layers, other.layers):
            assert b.gated
            assert b.gate_mean_per_head == pytest.approx(a.gate_mean_per_head, rel=1e-5)
            assert b.mean_abs_gated_output == pytest.approx(a.mean_abs_gated_output, rel=1e-5)
            assert b.first_token_share == pytest.approx(a.first_token_share, rel=1e-5)
