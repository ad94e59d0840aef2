"""Every class transformers loads a model with gives a gated checkpoint's gated model, or refuses with the fix.

Two families: ``llama`` (registered) and ``gemma`` (found from its structure). A gated causal LM with gates that
change the output is saved; every Auto class the family has and its concrete classes load it with the plugin, and
the Auto classes without it (``trust_remote_code=True``, in a process where gated_patch cannot be imported). Each load
is compared with the saved model (its base model's hidden states) and with the ungated model, so a dropped gate
cannot pass. Patched heads and base models save and load back through their Auto class, and TRL's reward-model path
round-trips.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from conftest import randomize_gates, tiny_model
from test_checkpoints_remote import BLOCK_GATED_PATCH, _run
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForQuestionAnswering,
                          AutoModelForSequenceClassification, AutoModelForTokenClassification, GemmaConfig,
                          GemmaForCausalLM, GemmaForSequenceClassification, GemmaModel, LlamaForCausalLM,
                          LlamaForSequenceClassification, LlamaModel)

import gated_patch
from gated_patch import GatedCheckpointError, UnsupportedModelError

IDS = torch.tensor([[1, 5, 7, 9, 11, 13, 17, 3, 4, 5]])
HEADS = {"AutoModel": AutoModel, "AutoModelForCausalLM": AutoModelForCausalLM,
         "AutoModelForSequenceClassification": AutoModelForSequenceClassification,
         "AutoModelForTokenClassification": AutoModelForTokenClassification}
CONCRETE = {"llama": (LlamaForCausalLM, LlamaModel, LlamaForSequenceClassification),
            "gemma": (GemmaForCausalLM, GemmaModel, GemmaForSequenceClassification)}


def tiny(family: str, head=AutoModelForCausalLM, seed: int = 0):
    """A tiny eager float32 model of `family` with the `head` Auto class (gemma: found by structure, not registered)."""
    if family == "llama":
        return tiny_model("llama", seed=seed) if head is AutoModelForCausalLM else head.from_config(
            tiny_model("llama").config, attn_implementation="eager").eval()
    torch.manual_seed(seed)
    config = GemmaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, pad_token_id=0, max_position_embeddings=64)
    return head.from_config(config, attn_implementation="eager").eval()


def base_states(model) -> torch.Tensor:
    with torch.no_grad():
        return model.base_model(IDS).last_hidden_state


def load(cls, path, **kwargs):
    return cls.from_pretrained(path, attn_implementation="eager", **kwargs).eval()


@pytest.fixture(scope="module", params=["llama", "gemma"])
def saved(request, tmp_path_factory):
    """(family, gated checkpoint, ungated checkpoint of the same weights, the gated model's base hidden states)."""
    family, root = request.param, tmp_path_factory.mktemp(request.param)
    model = gated_patch.patch_model(tiny(family), gated_patch.GateConfig(granularity="headwise"))
    randomize_gates(model)
    model.save_pretrained(root / "gated")
    reference = base_states(model)
    gated_patch.unpatch_model(model).save_pretrained(root / "ungated")
    assert (base_states(model) - reference).abs().max() > 1e-2  # the gates change the hidden states
    return family, root / "gated", root / "ungated", reference


def gate_tensors(model) -> dict[str, torch.Tensor]:
    return {name.split(".", 1)[1] if name.startswith(model.base_model_prefix + ".") else name: tensor
            for name, tensor in gated_patch.gate_parameters(model)}


@pytest.mark.parametrize("head", HEADS)
def test_every_auto_class_loads_the_gated_model_with_the_plugin(saved, head):
    family, gated, ungated, reference = saved
    model = load(HEADS[head], gated)
    assert gated_patch.is_patched(model) and type(model).__name__.startswith("Gated")
    assert (base_states(model) - reference).abs().max() <= 1e-6  # the checkpoint's gates ...
    assert (base_states(model) - base_states(load(HEADS[head], ungated))).abs().max() > 1e-2  # ... which matter
    assert len(gate_tensors(model)) == 2 * 3


@pytest.mark.parametrize("head", ["AutoModelForSequenceClassification", "AutoModelForTokenClassification"])
def test_a_new_head_is_initialised_as_transformers_initialises_it(saved, head):
    """The head's weights come from transformers' init (the same seed gives the same weights as an ungated load)."""
    _, gated, ungated, _ = saved
    torch.manual_seed(7)
    plain = load(HEADS[head], ungated, num_labels=3)
    torch.manual_seed(7)
    model = load(HEADS[head], gated, num_labels=3)
    head_of = {name: tensor for name, tensor in plain.state_dict().items() if not name.startswith(plain.base_model_prefix)}
    assert head_of and all(torch.equal(model.state_dict()[name], tensor) for name, tensor in head_of.items())


def test_every_auto_class_loads_the_gated_model_without_the_plugin(saved, tmp_path):
    family, gated, ungated, reference = saved
    script = BLOCK_GATED_PATCH + textwrap.dedent("""
        import transformers
        results = {}
        for head in json.loads(sys.argv[2]):
            for path in (sys.argv[1], sys.argv[3]):
                model = getattr(transformers, head).from_pretrained(path, trust_remote_code=True,
                                                                    attn_implementation="eager").eval()
                with torch.no_grad():
                    results[f"{head}|{path}"] = [type(model).__name__, model.base_model(torch.tensor(json.loads(
                        sys.argv[4]))).last_hidden_state.tolist()]
        torch.save(results, sys.argv[5])
        """)
    _run(tmp_path, script, str(gated), json.dumps(list(HEADS)), str(ungated), json.dumps(IDS.tolist()),
         str(tmp_path / "out.pt"))
    results = torch.load(tmp_path / "out.pt")
    for head in HEADS:
        name, states = results[f"{head}|{gated}"]
        _, plain = results[f"{head}|{ungated}"]
        assert name.startswith("Gated"), head
        assert (torch.tensor(states) - reference).abs().max() <= 1e-6, head
        assert (torch.tensor(states) - torch.tensor(plain)).abs().max() > 1e-2, head


def test_concrete_classes_load_the_gated_model_with_the_plugin(saved):
    family, gated, _, reference = saved
    for cls in CONCRETE[family]:
        model = load(cls, gated)
        assert isinstance(model, cls) and type(model).__name__ == f"Gated{cls.__name__}" and gated_patch.is_patched(model)
        assert (base_states(model) - reference).abs().max() <= 1e-6, cls.__name__


def test_a_class_of_another_family_is_refused_naming_the_fix(saved):
    family, gated, _, _ = saved
    other = LlamaForCausalLM if family == "gemma" else GemmaForCausalLM
    with pytest.raises(GatedCheckpointError, match=rf"is a gated {family} checkpoint .*would load it without its gates.*"
                                                   r"AutoModelForCausalLM\.from_pretrained"):
        other.from_pretrained(gated)


def test_a_head_transformers_loads_no_weight_into_is_refused_not_loaded_ungated(saved):
    """transformers' Llama question-answering head names its base model ``transformer``, not ``model``, so it loads
    none of a causal LM's weights (upstream, for any Llama checkpoint); a gated checkpoint is refused, saying why."""
    family, gated, _, _ = saved
    if family != "llama":
        with pytest.raises(ValueError, match="Unrecognized configuration class"):  # transformers has no Gemma QA head
            AutoModelForQuestionAnswering.from_pretrained(gated)
        return
    with pytest.raises(GatedCheckpointError, match="names its weights otherwise"):
        AutoModelForQuestionAnswering.from_pretrained(gated)


@pytest.mark.parametrize("family", ["llama", "gemma"])
@pytest.mark.parametrize("head", ["AutoModel", "AutoModelForSequenceClassification"])
def test_a_patched_head_or_base_model_saves_and_loads_back(family, head, tmp_path):
    model = gated_patch.patch_model(tiny(family, HEADS[head]), gated_patch.GateConfig(layers=[0, 2]))
    randomize_gates(model)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [type(model).__name__] and head in config["auto_map"]
    with torch.no_grad():
        expected = model(IDS)[0]
        assert torch.equal(load(HEADS[head], tmp_path)(IDS)[0], expected)
    script = BLOCK_GATED_PATCH + textwrap.dedent("""
        import transformers
        model = getattr(transformers, sys.argv[2]).from_pretrained(sys.argv[1], trust_remote_code=True,
                                                                   attn_implementation="eager").eval()
        with torch.no_grad():
            torch.save(model(torch.tensor(json.loads(sys.argv[3])))[0], sys.argv[4])
        """)
    _run(tmp_path, script, str(tmp_path), head, json.dumps(IDS.tolist()), str(tmp_path / "remote.pt"))
    assert (torch.load(tmp_path / "remote.pt") - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_a_class_no_auto_class_builds_is_refused_at_patch_time(family):
    """Refused before training, the same way for a registered and a discovered family: its checkpoints could not load."""
    base = CONCRETE[family][0]
    custom = type(f"My{base.__name__}", (base,), {})
    model = custom(tiny(family).config).eval()
    with pytest.raises(UnsupportedModelError, match=rf"Cannot gate My{base.__name__} .*no Auto class of transformers "
                                                    rf"builds it.*{base.__name__}"):
        gated_patch.patch_model(model)
    assert not gated_patch.is_patched(model)


def test_without_the_plugin_transformers_warns_about_a_concrete_class_load(saved, tmp_path):
    """What docs/checkpoints.md says happens without the plugin: transformers loads the upstream class, and says so
    twice, naming the gated model type and every gate tensor it drops."""
    family, gated, _, _ = saved
    cls = CONCRETE[family][0].__name__
    script = BLOCK_GATED_PATCH + textwrap.dedent(f"""
        import logging
        for handler in logging.getLogger("transformers").handlers:  # transformers' warnings, on stdout for the test
            handler.setStream(sys.stdout)
        transformers.{cls}.from_pretrained(sys.argv[1])
        """)
    out = _run(tmp_path, script, str(gated))
    assert f"model of type `gated_{family}` to instantiate a model of type `{family}`" in out
    assert "self_attn.attn_gate.weight | UNEXPECTED" in out
