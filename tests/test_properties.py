"""Property tests (hypothesis) over random small configurations of every registered family.

Each example draws a family, an architecture (heads, KV heads dividing them, head_dim different from
hidden/heads where the family's config has a ``head_dim`` field, attention bias where it is configurable, sliding
window where the family has one, 1-3 layers), an attention implementation and a gate config (granularity, gate
input, bias, activation, a subset of layers or all). Three properties:

* identity at init: patching with ``init="identity"`` leaves the logits unchanged (max |diff| <= 1e-5);
* save / load round trip: ``save_pretrained`` of a patched model with moved gates and
  ``AutoModelForCausalLM.from_pretrained`` with gated_patch imported give the same state dict and equal logits;
* ``unpatch_model`` restores the exact original state dict (same keys, bit-equal tensors), classes and config.

Example counts are fixed below (``EXAMPLES``) and reported in README ("Reliability").
"""

from __future__ import annotations

import tempfile

import pytest
import torch
from conftest import FAMILIES, randomize_gates
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

import gated_patch  # noqa: F401  (registers the gated checkpoint classes with the Auto classes)
from gated_patch import GateConfig, gate_config, gate_parameters, is_patched, patch_model, unpatch_model
from gated_patch.families import registered_model_types

#: hypothesis examples per property and family (reported in README; keep the file under ~1 CI minute on 2 cores)
EXAMPLES = {"identity": 12, "round_trip": 10, "unpatch": 10}

CONFIG_CLASSES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "qwen3": Qwen3Config}
#: families whose config has a `head_dim` field (so head_dim != hidden / heads is a supported configuration)
HEAD_DIM_FIELD = {"llama", "mistral", "qwen3"}
#: families with a configurable q/k/v/o bias (qwen2 always has q/k/v bias; mistral never has one)
ATTENTION_BIAS_FIELD = {"llama", "qwen3"}
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def test_every_registered_family_is_covered():
    assert set(registered_model_types()) == set(FAMILIES) == set(CONFIG_CLASSES)


@st.composite
def architectures(draw, family):
    """``(family, config kwargs)`` of a small random model of `family`: hidden <= 64."""
    heads = draw(st.sampled_from([1, 2, 4, 8]))
    kv_heads = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
    hidden = heads * draw(st.sampled_from([4, 8])) if heads < 8 else 64
    hidden = max(hidden, 16)
    kwargs = dict(
        vocab_size=61,
        hidden_size=hidden,
        intermediate_size=draw(st.sampled_from([16, 40])),
        num_hidden_layers=draw(st.integers(1, 3)),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        tie_word_embeddings=draw(st.booleans()),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        rms_norm_eps=1e-6,
    )
    if family in HEAD_DIM_FIELD:  # always explicit: Qwen3Config's default is 128, not hidden / heads
        other = draw(st.sampled_from([d for d in (4, 6, 10, 12) if d != hidden // heads]))
        kwargs["head_dim"] = other if draw(st.booleans()) else hidden // heads
    if family in ATTENTION_BIAS_FIELD:
        kwargs["attention_bias"] = draw(st.booleans())
    if family == "mistral":
        kwargs["sliding_window"] = draw(st.sampled_from([None, 3, 6]))
    elif family in ("qwen2", "qwen3") and draw(st.booleans()):
        # sliding window on the layers from max_window_layers on (the others keep full attention)
        kwargs.update(use_sliding_window=True, sliding_window=draw(st.sampled_from([3, 6])),
                      max_window_layers=draw(st.integers(0, kwargs["num_hidden_layers"])))
    return family, kwargs


@st.composite
def cases(draw, family, init="identity"):
    family, kwargs = draw(architectures(family))
    num_layers = kwargs["num_hidden_layers"]
    layers = draw(st.one_of(st.none(), st.lists(st.integers(0, num_layers - 1), min_size=1, unique=True)))
    gate = GateConfig(
        granularity=draw(st.sampled_from(["elementwise", "headwise"])),
        gate_input=draw(st.sampled_from(["hidden_states", "attn_output"])),
        bias=draw(st.booleans()),
        activation=draw(st.sampled_from(["sigmoid", "silu"])),
        init=init,
        layers=layers,
    )
    implementation = draw(st.sampled_from(["eager", "sdpa"]))
    seed = draw(st.integers(0, 2**16))
    length = draw(st.integers(2, 10))
    head_dim = kwargs.get("head_dim", kwargs["hidden_size"] // kwargs["num_attention_heads"])
    for label in (  # `pytest --hypothesis-show-statistics` shows how often each feature was drawn
        f"family={family}",
        f"gqa={kwargs['num_key_value_heads'] < kwargs['num_attention_heads']}",
        f"head_dim!=hidden/heads={head_dim != kwargs['hidden_size'] // kwargs['num_attention_heads']}",
        f"sliding_window={bool(kwargs.get('sliding_window')) and kwargs.get('use_sliding_window', True)}",
        f"attention_bias={kwargs.get('attention_bias', family == 'qwen2')}",
        f"layers={'all' if layers is None else 'subset'}",
        f"{gate.granularity}/{gate.gate_input}",
    ):
        event(label)
    return family, kwargs, gate, implementation, seed, length


def build(family, kwargs, implementation, seed):
    torch.manual_seed(seed)
    config = CONFIG_CLASSES[family](**kwargs)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation).eval()
    # transformers' init (std 0.02) keeps projections tiny; use unit-gain weights so every one shapes the logits
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2 and "embed" not in name:
                parameter.normal_(0.0, parameter.shape[1] ** -0.5)
    return model


def inputs(seed, length, vocab):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, : length // 3] = 0  # left padding on the second row
    return ids, mask


def check_architecture(model, family, kwargs):
    """The drawn configuration really is what the model has (guards against configs silently ignoring a field)."""
    attention = model.model.layers[0].self_attn
    head_dim = kwargs.get("head_dim", kwargs["hidden_size"] // kwargs["num_attention_heads"])
    assert attention.head_dim == head_dim
    assert attention.o_proj.in_features == kwargs["num_attention_heads"] * head_dim
    assert attention.k_proj.out_features == kwargs["num_key_value_heads"] * head_dim
    if "attention_bias" in kwargs:
        assert (attention.q_proj.bias is not None) == kwargs["attention_bias"]


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=EXAMPLES["identity"], **SETTINGS)
@given(data=st.data())
@torch.no_grad()
def test_identity_at_init(family, data):
    case = data.draw(cases(family))
    family, kwargs, gate, implementation, seed, length = case
    model = build(family, kwargs, implementation, seed)
    check_architecture(model, family, kwargs)
    ids, mask = inputs(seed, length, kwargs["vocab_size"])
    reference = model(ids, attention_mask=mask).logits
    patch_model(model, gate)
    assert is_patched(model) and gate_config(model) == gate
    expected_layers = range(kwargs["num_hidden_layers"]) if gate.layers is None else gate.layers
    assert len(dict(gate_parameters(model))) == len(expected_layers) * (2 if gate.bias else 1)
    logits = model(ids, attention_mask=mask).logits
    assert reference.abs().max() > 0.1  # the comparison is not between near-zero tensors
    assert (logits - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=EXAMPLES["round_trip"], **SETTINGS)
@given(data=st.data())
@torch.no_grad()
def test_save_load_round_trip(family, data):
    case = data.draw(cases(family))
    family, kwargs, gate, implementation, seed, length = case
    model = build(family, kwargs, implementation, seed)
    patch_model(model, gate)
    randomize_gates(model, seed=seed + 1)
    ids, mask = inputs(seed, length, kwargs["vocab_size"])
    reference = model(ids, attention_mask=mask).logits
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        loaded = AutoModelForCausalLM.from_pretrained(directory, attn_implementation=implementation).eval()
    assert type(loaded) is type(model) and gate_config(loaded) == gate
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    assert torch.equal(loaded(ids, attention_mask=mask).logits, reference)


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=EXAMPLES["unpatch"], **SETTINGS)
@given(data=st.data())
@torch.no_grad()
def test_unpatch_restores_exact_state(family, data):
    case = data.draw(cases(family, init="paper"))
    family, kwargs, gate, implementation, seed, length = case
    model = build(family, kwargs, implementation, seed)
    original_state = {k: v.clone() for k, v in model.state_dict().items()}
    original_classes = [type(m) for m in model.modules()]
    original_config = model.config.to_dict()
    ids, mask = inputs(seed, length, kwargs["vocab_size"])
    reference = model(ids, attention_mask=mask).logits
    patch_model(model, gate)  # paper init: the gates change the output, so unpatching has something to undo
    assert not torch.equal(model(ids, attention_mask=mask).logits, reference)
    unpatch_model(model)
    assert not is_patched(model)
    state = model.state_dict()
    assert state.keys() == original_state.keys()
    assert all(torch.equal(state[k], original_state[k]) for k in state)
    assert [type(m) for m in model.modules()] == original_classes
    assert model.config.to_dict() == original_config
    assert torch.equal(model(ids, attention_mask=mask).logits, reference)
