"""`query_group_stats` against attention weights and gate scores computed here from the model's own outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import randomize_gates, tiny_model

import gated_patch
from gated_patch.diagnostics import query_group_stats


@pytest.fixture(scope="module")
def setting():
    model = gated_patch.patch_model(tiny_model("llama", attn_implementation="sdpa"),
                                    gated_patch.GateConfig(granularity="headwise", init="paper"))
    randomize_gates(model)
    ids = torch.randint(3, 97, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.4
    return model, ids, mask


def expected(model, ids, mask):
    """Per layer: mean attention on key 0 and mean gate score over the masked queries at positions >= 1."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_attentions=True, output_hidden_states=True)
    finally:
        model.set_attn_implementation("sdpa")
    selected = mask.clone()
    selected[:, 0] = False
    shares, gates = [], []
    for index, layer in enumerate(model.model.layers):
        shares.append(float(out.attentions[index][..., 0].mean(dim=1)[selected].mean()))
        normed = layer.input_layernorm(out.hidden_states[index])  # the gate reads the normed input of q/k/v
        with torch.no_grad():
            scores = torch.sigmoid(normed @ layer.self_attn.attn_gate.weight.T + layer.self_attn.attn_gate.bias)
        gates.append(float(scores.mean(dim=-1)[selected].mean()))
    return shares, gates


def test_groups_match_an_independent_computation(setting):
    model, ids, mask = setting
    stats = query_group_stats(model, ids, {"in": mask, "out": ~mask})
    for name, group in (("in", mask), ("out", ~mask)):
        shares, gates = expected(model, ids, group)
        assert stats[name].first_token_share == pytest.approx(shares, abs=1e-6)
        assert stats[name].gate_mean == pytest.approx(gates, abs=1e-6)
        assert stats[name].num_queries == int(group[:, 1:].sum())


def test_model_is_restored_and_bad_masks_are_refused(setting):
    model, ids, mask = setting
    model.train()
    query_group_stats(model, ids, {"all": torch.ones_like(mask)})
    assert model.training and model.config._attn_implementation == "sdpa"
    model.eval()
    with pytest.raises(ValueError, match="bool mask shaped like input_ids"):
        query_group_stats(model, ids, {"bad": mask.int()})
    with pytest.raises(ValueError, match="bool mask shaped like input_ids"):
        query_group_stats(model, ids, {"bad": mask[:, :5]})


def test_ungated_model_and_empty_group():
    model = tiny_model("llama")
    ids = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(2))
    empty = torch.zeros_like(ids, dtype=torch.bool)
    stats = query_group_stats(model, ids, {"none": empty, "all": ~empty})
    assert stats["all"].gate_mean is None and stats["none"].num_queries == 0
    assert all(v != v for v in stats["none"].first_token_share)  # NaN: no query to average
    assert all(0 < v < 1 for v in stats["all"].first_token_share)


def test_a_peft_model_is_measured_with_its_trained_gates(setting):
    """Stats of a PEFT model follow the adapter's trained gate copies, not the frozen gates beneath them."""
    model, ids, mask = setting
    peft_model = gated_patch.get_gated_peft_model(copy.deepcopy(model), gated_patch.gate_only_config())
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(0.7)
                reference.get_parameter(name.replace("base_model.model.", "").replace("ln_tuning_layers.default.", "")).add_(0.7)
    measured = query_group_stats(peft_model, ids, {"in": mask})["in"]
    expected = query_group_stats(reference, ids, {"in": mask})["in"]
    unchanged = query_group_stats(model, ids, {"in": mask})["in"]
    assert measured.gate_mean == pytest.approx(expected.gate_mean, abs=1e-6)
    assert measured.gate_mean != pytest.approx(unchanged.gate_mean, abs=1e-3)
    assert measured.first_token_share == pytest.approx(expected.first_token_share, abs=1e-6)
