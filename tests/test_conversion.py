"""gated-patch-convert / gated-patch-push: streaming conversion, atomic output, bad input, Hub calls (mocked)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import tiny_model
from huggingface_hub import HfApi
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

from conversion import convert as convert_cli
from conversion import push as push_cli
from gated_patch import GateConfig, gate_config, patch_model
from gated_patch.checkpoints.remote_code import REMOTE_CODE_FILE
from conversion import write as convert_module

IDS = torch.tensor([[1, 5, 7, 9, 11, 13, 17, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 97)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_source(path: Path, family="llama", shard_size=None, dtype=None, **overrides) -> Path:
    model = tiny_model(family, **overrides)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, **({"max_shard_size": shard_size} if shard_size else {}))
    tiny_tokenizer().save_pretrained(path)
    GenerationConfig(bos_token_id=1, eos_token_id=2, max_new_tokens=7).save_pretrained(path)
    return path


def snapshot(path: Path) -> dict:
    return {
        p.relative_to(path).as_posix(): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def run_convert(capsys, *argv, **kwargs):
    capsys.readouterr()  # drop output of the test's own setup
    code = convert_cli.main([*map(str, argv), "--no-progress"], **kwargs)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def test_convert_sharded_checkpoint_streams_and_carries_files(tmp_path, capsys):
    src = make_source(tmp_path / "src", shard_size="20KB")
    source_shards = sorted(src.glob("model-*.safetensors"))
    assert len(source_shards) > 3
    before = snapshot(src)
    out = tmp_path / "out"

    code, stdout, err = run_convert(capsys, src, out)
    assert code == 0, err
    assert snapshot(src) == before  # SRC untouched

    index = json.loads((out / "model.safetensors.index.json").read_text())
    out_shards = sorted(out.glob("model-*.safetensors"))
    assert len(out_shards) == len(source_shards) + 1
    # the source shards are copied byte for byte, the gates are one extra shard
    source_bytes = {p.read_bytes() for p in source_shards}
    assert {p.read_bytes() for p in out_shards[:-1]} == source_bytes
    with safe_open(out_shards[-1], "pt") as handle:
        gate_names = set(handle.keys())
    assert gate_names == {f"model.layers.{i}.self_attn.attn_gate.{k}" for i in range(3) for k in ("weight", "bias")}
    assert {n for n, f in index["weight_map"].items() if f == out_shards[-1].name} == gate_names
    source_index = json.loads((src / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(source_index["weight_map"]) | gate_names
    gate_bytes = (3 * 64 * 64 + 3 * 64) * 4
    assert index["metadata"]["total_size"] == source_index["metadata"]["total_size"] + gate_bytes

    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert (out / REMOTE_CODE_FILE).exists()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gated_llama" and config["attn_output_gate"] == GateConfig().to_dict()
    card = (out / "README.md").read_text()
    assert "trust_remote_code=True" in card and "import gated_patch" in card and '"identity"' in card

    source_model = load(src)
    converted = load(out)
    assert gate_config(converted) == GateConfig()
    assert torch.equal(converted(IDS).logits, source_model(IDS).logits)  # identity gates
    assert converted.generation_config.max_new_tokens == 7
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_gate_options_mirror_gate_config(tmp_path, capsys):
    src = make_source(tmp_path / "src", family="qwen3")
    args = ["--granularity", "headwise", "--no-bias", "--layers", "0", "2", "--init", "paper", "--seed", "3"]
    assert run_convert(capsys, src, tmp_path / "a", *args)[0] == 0
    assert run_convert(capsys, src, tmp_path / "b", *args)[0] == 0
    gate = GateConfig(granularity="headwise", bias=False, layers=[0, 2], init="paper")
    model = load(tmp_path / "a")
    assert gate_config(model) == gate
    weights = dict(model.named_parameters())
    assert set(n for n in weights if "attn_gate" in n) == {f"model.layers.{i}.self_attn.attn_gate.weight" for i in (0, 2)}
    weight = weights["model.layers.0.self_attn.attn_gate.weight"]
    assert weight.shape == (4, 64) and 0.01 < weight.std().item() < 0.03  # N(0, initializer_range=0.02)
    # seeded: the same command writes the same gate weights
    assert (tmp_path / "a" / "model-00002-of-00002.safetensors").read_bytes() == (
        tmp_path / "b" / "model-00002-of-00002.safetensors"
    ).read_bytes()


def test_dry_run_writes_nothing_and_verify_checks(tmp_path, capsys):
    src = make_source(tmp_path / "src", family="mistral")
    code, stdout, _ = run_convert(capsys, src, tmp_path / "out", "--dry-run")
    assert code == 0 and "dry run: nothing written" in stdout and "gate tensors in output: 6" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    code, stdout, err = run_convert(capsys, src, tmp_path / "out", "--verify")
    assert code == 0, err
    assert "verify: OK, upstream tensors identical, max |logit diff| on the prompt 0 (init=identity)" in stdout


def test_tied_bf16_source(tmp_path, capsys):
    src = make_source(tmp_path / "src", dtype=torch.bfloat16, tie_word_embeddings=True)
    assert run_convert(capsys, src, tmp_path / "out", "--verify")[0] == 0
    model = load(tmp_path / "out")
    assert model.dtype == torch.bfloat16 and model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "attn_gate" in n)


# ------------------------------------------------------------------------------------------------------ bad input


def _bin_source(path: Path) -> Path:
    src = make_source(path)
    state = load(src).state_dict()
    (src / "model.safetensors").unlink()
    torch.save(state, src / "pytorch_model.bin")
    return src


def _truncated(path: Path) -> Path:
    src = make_source(path, shard_size="20KB")
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    return src


def _bad_json(path: Path) -> Path:
    src = make_source(path)
    (src / "config.json").write_text("{not json")
    return src


def _unsupported(path: Path) -> Path:
    src = make_source(path)
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "mamba"  # a state-space model: no attention to gate
    (src / "config.json").write_text(json.dumps(config))
    return src


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: p, r"SRC .*src: no such directory\. Pass a local checkpoint directory or a Hub repo id"),
        (_bad_json, r"src/config\.json: cannot read it as JSON .*restore or re-download"),
        (_bin_source, r"src/pytorch_model\.bin: pickled PyTorch weights are refused .*--allow-pickle"),
        (_unsupported, r"Cannot gate MambaForCausalLM \(model_type 'mamba'\).*register_model_type\('mamba'"),
        (_truncated, r"src/model-00002-of-\d+\.safetensors: not a complete safetensors file .*Download or copy it again"),
    ],
    ids=["missing", "unreadable-config", "pickle", "unsupported", "truncated"],
)
def test_bad_input_one_line_error_nothing_left(tmp_path, capsys, make, expected):
    src = make(tmp_path / "src")
    before = snapshot(tmp_path)
    code, stdout, err = run_convert(capsys, src, tmp_path / "out")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gated-patch-convert: error: "), err
    import re

    assert re.search(expected, lines[0]), lines[0]
    assert snapshot(tmp_path) == before  # no OUT, no temporary directory, SRC untouched


def test_allow_pickle_converts_bin(tmp_path, capsys):
    src = _bin_source(tmp_path / "src")
    code, _, err = run_convert(capsys, src, tmp_path / "out", "--allow-pickle", "--verify")
    assert code == 0, err
    assert not list((tmp_path / "out").glob("*.bin")) and list((tmp_path / "out").glob("*.safetensors"))


def test_existing_out_needs_overwrite(tmp_path, capsys):
    src = make_source(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_convert(capsys, src, out)
    assert code == 2 and "already exists; choose another directory or pass --overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, _, err = run_convert(capsys, src, out, "--overwrite")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


@pytest.mark.parametrize("error, status", [(OSError(28, "No space left on device"), 2), (KeyboardInterrupt(), 130)])
def test_failure_midway_leaves_nothing(tmp_path, capsys, monkeypatch, error, status):
    src = make_source(tmp_path / "src", shard_size="20KB")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous result")
    before = snapshot(tmp_path)
    calls = []

    def failing_write(*args, **kwargs):
        calls.append(args[0])
        raise error

    monkeypatch.setattr(convert_module, "write_safetensors", failing_write)
    code, _, err = run_convert(capsys, src, out, "--overwrite")
    assert code == status and calls
    assert ("No space left on device" if status == 2 else "interrupted; nothing was written") in err
    assert snapshot(tmp_path) == before  # the old OUT is intact, no temporary directory, SRC untouched


def test_hub_id_source_is_downloaded(tmp_path, capsys):
    src = make_source(tmp_path / "snapshot")
    download = mock.Mock(return_value=str(src))
    code, _, err = run_convert(capsys, "someone/tiny-llama", tmp_path / "out", "--revision", "v1", download=download)
    assert code == 0, err
    download.assert_called_once_with(
        repo_id="someone/tiny-llama", revision="v1", token=None,
        allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"],
    )
    assert "base_model: someone/tiny-llama" in (tmp_path / "out" / "README.md").read_text()

    download.side_effect = OSError("offline")
    code, _, err = run_convert(capsys, "someone/tiny-llama", tmp_path / "out2", download=download)
    assert code == 2 and "downloading it from the Hub failed (OSError: offline)" in err
    assert not (tmp_path / "out2").exists()


# ----------------------------------------------------------------------------------------------------------- push


def _expected_push_calls(folder, repo, private=None, revision=None, create_pr=False, message=None):
    calls = [mock.call.create_repo(repo_id=repo, repo_type="model", private=private, exist_ok=True)]
    if revision:
        calls.append(mock.call.create_branch(repo_id=repo, repo_type="model", branch=revision, exist_ok=True))
    calls.append(
        mock.call.upload_folder(
            repo_id=repo, repo_type="model", folder_path=str(folder), revision=revision, create_pr=create_pr,
            commit_message=message or "Upload gated checkpoint (gated_llama) with gated_patch",
        )
    )
    return calls


def test_push_calls(tmp_path, capsys):
    model = tiny_model("llama")
    patch_model(model)
    model.save_pretrained(tmp_path / "ckpt")  # save_pretrained output is pushable too
    api = mock.create_autospec(HfApi, instance=True)
    code = push_cli.main([str(tmp_path / "ckpt"), "--repo-id", "me/gated", "--private", "--revision", "dev",
                          "--create-pr"], api=api)
    assert code == 0, capsys.readouterr().err
    assert api.method_calls == _expected_push_calls(tmp_path / "ckpt", "me/gated", True, "dev", True)
    uploaded = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert uploaded == ["config.json", "generation_config.json", "model.safetensors", REMOTE_CODE_FILE]

    api.reset_mock()
    assert push_cli.main([str(tmp_path / "ckpt"), "--repo-id", "me/gated"], api=api) == 0
    assert api.method_calls == _expected_push_calls(tmp_path / "ckpt", "me/gated")


def test_push_uses_default_token_resolution(tmp_path, capsys):
    model = tiny_model("llama")
    patch_model(model)
    model.save_pretrained(tmp_path / "ckpt")
    with mock.patch("conversion.hub.HfApi", autospec=True) as api_class:
        assert push_cli.main([str(tmp_path / "ckpt"), "--repo-id", "me/gated"]) == 0
    api_class.assert_called_once_with(token=None)  # HF_TOKEN / `hf auth login`, resolved by huggingface_hub
    assert api_class.return_value.method_calls == _expected_push_calls(tmp_path / "ckpt", "me/gated")


def test_push_refuses_ungated_folder(tmp_path, capsys):
    src = make_source(tmp_path / "src")
    api = mock.create_autospec(HfApi, instance=True)
    capsys.readouterr()
    assert push_cli.main([str(src), "--repo-id", "me/x"], api=api) == 2
    assert "is not a gated checkpoint; convert it first" in capsys.readouterr().err
    assert api.method_calls == []


@pytest.mark.parametrize("remove, named", [
    ("model-00002-of-00002.safetensors", r"model-00002-of-00002\.safetensors: listed in .*index\.json but missing"),
    (REMOTE_CODE_FILE, rf"incomplete gated checkpoint \(missing \['{REMOTE_CODE_FILE}'\]\)"),
    ("model.safetensors.index.json", r"incomplete gated checkpoint \(missing \['model\.safetensors or model\.safetensors"),
])  # fmt: skip
def test_push_refuses_an_incomplete_gated_checkpoint(tmp_path, capsys, remove, named):
    src = make_source(tmp_path / "src")
    code, _, err = run_convert(capsys, src, tmp_path / "out")
    assert code == 0, err
    (tmp_path / "out" / remove).unlink()
    api = mock.create_autospec(HfApi, instance=True)
    assert push_cli.main([str(tmp_path / "out"), "--repo-id", "me/x"], api=api) == 2
    assert re.search(named, capsys.readouterr().err)
    assert api.method_calls == []


def test_convert_push_to_hub_chains(tmp_path, capsys):
    src = make_source(tmp_path / "src")
    api = mock.create_autospec(HfApi, instance=True)
    code, stdout, err = run_convert(capsys, src, tmp_path / "out", "--push-to-hub", "me/gated", "--hub-revision",
                                    "v2", api=api)
    assert code == 0, err
    assert api.method_calls == _expected_push_calls(tmp_path / "out", "me/gated", revision="v2")
    uploaded = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert uploaded == sorted(["README.md", "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                               "model-00002-of-00002.safetensors", "model.safetensors.index.json", REMOTE_CODE_FILE,
                               "tokenizer.json", "tokenizer_config.json"])


def test_library_has_no_conversion_subcommands():
    """The conversion scripts are console scripts of conversion/; the gated-patch command (the library) has none."""
    from gated_patch.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert set(commands) == {"demo", "inspect", "remote-code"}


def test_push_failure_is_one_line(tmp_path, capsys):
    model = tiny_model("llama")
    patch_model(model)
    model.save_pretrained(tmp_path / "ckpt")
    api = mock.create_autospec(HfApi, instance=True)
    api.create_repo.side_effect = OSError("Offline mode is enabled.")
    capsys.readouterr()
    assert push_cli.main([str(tmp_path / "ckpt"), "--repo-id", "me/gated"], api=api) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "upload of" in err and "HF_TOKEN" in err and "Offline mode is enabled." in err
    assert api.upload_folder.call_count == 0
