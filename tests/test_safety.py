"""Safety: nothing unpickles untrusted data by default, and the remote code written into checkpoints is one small,
reviewable file that imports only torch, transformers and the standard library."""

from __future__ import annotations

import ast
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_gates, tiny_model
from transformers import AutoModelForCausalLM

import gated_patch
from conversion import convert as convert_cli
from gated_patch import GateConfig, patch_model
from gated_patch.checkpoints.remote_code import REMOTE_CODE_FILE
from conversion.convert import convert

ROOT = Path(__file__).resolve().parent.parent
LIBRARY_DIRS = (ROOT / "gated_patch", ROOT / "conversion")


class _Payload:
    """Unpickling this creates `marker`: proof that untrusted pickle code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def write_malicious_bin(path: Path, marker: Path) -> None:
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "lm_head.weight": _Payload(marker)}, path)


# ------------------------------------------------------------------------------------------------ pickle: grep test


def _library_sources():
    for directory in LIBRARY_DIRS:
        for path in sorted(directory.rglob("*.py")):
            yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def test_library_never_unpickles_without_weights_only():
    """Every ``torch.load`` in the library passes the literal ``weights_only=True``; no pickle/marshal/dill loads."""
    torch_loads, bad = 0, []
    for path, tree in _library_sources():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if {str(n).split(".")[0] for n in names} & {"pickle", "cPickle", "dill", "marshal", "shelve", "joblib"}:
                    bad.append(f"{path}:{node.lineno} imports an unpickler")
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            if name == "torch.load":
                torch_loads += 1
                flags = {k.arg: k.value for k in node.keywords}
                value = flags.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    bad.append(f"{path}:{node.lineno} calls {name} without weights_only=True")
            if name in ("eval", "exec"):
                bad.append(f"{path}:{node.lineno} calls {name}")
            if any(k.arg == "trust_remote_code" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                   for k in node.keywords):
                bad.append(f"{path}:{node.lineno} passes trust_remote_code")
    assert not bad, "\n".join(bad)
    assert torch_loads >= 1  # the scan sees the library's real torch.load call (the weight-file reader); adapters are
    # read by PEFT's load_peft_weights (weights_only=True): test_adapter_loading_never_unpickles_code


# ----------------------------------------------------------------------------------------- pickle: behaviour tests


def test_payload_is_live(tmp_path):
    """Control: the payload really runs code when unpickled without weights_only (so the tests below mean something)."""
    marker = tmp_path / "pwned"
    write_malicious_bin(tmp_path / "x.bin", marker)
    torch.load(tmp_path / "x.bin", weights_only=False)
    assert marker.exists()


def _source_with_only_a_bin(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "src"
    tiny_model("llama").config.save_pretrained(src)
    marker = tmp_path / "pwned"
    write_malicious_bin(src / "pytorch_model.bin", marker)
    return src, marker


def test_converter_refuses_pickled_source_by_default(tmp_path, capsys):
    src, marker = _source_with_only_a_bin(tmp_path)
    before = hashlib.sha256((src / "pytorch_model.bin").read_bytes()).hexdigest()
    out = tmp_path / "out"
    code = convert_cli.main([str(src), str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "pytorch_model.bin" in err and "--allow-pickle" in err and "Traceback" not in err
    assert not marker.exists() and not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no temp dir left
    assert hashlib.sha256((src / "pytorch_model.bin").read_bytes()).hexdigest() == before


def test_allow_pickle_still_refuses_code_in_the_pickle(tmp_path, capsys):
    """--allow-pickle reads tensors with weights_only=True: a pickle carrying code is still refused, not run."""
    src, marker = _source_with_only_a_bin(tmp_path)
    out = tmp_path / "out"
    code = convert_cli.main([str(src), str(out), "--no-progress", "--allow-pickle"])
    err = capsys.readouterr().err
    assert code == 2 and "pytorch_model.bin" in err
    assert not marker.exists() and not out.exists()


def test_loading_a_gated_checkpoint_with_a_pickle_runs_no_code(tmp_path):
    """transformers' loading path (with the plugin) also never runs pickled code."""
    model = tiny_model("llama")
    patch_model(model, GateConfig())
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    write_malicious_bin(tmp_path / "ckpt" / "pytorch_model.bin", marker)
    with pytest.raises(Exception) as info:
        AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert not marker.exists()
    assert "weights_only" in str(info.value) or "Unpickl" in type(info.value).__name__ + str(info.value)


def test_adapter_loading_never_unpickles_code(tmp_path):
    from gated_patch.adapters import model as adapter_model

    marker = tmp_path / "pwned"
    write_malicious_bin(tmp_path / "adapter_model.bin", marker)
    with pytest.raises(Exception):
        adapter_model._adapter_weights(tmp_path)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------------ remote code


def _imports(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in remote code"
            names.add(node.module.split(".")[0])
    return names


def _gated_checkpoint(path: Path, family: str, gate: GateConfig, seed: int, **overrides) -> Path:
    model = tiny_model(family, seed=seed, **overrides)
    patch_model(model, gate)
    randomize_gates(model, seed=seed)
    model.save_pretrained(path)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_remote_code_imports_only_torch_transformers_and_stdlib(tmp_path):
    ckpt = _gated_checkpoint(tmp_path / "c", "qwen3", GateConfig(granularity="headwise"), 0)
    source = (ckpt / REMOTE_CODE_FILE).read_text(encoding="utf-8")
    imports = _imports(source)
    third_party = {m for m in imports if m not in sys.stdlib_module_names and m != "__future__"}
    assert third_party == {"torch", "transformers"}
    # no dynamic imports or code execution that the static import list would not show
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            assert _dotted(node.func) not in {"__import__", "eval", "exec", "compile", "importlib.import_module"}
        if isinstance(node, ast.Name):
            assert node.id not in {"__import__", "importlib"}
    # a reviewer reads one file; the config points at exactly that file
    config = json.loads((ckpt / "config.json").read_text())
    assert {v.split(".")[0] for v in config["auto_map"].values()} == {REMOTE_CODE_FILE[:-3]}
    assert sorted(p.name for p in ckpt.glob("*.py")) == [REMOTE_CODE_FILE]


def test_remote_code_is_byte_identical_across_checkpoints_of_a_family(tmp_path):
    """Two different checkpoints of one family (other sizes, gates, weights), and one written by the converter,
    carry the same remote-code file (same SHA-256), so a reviewer can read it once."""
    a = _gated_checkpoint(tmp_path / "a", "mistral", GateConfig(), 0)
    b = _gated_checkpoint(tmp_path / "b", "mistral", GateConfig(granularity="headwise", gate_input="attn_output",
                                                                bias=False, layers=[1]), 7,
                          num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    plain = tmp_path / "plain"
    tiny_model("mistral", seed=3).save_pretrained(plain)
    convert(str(plain), tmp_path / "converted", GateConfig(activation="silu"), progress=False, log=lambda _: None)
    hashes = {_sha(d / REMOTE_CODE_FILE) for d in (a, b, tmp_path / "converted")}
    assert len(hashes) == 1
    assert json.loads((a / "config.json").read_text()) != json.loads((b / "config.json").read_text())
    # and the plugin loads both without executing it (no trust_remote_code needed)
    for directory in (a, b):
        (directory / REMOTE_CODE_FILE).write_text("raise RuntimeError('remote code must not run')\n")
        assert gated_patch.is_patched(AutoModelForCausalLM.from_pretrained(directory))


def test_converter_writes_no_weights_from_pickle_into_safetensors_only_output(tmp_path):
    """Outputs are safetensors only: a converted checkpoint holds no pickled file for the next user to unpickle."""
    src = tmp_path / "src"
    model = tiny_model("qwen2")
    model.save_pretrained(src)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    (src / "model.safetensors").unlink()
    torch.save(state, src / "pytorch_model.bin")  # a benign pickle, explicitly allowed
    out = tmp_path / "out"
    convert(str(src), out, GateConfig(), allow_pickle=True, progress=False, log=lambda _: None)
    suffixes = {p.suffix for p in out.iterdir()}
    assert ".bin" not in suffixes and ".safetensors" in suffixes
