"""gated_patch.adapters on tiny models: the three recipes through PEFT's own save / load / resume / merge, the gate
record, and the errors that keep a gate tensor from vanishing."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper
from safetensors.torch import load_file

import gated_patch
from gated_patch import GateConfig
from gated_patch.adapters import (
    SIDECAR_NAME,
    GatedAdapterError,
    gate_lora_config,
    gate_only_config,
    gates_and_lora_config,
    get_gated_peft_model,
    load_gated_adapter,
    read_record,
    verify_adapter_loaded,
)
from conftest import randomize_gates, tiny_model

GATE = "attn_gate"
NUM_LAYERS = 3
X = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(0))


def patched(config: GateConfig | None = None, seed: int = 0):
    model = tiny_model("llama", seed=seed)
    gated_patch.patch_model(model, config or GateConfig())
    return model


def gate_param_count(model) -> int:
    return sum(p.numel() for _, p in gated_patch.gate_parameters(model))


def recipe(name: str, model):
    if name == "gates-ln_tuning":
        return gate_only_config()
    if name == "gates-modules_to_save":
        return gate_only_config(route="modules_to_save")
    if name == "gates+lora":
        return gates_and_lora_config(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])
    if name == "gate-lora":
        return gate_lora_config(model, r=4, lora_alpha=8)
    raise AssertionError(name)


RECIPES = ["gates-ln_tuning", "gates-modules_to_save", "gates+lora", "gate-lora"]


def perturb_trainable(peft_model, seed: int = 3, std: float = 0.3) -> None:
    """Stand-in for training: move every trainable tensor (gates, LoRA A and B) to random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in peft_model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(X).logits


@pytest.fixture(params=RECIPES)
def trained(request, tmp_path):
    """(recipe name, adapter dir, logits of the trained adapter model)."""
    model = patched()
    peft_model = get_gated_peft_model(model, recipe(request.param, model))
    perturb_trainable(peft_model)
    reference = logits(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    return request.param, tmp_path / "adapter", reference


def test_trainable_parameters_and_saved_tensors(trained):
    name, directory, _ = trained
    model = patched()
    peft_model = get_gated_peft_model(model, recipe(name, model))
    trainable = {n: p.numel() for n, p in peft_model.named_parameters() if p.requires_grad}
    saved = load_file(str(directory / "adapter_model.safetensors"))
    gate_keys = [k for k in saved if f".{GATE}." in k]
    if name.startswith("gates-"):  # gate-only: exactly the gate parameters train, and only gates are saved
        assert all(f".{GATE}." in n for n in trainable)
        assert sum(trainable.values()) == gate_param_count(patched())
        assert sorted(saved) == sorted(gate_keys) and len(saved) == 2 * NUM_LAYERS  # weight + bias per layer
    elif name == "gates+lora":
        assert sum(v for n, v in trainable.items() if f".{GATE}." in n) == gate_param_count(patched())
        lora = sorted({k.split(".")[-3] for k in saved if "lora_" in k})
        assert lora == ["o_proj", "q_proj", "v_proj"]
        assert len(gate_keys) == 2 * NUM_LAYERS and not any("lora_" in k for k in gate_keys)
    else:  # LoRA on the gate: only low-rank factors of the gate
        assert sorted(saved) == sorted(gate_keys) and all("lora_" in k for k in saved)
        assert len(saved) == 2 * NUM_LAYERS


def test_record_written_beside_adapter(trained):
    name, directory, _ = trained
    record = read_record(directory)
    assert record["gate_config"] == GateConfig().to_dict()
    assert record["gate_modules"] == [f"model.layers.{i}.self_attn.{GATE}" for i in range(NUM_LAYERS)]
    assert record["gate_tensors"] == ("delta" if name == "gate-lora" else "full")
    assert (directory / "adapter_config.json").is_file()


def test_plain_peft_from_pretrained_on_patched_base_reproduces(trained):
    _, directory, reference = trained
    loaded = PeftModel.from_pretrained(patched(), directory)
    torch.testing.assert_close(logits(loaded), reference, rtol=0, atol=0)


def test_load_gated_adapter_patches_unpatched_base_as_recorded(trained):
    _, directory, reference = trained
    base = tiny_model("llama")
    loaded = load_gated_adapter(base, directory)
    assert gated_patch.is_patched(base) and gated_patch.gate_config(base) == GateConfig()
    torch.testing.assert_close(logits(loaded), reference, rtol=0, atol=0)


def test_resume_training_with_is_trainable(trained, tmp_path):
    name, directory, reference = trained
    for loaded in (
        PeftModel.from_pretrained(patched(), directory, is_trainable=True),
        load_gated_adapter(tiny_model("llama"), directory, is_trainable=True),
    ):
        trainable = [p for p in loaded.parameters() if p.requires_grad]
        assert trainable
        torch.testing.assert_close(logits(loaded), reference, rtol=0, atol=0)
        loaded.train()
        optimizer = torch.optim.SGD(trainable, lr=0.5)
        loss = loaded(X, labels=X).loss
        loss.backward()
        optimizer.step()
        assert not torch.allclose(logits(loaded), reference)  # the resumed adapter really trains
    # and the resumed model saves a record again
    loaded.save_pretrained(tmp_path / "resumed")
    assert read_record(tmp_path / "resumed")["gate_tensors"] == ("delta" if name == "gate-lora" else "full")


def test_merge_and_unload_gives_patched_model_with_same_logits(trained):
    _, directory, reference = trained
    merged = load_gated_adapter(tiny_model("llama"), directory).merge_and_unload()
    assert not isinstance(merged, PeftModel)
    assert not any(isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)) for m in merged.modules())
    assert gated_patch.is_patched(merged) and gated_patch.gate_config(merged) == GateConfig()
    assert merged.config.attn_output_gate == GateConfig().to_dict()
    assert all(type(merged.get_submodule(f"model.layers.{i}.self_attn.{GATE}")).__name__ == "AttentionGateLinear"
               for i in range(NUM_LAYERS))
    torch.testing.assert_close(logits(merged), reference, rtol=1e-5, atol=1e-5)


def test_lora_on_o_proj_sees_gated_input_and_merges_exactly():
    model = patched()
    randomize_gates(model)  # gates far from 1, so applying them twice or not at all would show
    plain_logits = logits(model)
    peft_model = get_gated_peft_model(model, gates_and_lora_config(target_modules=["o_proj"], r=4))
    torch.testing.assert_close(logits(peft_model), plain_logits, rtol=0, atol=0)  # B=0: the gate applies exactly once
    perturb_trainable(peft_model, std=0.2)
    adapted = logits(peft_model)
    assert not torch.allclose(adapted, plain_logits)
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(logits(merged), adapted, rtol=1e-5, atol=1e-5)


def test_second_adapter_gets_its_own_record(tmp_path):
    model = patched()
    peft_model = get_gated_peft_model(model, gates_and_lora_config(target_modules=["q_proj"]))
    # PEFT cannot mix LoRA with LNTuning adapters, nor LoRA on a gate that modules_to_save already wraps
    peft_model.add_adapter("extra", gate_only_config(route="modules_to_save"))
    peft_model.save_pretrained(tmp_path)
    assert read_record(tmp_path)["gate_tensors"] == "full"
    assert read_record(tmp_path / "extra")["gate_tensors"] == "full"
    assert all(f".{GATE}." in k for k in load_file(str(tmp_path / "extra" / "adapter_model.safetensors")))
    loaded = load_gated_adapter(tiny_model("llama"), tmp_path)
    load_gated_adapter(loaded, tmp_path / "extra", adapter_name="extra")
    assert set(loaded.peft_config) == {"default", "extra"}


def test_save_into_existing_directory_keeps_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    peft_model = get_gated_peft_model(patched(), gate_only_config())
    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert read_record(tmp_path) is not None
    assert not [p for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}.tmp-")]


# ------------------------------------------------------------------------------------------- errors and refusals
def test_unpatched_base_error_names_adapter_modules_and_fix(trained):
    _, directory, _ = trained
    with pytest.raises(GatedAdapterError) as info:
        load_gated_adapter(tiny_model("llama"), directory, patch_base=False)
    message = str(info.value)
    assert str(directory) in message
    assert f"model.layers.0.self_attn.{GATE}" in message
    assert f"gated_patch.load_gated_adapter(base_model, '{directory}')" in message


def test_gate_adapter_into_peft_model_with_unpatched_base_raises(trained, tmp_path):
    _, directory, _ = trained
    from peft import LoraConfig, get_peft_model

    plain = get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(GatedAdapterError) as info:
        load_gated_adapter(plain, directory, adapter_name="gates")
    message = str(info.value)
    assert str(directory) in message and f"self_attn.{GATE}" in message and "load_gated_adapter(base_model" in message


def test_plain_get_peft_model_saves_the_record_too(tmp_path):
    from peft import get_peft_model

    model = patched(GateConfig(granularity="headwise"))
    peft_model = get_peft_model(model, gate_only_config())  # what TRL's trainers call: not get_gated_peft_model
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(0.25)
    peft_model.save_pretrained(tmp_path)
    assert read_record(tmp_path)["gate_config"]["granularity"] == "headwise"
    loaded = load_gated_adapter(tiny_model("llama"), tmp_path)  # patched as recorded
    ids = torch.tensor([[3, 5, 7, 11]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, peft_model(ids).logits)


def test_adapter_without_record_onto_unpatched_base_raises(tmp_path):
    peft_model = get_gated_peft_model(patched(), gate_only_config(route="modules_to_save"))
    peft_model.save_pretrained(tmp_path)
    (tmp_path / SIDECAR_NAME).unlink()  # e.g. an adapter saved without gated_patch installed
    with pytest.raises(GatedAdapterError, match="gated_patch.patch_model"):
        load_gated_adapter(tiny_model("llama"), tmp_path)
    # onto a base patched by hand it loads, and the tensors are verified
    loaded = load_gated_adapter(patched(), tmp_path)
    assert any(GATE in n for n, _ in loaded.named_parameters())


def test_verify_adapter_loaded_catches_silently_dropped_gates(tmp_path):
    peft_model = get_gated_peft_model(patched(), gate_only_config(route="modules_to_save"))
    peft_model.save_pretrained(tmp_path)
    dropped = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)  # plain PEFT: silently drops the gates
    with pytest.raises(GatedAdapterError, match="tensors missing"):
        verify_adapter_loaded(dropped, tmp_path)


@pytest.mark.parametrize("peft_warnings", ["error", "ignore"])
def test_gate_checks_hold_whether_peft_warns_or_not(tmp_path, peft_warnings):
    """The refusals come from the gate record and the tensors, before PEFT loads anything: turning PEFT's own
    warnings into errors, or silencing them, changes nothing."""
    import warnings

    peft_model = get_gated_peft_model(patched(), gate_only_config(route="modules_to_save"))
    peft_model.save_pretrained(tmp_path / "recorded")
    peft_model.save_pretrained(tmp_path / "plain")
    (tmp_path / "plain" / SIDECAR_NAME).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter(peft_warnings)
        with pytest.raises(GatedAdapterError, match=f"lacks the gate modules .*self_attn.{GATE}"):
            load_gated_adapter(tiny_model("llama"), tmp_path / "recorded", patch_base=False)
        with pytest.raises(GatedAdapterError, match="has no gated_patch_adapter.json"):
            load_gated_adapter(tiny_model("llama"), tmp_path / "plain")
        assert any(GATE in n for n, _ in load_gated_adapter(tiny_model("llama"), tmp_path / "recorded").named_parameters())


def test_base_patched_with_other_config_raises(trained):
    _, directory, _ = trained
    with pytest.raises(GatedAdapterError, match="headwise"):
        load_gated_adapter(patched(GateConfig(granularity="headwise")), directory)


def test_gate_lora_refused_on_random_or_trained_gates():
    with pytest.raises(GatedAdapterError, match="init='paper'"):
        gate_lora_config(patched(GateConfig(init="paper")))
    trained_gates = patched()
    randomize_gates(trained_gates)
    with pytest.raises(GatedAdapterError, match="moved away from their identity init"):
        gate_lora_config(trained_gates)
    from peft import LoraConfig

    with pytest.raises(GatedAdapterError, match="LoRA on the gate is refused"):  # a raw LoraConfig is checked too
        get_gated_peft_model(patched(GateConfig(init="paper")), LoraConfig(target_modules=[GATE]))


def test_gate_lora_on_base_loaded_from_gated_checkpoint(tmp_path):
    """Random (paper-init) gates are fine for gate LoRA once they are stored in the base checkpoint."""
    from transformers import AutoModelForCausalLM

    source = patched(GateConfig(init="paper"))
    source.save_pretrained(tmp_path / "base")  # the gated checkpoint format (gated_patch.checkpoints)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft_model = get_gated_peft_model(base, gate_lora_config(base, r=4))
    perturb_trainable(peft_model)
    reference = logits(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = load_gated_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded), reference, rtol=0, atol=0)


def test_merged_gate_adapter_saves_the_gated_checkpoint_format(trained, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    _, directory, reference = trained
    merged = load_gated_adapter(tiny_model("llama"), directory).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["model_type"] == "gated_llama"
    assert GateConfig.from_dict(config["attn_output_gate"]) == GateConfig()
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as handle:
        names = set(handle.keys())
    assert {n for n in names if f".{GATE}." in n} == {
        f"model.layers.{i}.self_attn.{GATE}.{p}" for i in range(NUM_LAYERS) for p in ("weight", "bias")
    }
    assert not [n for n in names if any(t in n for t in ("lora_", "modules_to_save", "ln_tuning", "base_layer"))]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert gated_patch.is_patched(reloaded) and gated_patch.gate_config(reloaded) == GateConfig()
    torch.testing.assert_close(logits(reloaded), reference, rtol=1e-5, atol=1e-5)


def test_gate_lora_adapter_onto_different_base_gates_raises(tmp_path):
    model = patched()
    get_gated_peft_model(model, gate_lora_config(model)).save_pretrained(tmp_path)
    other = patched()
    randomize_gates(other)
    with pytest.raises(GatedAdapterError, match="SHA-256"):
        load_gated_adapter(other, tmp_path)


def test_get_gated_peft_model_needs_patched_model():
    with pytest.raises(gated_patch.NotPatchedError, match="patch_model"):
        get_gated_peft_model(tiny_model("llama"), gate_only_config())


@pytest.mark.parametrize("targets", [None, [], ["attn_gate"], ["self_attn.attn_gate"], r".*\.attn_gate"])
def test_gates_and_lora_config_refuses_bad_targets(targets):
    with pytest.raises(GatedAdapterError):
        gates_and_lora_config(target_modules=targets)


def test_gates_and_lora_all_linear_excludes_the_gate():
    peft_model = get_gated_peft_model(patched(), gates_and_lora_config(target_modules="all-linear", r=2))
    gate = peft_model.get_base_model().get_submodule(f"model.layers.0.self_attn.{GATE}")
    assert isinstance(gate, ModulesToSaveWrapper)  # trained whole, not LoRA
    lora = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if isinstance(m, BaseTunerLayer)}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= lora


def test_gate_only_config_rejects_unknown_route():
    with pytest.raises(GatedAdapterError, match="route"):
        gate_only_config(route="prefix")


def test_record_is_json_with_versions(trained):
    _, directory, _ = trained
    data = json.loads((directory / SIDECAR_NAME).read_text())
    assert data["format"] == "gated_patch.adapter" and data["format_version"] == 1
    assert len(data["base_gate_sha256"]) == 64


@pytest.mark.parametrize("text, named", [
    ("{not json", r"cannot read it as JSON .*re-save the adapter"),
    ("[1, 2]", r"expected a JSON object.*re-save the adapter"),
    ('{"format": "something.else"}', r"not a gated_patch adapter record"),
])  # fmt: skip
def test_a_bad_record_is_a_gated_adapter_error_naming_the_file(tmp_path, text, named):
    (tmp_path / SIDECAR_NAME).write_text(text)
    with pytest.raises(GatedAdapterError, match=named) as error:
        read_record(tmp_path)
    assert str(tmp_path / SIDECAR_NAME) in str(error.value)


def test_plain_adapter_into_plain_peft_model_on_unpatched_base(tmp_path):
    """A LoRA adapter without gates goes through load_gated_adapter unchanged (and is verified)."""
    from peft import LoraConfig, get_peft_model

    source = get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["q_proj"], r=2))
    perturb_trainable(source)
    source.save_pretrained(tmp_path)
    target = get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["v_proj"], r=2))
    loaded = load_gated_adapter(target, tmp_path, adapter_name="other")
    assert set(loaded.peft_config) == {"default", "other"} and not gated_patch.is_patched(loaded.get_base_model())
    loaded.set_adapter("other")
    torch.testing.assert_close(logits(loaded), logits(source), rtol=0, atol=0)


def test_a_reused_peft_config_records_each_models_own_gate(tmp_path):
    config = gate_only_config()  # one config object for two models, as a training script may do
    for name, gate in (("sigmoid", GateConfig()), ("silu", GateConfig(activation="silu"))):
        from peft import get_peft_model

        get_peft_model(patched(gate), config).save_pretrained(tmp_path / name)
        assert read_record(tmp_path / name)["gate_config"]["activation"] == gate.activation
    assert type(config).__name__ == "LNTuningConfig"  # the caller's object is left as it was


def test_bound_configs_pickle_and_copy_as_plain_peft_configs(tmp_path):
    import copy
    import pickle

    peft_model = get_gated_peft_model(patched(), gate_only_config())
    bound = peft_model.peft_config["default"]
    for clone in (copy.deepcopy(bound), pickle.loads(pickle.dumps(bound))):
        assert type(clone).__name__ == "LNTuningConfig" and clone.to_dict() == bound.to_dict()
    torch.save(peft_model, tmp_path / "model.pt")  # the whole PEFT model still pickles


def test_an_added_adapter_gets_its_record(tmp_path):
    peft_model = get_gated_peft_model(patched(), gate_only_config())
    peft_model.add_adapter("extra", gate_only_config())
    peft_model.save_pretrained(tmp_path)
    assert read_record(tmp_path)["gate_tensors"] == read_record(tmp_path / "extra")["gate_tensors"] == "full"


def test_gates_stored_in_a_sharded_base_checkpoint_are_found_through_its_index(tmp_path):
    """Trained gates are reproducible when the checkpoint the model came from holds them; only the files its index
    lists count, so a stray safetensors file beside them (other gate values) changes nothing."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from gated_patch.adapters import gates_reproducible

    model = tiny_model("llama")
    gated_patch.patch_model(model)
    randomize_gates(model)
    model.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    assert (tmp_path / "base" / "model.safetensors.index.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert gates_reproducible(reloaded) == (True, "equal to the gates stored in the base checkpoint")
    stray = {name: torch.zeros_like(tensor) + 1 for name, tensor in gated_patch.gate_parameters(reloaded)}
    save_file({name: tensor.contiguous() for name, tensor in stray.items()}, tmp_path / "base" / "zz-stray.safetensors")
    assert gates_reproducible(reloaded)[0]
    with torch.no_grad():  # gates that moved after loading are not the stored ones
        next(iter(dict(gated_patch.gate_parameters(reloaded)).values())).add_(1.0)
    ok, why = gates_reproducible(reloaded)
    assert not ok and "not stored in the checkpoint" in why
