"""``load_weights``, the hook vLLM's Transformers backend loads a model through, on every gated class (the plugin's and
the remote code's): each gate tensor is checked, then vLLM's own loader loads the weights.

vLLM's ``AutoWeightsLoader`` is a stand-in here with its calling convention and its two blind spots (a surplus
``.bias`` is ignored, a missing parameter is not reported); tests_vllm/test_without_plugin.py runs the real one.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from conftest import randomize_gates, tiny_model
from transformers import AutoConfig, AutoModel

import gated_patch as gp
from gated_patch import GatedCheckpointError

IDS = torch.tensor([[1, 5, 7, 9, 11, 13, 17, 3]])
GATE = "layers.1.self_attn.attn_gate.weight"


class StandInAutoWeightsLoader:
    """``AutoWeightsLoader(module).load_weights(weights)``: copies each tensor into its parameter, returns the names."""

    def __init__(self, module):
        self.module = module

    def load_weights(self, weights):
        parameters, loaded = dict(self.module.named_parameters()), set()
        for name, tensor in weights:
            if name not in parameters and name.endswith(".bias"):
                continue  # vLLM ignores unexpected biases
            parameters[name].data.copy_(tensor[: len(parameters[name])])  # a column-parallel loader narrows
            loaded.add(name)
        return loaded


@pytest.fixture
def vllm_loader(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm.model_executor.models.utils",
                        types.SimpleNamespace(AutoWeightsLoader=StandInAutoWeightsLoader))


@pytest.fixture
def saved(tmp_path):
    """A gated Llama (gates without bias on layers 0 and 1, moved away from identity) and its config as loaded."""
    model = gp.patch_model(tiny_model("llama"), gp.GateConfig(bias=False, layers=[0, 1]))
    randomize_gates(model)
    model.save_pretrained(tmp_path)
    return model, AutoConfig.from_pretrained(tmp_path)


def hidden_states(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).last_hidden_state


def test_a_complete_checkpoint_loads_through_vllms_loader(saved, vllm_loader):
    model, config = saved
    target = AutoModel.from_config(config, attn_implementation="eager").eval()
    weights = model.model.state_dict()
    assert target.load_weights(iter(weights.items())) == set(weights)
    assert torch.equal(hidden_states(target), hidden_states(model.model))
    ungated = tiny_model("llama").model
    assert not torch.allclose(hidden_states(target), hidden_states(ungated), atol=1e-3)


@pytest.mark.parametrize("edit, message", [
    (lambda w: w.pop(GATE), rf"1 gate tensors missing \(\['{GATE}'\]\)"),
    (lambda w: w.update({GATE: torch.zeros(w[GATE].shape[0] + 1, w[GATE].shape[1])}), rf"{GATE} \(65, 64\): the config implies \(64, 64\)"),
    (lambda w: w.update({GATE.replace("weight", "bias"): torch.zeros(64)}), r"attn_gate.bias \(64,\): no gate of GateConfig"),
    (lambda w: w.update({"layers.2.self_attn.attn_gate.weight": w[GATE].clone()}), r"layers.2.self_attn.attn_gate.weight .*no gate of"),
], ids=["missing", "reshaped", "surplus-bias", "ungated-layer"])
def test_a_broken_gate_tensor_is_refused_where_vllms_loader_would_serve_it(saved, vllm_loader, edit, message):
    model, config = saved
    weights = dict(model.model.state_dict())
    edit(weights)
    target = AutoModel.from_config(config, attn_implementation="eager")
    with pytest.raises(GatedCheckpointError, match=message):
        target.load_weights(iter(weights.items()))


def test_outside_vllm_load_weights_names_from_pretrained(saved):
    model, config = saved
    with pytest.raises(GatedCheckpointError, match="vLLM's loading hook: load a gated checkpoint with from_pretrained"):
        AutoModel.from_config(config).load_weights(iter(model.model.state_dict().items()))


def test_after_the_checkpoint_a_load_updates_some_tensors_each_gate_still_checked(saved, vllm_loader):
    """The first load is the checkpoint (every gate tensor); later ones are weight updates, as an RL trainer syncs."""
    model, config = saved
    target = AutoModel.from_config(config, attn_implementation="eager").eval()
    weights = model.model.state_dict()
    with pytest.raises(GatedCheckpointError, match="gate tensors missing"):
        target.load_weights(iter([(GATE, weights[GATE])]))  # a first load without every gate: not a checkpoint
    target.load_weights(iter(weights.items()))
    new_gate = torch.randn(weights[GATE].shape, generator=torch.Generator().manual_seed(3))
    assert target.load_weights(iter([(GATE, new_gate)])) == {GATE}
    assert torch.equal(target.get_parameter(GATE), new_gate)
    assert target.load_weights(iter([("norm.weight", weights["norm.weight"])])) == {"norm.weight"}
    with pytest.raises(GatedCheckpointError, match="the config implies"):
        target.load_weights(iter([(GATE, new_gate[:3])]))
