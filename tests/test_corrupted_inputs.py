"""Corrupted inputs to loading and conversion: each gives a clear error naming the file at fault; nothing is written.

Loading = ``AutoModelForCausalLM.from_pretrained`` with the plugin; conversion = ``gated-patch-convert`` (a gated
source exported to the paper layout, a plain source converted to the plugin layout). Adapters: ``load_gated_adapter``.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import randomize_gates, tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import gated_patch  # noqa: F401  (registers the gated checkpoint classes)
from conversion import convert as convert_cli
from gated_patch import GateConfig, GatedPatchError, patch_model

GATE = "model.layers.1.self_attn.attn_gate.weight"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Pristine checkpoints, copied per test: a gated one (single file and sharded) and a plain sharded one."""
    root = tmp_path_factory.mktemp("pristine")
    model = tiny_model("llama")
    patch_model(model, GateConfig(init="paper", bias=False))  # exportable to the paper layout
    randomize_gates(model)
    model.save_pretrained(root / "gated")
    model.save_pretrained(root / "gated_sharded", max_shard_size="20KB")
    tiny_model("qwen2").save_pretrained(root / "plain_sharded", max_shard_size="20KB")
    return root


def copy(checkpoints: Path, name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(checkpoints / name, target)
    return target


def tree_digest(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def rewrite(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(directory: Path, edit) -> None:
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))


def assert_load_refused(directory: Path, bad_file: Path, *fragments: str) -> str:
    before = tree_digest(directory)
    with pytest.raises(GatedPatchError) as info:
        AutoModelForCausalLM.from_pretrained(directory)
    message = str(info.value)
    assert str(bad_file) in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert tree_digest(directory) == before  # loading never modifies the checkpoint
    return message


def assert_convert_refused(directory: Path, bad_file: Path, capsys, *extra: str, fragments=()) -> str:
    before = tree_digest(directory)
    out = directory.parent / "out"
    capsys.readouterr()
    code = convert_cli.main([str(directory), str(out), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and str(bad_file) in err, err
    for fragment in fragments:
        assert fragment in err, err
    assert not out.exists()
    assert not [p.name for p in directory.parent.iterdir() if p.name.startswith(".out")]  # no temp dir left behind
    assert tree_digest(directory) == before
    return err


EXPORT = ("--target-layout", "paper")


# ------------------------------------------------------------------------------------------- truncated / bit flips

@pytest.mark.parametrize("fraction", [0.0, 0.002, 0.5, 0.999])
def test_truncated_weights(checkpoints, tmp_path, capsys, fraction):
    directory = copy(checkpoints, "gated", tmp_path)
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * fraction)])
    assert_load_refused(directory, weights, "truncated or corrupt")
    assert_convert_refused(directory, weights, capsys, *EXPORT, fragments=("truncated or corrupt",))


def test_truncated_shard_of_a_sharded_source(checkpoints, tmp_path, capsys):
    directory = copy(checkpoints, "plain_sharded", tmp_path)
    shard = sorted(directory.glob("model-*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes()[:-1])
    assert_convert_refused(directory, shard, capsys)


def _header_length(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


HEADER_FLIPS = 24  # random single-bit flips in the header of a weight file (seeded), plus every byte of the length


def test_bit_flips_in_the_header(checkpoints, tmp_path, capsys):
    """A flipped bit in the 8-byte length or the JSON header: refused, naming the file, or (when the flip leaves a
    self-consistent header, e.g. inside a tensor name) refused as a checkpoint that does not match its config.
    Never loaded silently with a missing or renamed tensor."""
    pristine = checkpoints / "gated" / "model.safetensors"
    header = _header_length(pristine)
    rng = random.Random(7)
    positions = list(range(8)) + sorted(rng.sample(range(8, header), HEADER_FLIPS))
    outcomes = {}
    for position in positions:
        directory = tmp_path / f"flip{position}"
        shutil.copytree(checkpoints / "gated", directory)
        weights = directory / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[position] ^= 1 << rng.randrange(8)
        weights.write_bytes(bytes(data))
        with pytest.raises(Exception) as info:
            AutoModelForCausalLM.from_pretrained(directory)
        message = str(info.value)
        outcomes[position] = type(info.value).__name__
        # the file is named, or the message names the tensor that no longer matches
        assert str(weights) in message or "model.layers." in message or "weight" in message, (position, message)
        shutil.rmtree(directory)
    assert len(outcomes) == len(positions)
    assert sum(kind == "GatedCheckpointError" for kind in outcomes.values()) >= len(positions) * 0.8, outcomes


def test_bit_flip_in_tensor_data_is_not_detectable(checkpoints, tmp_path):
    """safetensors has no checksum: a flipped bit in tensor DATA loads (documented limitation, README), and the loaded
    tensor differs from the saved one in exactly that bit. The test pins the limitation so that the claim stays true."""
    directory = copy(checkpoints, "gated", tmp_path)
    weights = directory / "model.safetensors"
    raw, data_start = bytearray(weights.read_bytes()), _header_length(weights)
    header = json.loads(raw[8:data_start])
    name = next(n for n, info in header.items() if n != "__metadata__" and info["data_offsets"][0] == 0)
    before = load_file(weights)[name].clone()  # a copy: the file is rewritten in place below
    raw[data_start + 5] ^= 0x01  # one bit of byte 5 of the first tensor's data
    weights.write_bytes(bytes(raw))
    after = AutoModelForCausalLM.from_pretrained(directory).state_dict()[name]  # loads: no error
    changed = (before.reshape(-1).view(torch.uint8) != after.reshape(-1).view(torch.uint8)).nonzero().flatten().tolist()
    assert changed == [5]


# ------------------------------------------------------------------------------------------------------ index / shards

def test_index_naming_a_missing_shard(checkpoints, tmp_path, capsys):
    directory = copy(checkpoints, "gated_sharded", tmp_path)
    shard = sorted(directory.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert_load_refused(directory, shard, "missing")
    assert_convert_refused(directory, shard, capsys, *EXPORT, fragments=("missing",))


def test_index_pointing_at_the_wrong_shard(checkpoints, tmp_path, capsys):
    directory = copy(checkpoints, "plain_sharded", tmp_path)
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == shards[0])
    index["weight_map"][name] = shards[1]
    index_path.write_text(json.dumps(index))
    assert_convert_refused(directory, directory / shards[1], capsys, fragments=(name,))


def test_index_that_is_not_json(checkpoints, tmp_path, capsys):
    directory = copy(checkpoints, "gated_sharded", tmp_path)
    index = directory / "model.safetensors.index.json"
    index.write_text(index.read_text()[:40])
    assert_load_refused(directory, index, "JSON")
    assert_convert_refused(directory, index, capsys, *EXPORT)


# ------------------------------------------------------------------------------------------------------- gate tensors

@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda t: t.__setitem__(GATE, t[GATE][:5].contiguous()), "shape (5, 64), the config needs (64, 64)"),
        (lambda t: t.__setitem__(GATE, t[GATE].T[:, :32].contiguous()), "wrong-shaped gate tensors"),
        (lambda t: t.__setitem__(GATE, t[GATE].to(torch.int32)), "dtype I32"),
        (lambda t: t.__setitem__(GATE, t[GATE] > 0), "dtype BOOL"),
        (lambda t: t.pop(GATE), "missing gate tensors"),
        (lambda t: t.__setitem__(GATE.replace("weight", "bias"), torch.zeros(64)), "no place for"),
    ],
    ids=["rows", "columns", "int32", "bool", "missing", "extra-bias"],
)
def test_bad_gate_tensors(checkpoints, tmp_path, capsys, edit, fragment):
    directory = copy(checkpoints, "gated", tmp_path)
    weights = directory / "model.safetensors"
    rewrite(weights, edit)
    assert_load_refused(directory, weights, fragment, GATE.rsplit(".", 1)[0])
    assert_convert_refused(directory, weights, capsys, *EXPORT, fragments=(fragment,))


def test_bad_gate_tensor_in_a_sharded_checkpoint_names_its_shard(checkpoints, tmp_path, capsys):
    directory = copy(checkpoints, "gated_sharded", tmp_path)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shard = directory / index["weight_map"][GATE]
    rewrite(shard, lambda t: t.__setitem__(GATE, t[GATE].to(torch.int8)))
    assert_load_refused(directory, shard, "dtype I8")
    assert_convert_refused(directory, shard, capsys, *EXPORT, fragments=("dtype I8",))


@pytest.mark.parametrize("weights_name, variant", [("pytorch_model.bin", None), ("model.fp16.safetensors", "fp16"),
                                                   ("pytorch_model.fp16.bin", "fp16")])
def test_a_bad_gate_tensor_is_refused_in_pickled_weights_and_variants_too(checkpoints, tmp_path, weights_name, variant):
    """The pre-load check reads the weights transformers will read: pickled ones, and those of the variant asked for
    (a plain model.safetensors beside a variant is not the file checked)."""
    directory = copy(checkpoints, "gated", tmp_path)
    tensors = load_file(directory / "model.safetensors")
    tensors[GATE] = tensors[GATE].to(torch.int32)
    bad = directory / weights_name
    if weights_name.endswith(".bin"):
        torch.save(tensors, bad)
        (directory / "model.safetensors").unlink()  # transformers prefers safetensors
    else:
        save_file(tensors, bad, metadata={"format": "pt"})  # the pristine model.safetensors stays beside it
    before = tree_digest(directory)
    with pytest.raises(GatedPatchError, match=r"non-float dtype .*dtype I32") as info:
        AutoModelForCausalLM.from_pretrained(directory, variant=variant)
    assert str(bad) in str(info.value) and tree_digest(directory) == before
    if variant is not None and weights_name.endswith(".safetensors"):
        assert gated_patch.is_patched(AutoModelForCausalLM.from_pretrained(directory))  # no variant: the good file


# ------------------------------------------------------------------------------------------------- gate config section

@pytest.mark.parametrize(
    "value, fragment",
    [
        ("yes", "is a str"),
        ([1, 2], "is a list"),
        (None, "no 'attn_output_gate' entry"),
        ({"granularity": "rowwise"}, "granularity='rowwise'"),
        ({"bias": "true"}, "bias must be a bool"),
        ({"layers": [0, 9]}, "out of range"),
        ({"layers": "0,1"}, "list of layer indices"),
        ({"gate": "elementwise"}, "Unknown gate config keys ['gate']"),
    ],
    ids=["string", "list", "null", "granularity", "bias-type", "layers-range", "layers-type", "unknown-key"],
)
def test_malformed_gate_config(checkpoints, tmp_path, capsys, value, fragment):
    directory = copy(checkpoints, "gated", tmp_path)
    edit_config(directory, lambda c: c.__setitem__("attn_output_gate", value))
    config_file = directory / "config.json"
    assert_load_refused(directory, config_file, fragment)
    assert_convert_refused(directory, config_file, capsys, *EXPORT, fragments=(fragment,))


def test_gate_config_that_disagrees_with_the_weights(checkpoints, tmp_path, capsys):
    """A valid gate config, but not the one the tensors were written with (headwise vs elementwise)."""
    directory = copy(checkpoints, "gated", tmp_path)
    edit_config(directory, lambda c: c["attn_output_gate"].__setitem__("granularity", "headwise"))
    weights = directory / "model.safetensors"
    assert_load_refused(directory, weights, "the config needs (4, 64)")
    assert_convert_refused(directory, weights, capsys, *EXPORT, fragments=("the config needs (4, 64)",))


# ------------------------------------------------------------------------------------------------------------ adapters

def test_adapter_for_another_base_is_refused(tmp_path):
    """A gate adapter trained on one base, loaded onto a base of other size or other gate layers: clear error naming
    the adapter; the base model is left as it was."""
    from gated_patch.adapters import GatedAdapterError, gate_only_config, get_gated_peft_model, load_gated_adapter

    trained = tiny_model("llama")
    patch_model(trained, GateConfig(layers=[0, 2]))
    peft_model = get_gated_peft_model(trained, gate_only_config())
    randomize_gates(peft_model)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    before = tree_digest(adapter)

    other_size = tiny_model("llama", hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    state = {k: v.clone() for k, v in other_size.state_dict().items()}
    classes = [type(m) for m in other_size.modules()]
    with pytest.raises(GatedAdapterError, match="another size") as info:
        load_gated_adapter(other_size, adapter)
    assert str(adapter / "adapter_model.safetensors") in str(info.value), str(info.value)
    assert "layers.0.self_attn.attn_gate" in str(info.value)
    assert not gated_patch.is_patched(other_size) and [type(m) for m in other_size.modules()] == classes
    assert other_size.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in other_size.state_dict().items())

    other_gates = tiny_model("llama")
    patch_model(other_gates, GateConfig(layers=[1]))
    with pytest.raises(GatedAdapterError) as info:
        load_gated_adapter(other_gates, adapter)
    assert str(adapter) in str(info.value)
    assert tree_digest(adapter) == before
