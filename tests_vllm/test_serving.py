"""vLLM serves gated checkpoints exactly as transformers and the plugin compute them, and refuses broken ones."""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import (model_class_name, randomize_gates, save_with_tokenizer, smollm2, tiny_model,
                      transformers_greedy, vllm_engine, vllm_greedy)

import gated_patch as gp

SMOLLM2_CONFIGS = {
    "elementwise/hidden/sigmoid/identity-scale": gp.GateConfig(),
    "headwise/attn_output/silu/no-bias/layer-subset": gp.GateConfig(
        granularity="headwise", gate_input="attn_output", activation="silu", bias=False, layers=[0, 7, 15, 29]),
    "elementwise/attn_output/sigmoid/paper": gp.GateConfig(gate_input="attn_output", init="paper"),
    "headwise/hidden/sigmoid/paper/no-bias": gp.GateConfig(granularity="headwise", init="paper", bias=False),
}


def assert_same_answers(got, want, tolerance=1e-3):
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(got, want, strict=True):
        assert tokens == want_tokens
        assert max(abs(a - b) for a, b in zip(logprobs, want_logprobs, strict=True)) <= tolerance


def assert_gates_act(gated, ungated):
    """The gated model's answers are not the ungated model's: a gate that vanished would go unnoticed otherwise."""
    assert [tokens for tokens, _ in gated] != [tokens for tokens, _ in ungated]


def serve(path, **kwargs):
    llm = vllm_engine(path, **kwargs)
    try:
        return vllm_greedy(llm)
    finally:
        del llm
        gc.collect()


@pytest.mark.parametrize("name", SMOLLM2_CONFIGS)
def test_smollm2_gated_checkpoints_give_transformers_tokens_and_logprobs(name, tmp_path, smollm2_answers_ungated):
    model = gp.patch_model(smollm2(), SMOLLM2_CONFIGS[name])
    randomize_gates(model, std=0.3)
    want = transformers_greedy(model)
    assert [tokens for tokens, _ in want] != [tokens for tokens, _ in smollm2_answers_ungated]  # the gates act
    assert_same_answers(serve(save_with_tokenizer(model, tmp_path / "gated")), want)


#: The class vLLM serves each family with: vLLM's own model with the gate, or (Phi: vLLM has no class of its own)
#: vLLM's Transformers backend around the gated transformers model.
ROUTES = {"llama": "GatedLlamaForCausalLM", "qwen2": "GatedQwen2ForCausalLM", "mistral": "GatedMistralForCausalLM",
          "qwen3": "GatedQwen3ForCausalLM", "gemma2": "GatedGemma2ForCausalLM", "phi": "GatedTransformersForCausalLM"}


@pytest.mark.parametrize("model_type", ROUTES)
def test_every_family_serves_exactly_through_its_route(model_type, tmp_path):
    model = gp.patch_model(tiny_model(model_type), gp.GateConfig(granularity="headwise", bias=True))
    randomize_gates(model)
    ungated = transformers_greedy(tiny_model(model_type))
    want = transformers_greedy(model)
    assert_gates_act(want, ungated)
    llm = vllm_engine(save_with_tokenizer(model, tmp_path / model_type))
    try:
        assert llm.apply_model(model_class_name) == [ROUTES[model_type]]
        assert_same_answers(vllm_greedy(llm), want)
    finally:
        del llm
        gc.collect()


def test_a_gate_only_adapter_merged_into_a_gated_checkpoint_serves_exactly(tmp_path):
    """vLLM serves neither `modules_to_save` nor LNTuning adapters: merge the adapter, save, serve."""
    peft_model = gp.get_gated_peft_model(gp.patch_model(tiny_model("llama"), gp.GateConfig()), gp.gate_only_config())
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=50.0)
    for _ in range(3):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    merged = peft_model.merge_and_unload().eval()
    assert gp.is_patched(merged)
    want = transformers_greedy(merged)
    assert [t for t, _ in want] != [t for t, _ in transformers_greedy(tiny_model("llama"))]  # training moved the gates
    assert_same_answers(serve(save_with_tokenizer(merged, tmp_path / "merged")), want)


def test_vllms_compiled_model_keeps_the_gate(tmp_path):
    """vLLM's default mode traces the model with torch.compile (CUDA graphs on GPU): the gate is in the graph."""
    model = gp.patch_model(tiny_model("llama"), gp.GateConfig(gate_input="attn_output", activation="silu"))
    randomize_gates(model)
    assert_same_answers(serve(save_with_tokenizer(model, tmp_path / "gated"), enforce_eager=False),
                        transformers_greedy(model))



@pytest.mark.parametrize("model_type", ["llama", "phi"], ids=["vllm-class", "transformers-backend"])
def test_a_weight_update_of_one_gate_is_served_and_a_reshaped_one_refused(model_type, tmp_path):
    """vLLM's in-place weight update (``reload_weights``, what an RL trainer syncs weights with) calls the model's
    ``load_weights`` with some tensors: after the checkpoint none is required, each gate tensor is still checked."""
    model = gp.patch_model(tiny_model(model_type), gp.GateConfig(granularity="headwise", bias=True))
    randomize_gates(model)
    path = save_with_tokenizer(model, tmp_path / model_type)
    before = transformers_greedy(model)
    gate = model.model.layers[1].self_attn.attn_gate
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=torch.Generator().manual_seed(7)))
    after = transformers_greedy(model)  # before vLLM's backend builds this class into an engine of this process
    assert_gates_act(after, before)  # the update changes the answers
    name = "model.layers.1.self_attn.attn_gate.weight"
    llm = vllm_engine(path)
    try:
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": [(name, gate.weight.detach().clone())]})
        llm.reset_prefix_cache()
        assert_same_answers(vllm_greedy(llm), after)
        with pytest.raises(gp.GatedCheckpointError, match=r"attn_gate.weight \(3, 256\): the config implies \(4, 256\)"):
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": [(name, torch.zeros(3, 256))]})
    finally:
        del llm
        gc.collect()
