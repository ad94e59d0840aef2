"""Window attention (evicting the first tokens) against independent computations: re-encoding the kept tokens at
their positions, and incremental decoding with a KV cache whose oldest entries are dropped."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import randomize_gates
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, MistralConfig

import gated_patch
from gated_patch.diagnostics import streaming_losses, token_losses, window_attention_mask

SEQ, WINDOW, SINKS = 20, 5, 2


def gated_model(layers: int, attn_implementation: str = "sdpa"):
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = gated_patch.gated_model_from_config(config, attn_implementation=attn_implementation)
    randomize_gates(model)
    return model.eval()


def kept_keys(query: int, window: int, sinks: int) -> list[int]:
    return sorted(set(range(max(0, query - window + 1), query + 1)) | set(range(min(sinks, query + 1))))


def test_mask_allows_exactly_the_window_and_the_sinks():
    mask = window_attention_mask(SEQ, WINDOW, SINKS)[0, 0]
    for q in range(SEQ):
        allowed = [k for k in range(SEQ) if mask[q, k] == 0]
        assert allowed == kept_keys(q, WINDOW, SINKS)
        assert all(mask[q, k] == torch.finfo(torch.float32).min for k in range(SEQ) if k not in allowed)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_one_layer_equals_reencoding_the_kept_tokens(attn_implementation):
    """With one layer, keys depend only on their own token: the window equals running the kept tokens alone."""
    model = gated_model(1, attn_implementation)
    ids = torch.randint(0, 50, (2, SEQ), generator=torch.Generator().manual_seed(1))
    losses = token_losses(model, ids, window_attention_mask(SEQ, WINDOW, SINKS))
    with torch.no_grad():
        for q in range(SEQ - 1):
            keys = kept_keys(q, WINDOW, SINKS)
            logits = model(input_ids=ids[:, keys], position_ids=torch.tensor([keys] * 2)).logits[:, -1]
            expected = torch.nn.functional.cross_entropy(logits, ids[:, q + 1], reduction="none")
            torch.testing.assert_close(losses[:, q], expected, atol=2e-6, rtol=1e-6)


def test_equals_a_kv_cache_that_evicts_its_oldest_tokens():
    """Two layers: each cached key was computed when its token was the query, with that token's own window."""
    model = gated_model(2)
    ids = torch.randint(0, 50, (2, SEQ), generator=torch.Generator().manual_seed(2))
    losses = token_losses(model, ids, window_attention_mask(SEQ, WINDOW, SINKS))
    cache, positions = DynamicCache(config=model.config), []
    with torch.no_grad():
        for q in range(SEQ - 1):
            out = model(input_ids=ids[:, q : q + 1], position_ids=torch.tensor([[q]] * 2), past_key_values=cache)
            expected = torch.nn.functional.cross_entropy(out.logits[:, -1], ids[:, q + 1], reduction="none")
            torch.testing.assert_close(losses[:, q], expected, atol=2e-6, rtol=1e-6)
            positions.append(q)
            keep = [i for i, p in enumerate(positions) if p in kept_keys(q + 1, WINDOW, SINKS)]
            positions = [positions[i] for i in keep]
            for layer in cache.layers:  # evict: what the next query may not see leaves the cache
                layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]


def test_eviction_starts_at_query_window():
    """Up to query window - 1 the cache still holds every token; from query `window` on, position 0 is gone."""
    model = gated_model(2)
    ids = torch.randint(0, 50, (3, SEQ), generator=torch.Generator().manual_seed(3))
    full = token_losses(model, ids)
    windowed = token_losses(model, ids, window_attention_mask(SEQ, WINDOW))
    torch.testing.assert_close(windowed[:, :WINDOW], full[:, :WINDOW], atol=1e-6, rtol=1e-6)
    assert (windowed[:, WINDOW] - full[:, WINDOW]).abs().max() > 1e-4


def test_streaming_losses_average_the_targets_after_the_window():
    model = gated_model(2).train()
    ids = torch.randint(0, 50, (3, SEQ), generator=torch.Generator().manual_seed(3))
    result = streaming_losses(model, ids, WINDOW, sink_tokens=(1, SEQ))
    assert model.training  # restored
    model.eval()
    with torch.no_grad():  # the mean cross-entropy of predicting tokens WINDOW + 1 .. SEQ - 1, token by token
        logits = model(input_ids=ids).logits
        expected = sum(float(torch.nn.functional.cross_entropy(logits[:, q], ids[:, q + 1]))
                       for q in range(WINDOW, SEQ - 1)) / (SEQ - 1 - WINDOW)
    assert result["full"] == pytest.approx(expected, abs=1e-6)
    assert result[f"window+{SEQ}"] == pytest.approx(result["full"], abs=1e-5)  # every token kept: nothing evicted
    assert abs(result["window"] - result["full"]) > 1e-4  # evicting changes the predictions of this random model


def test_bad_arguments_are_refused():
    model = gated_model(1)
    ids = torch.randint(0, 50, (2, SEQ), generator=torch.Generator().manual_seed(6))
    with pytest.raises(ValueError, match="seq > window"):
        streaming_losses(model, ids, window=SEQ - 1)
    with pytest.raises(ValueError, match="window must be at least 1"):
        window_attention_mask(SEQ, 0)
    with pytest.raises(ValueError, match="4D additive mask"):
        token_losses(model, ids, torch.ones_like(ids))
    model.set_attn_implementation("flex_attention")
    with pytest.raises(ValueError, match="needs eager or sdpa"):
        streaming_losses(model, ids, WINDOW)
    sliding = MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    with pytest.raises(ValueError, match="own sliding window of 8 tokens"):
        streaming_losses(AutoModelForCausalLM.from_config(sliding), ids, WINDOW)


def test_an_ungated_model_works_too():
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 50, (2, SEQ), generator=torch.Generator().manual_seed(4))
    result = streaming_losses(model, ids, WINDOW)
    assert set(result) == {"full", "window", "window+1", "window+4"}


def test_a_peft_model_is_measured_with_its_trained_gates():
    """The PEFT model's losses are those of a plain model whose gates are the adapter's trained copies."""
    model = gated_model(2)
    ids = torch.randint(0, 50, (2, SEQ), generator=torch.Generator().manual_seed(5))
    peft_model = gated_patch.get_gated_peft_model(copy.deepcopy(model), gated_patch.gate_only_config())
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if parameter.requires_grad:  # the adapter's trainable gate copies
                parameter.add_(0.7)
                base_name = name.replace("base_model.model.", "").replace("ln_tuning_layers.default.", "")
                model.get_parameter(base_name).add_(0.7)
    assert streaming_losses(peft_model, ids, WINDOW) == pytest.approx(streaming_losses(model, ids, WINDOW), abs=1e-6)
