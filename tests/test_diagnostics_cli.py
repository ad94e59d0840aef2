"""`gated-patch inspect` end to end on tiny saved models, and the instruments on the real default model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize_gates, tiny_model

import gated_patch
from gated_patch.cli import main
from gated_patch.diagnostics import default_text, inspect_model, tokenize_for_inspection

SMOLLM2_VOCAB = 49152


@pytest.mark.slow
def test_inspect_command_two_models_and_patch(tmp_path, smollm2_dir, smollm2_tokenizer, capsys):
    dirs = []
    for seed in (0, 1):
        model = tiny_model("llama", seed=seed, vocab_size=SMOLLM2_VOCAB, attn_implementation="sdpa")
        model.save_pretrained(tmp_path / f"m{seed}")
        dirs.append(str(tmp_path / f"m{seed}"))
    out = tmp_path / "out"

    code = main([
        "inspect", "--model", dirs[0], "--model", dirs[1], "--label", "first", "--label", "second",
        "--tokenizer", str(smollm2_dir), "--max-tokens", "80", "--window", "32", "--batch-size", "2",
        "--output-dir", str(out), "--patch", "--granularity", "headwise", "--init", "paper",
    ])  # fmt: skip

    assert code == 0
    printed = capsys.readouterr().out
    assert "query 0" in printed and "F-Attn" in printed and "M-Act" in printed
    data = json.loads((out / "inspect.json").read_text())
    models = data["models"]
    assert [m["label"] for m in models] == [
        "first", "first+gate(headwise,paper)", "second", "second+gate(headwise,paper)"
    ]
    for m in models:
        assert m["attn_implementation"] == "sdpa"  # measured without reloading in eager
        assert m["num_tokens"] == 80 and m["num_windows"] == 3  # windows of 32, 32, 16
        assert len(m["layers"]) == 3
        assert 0.0 < m["summary"]["first_token_share_mean"] < 1.0
    plain, gated = models[0], models[1]
    assert plain["gate_config"] is None and plain["summary"]["gate_mean"] is None
    assert gated["gate_config"]["granularity"] == "headwise"
    for layer in gated["layers"]:
        assert len(layer["gate_mean_per_head"]) == 4 and 0.0 < layer["gate_mean"] < 1.0
        assert set(layer["gate_fraction_below"]) == {"0.1", "0.01"}
    assert (out / "inspect.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind

    # the command reports what the library measures on the same tokens
    tokens = tokenize_for_inspection(smollm2_tokenizer, default_text(), 80)
    direct = inspect_model(tiny_model("llama", seed=0, vocab_size=SMOLLM2_VOCAB), tokens, window=32, progress=False)
    assert plain["summary"]["first_token_share_mean"] == pytest.approx(direct.first_token_share_mean, rel=1e-5)
    assert plain["summary"]["max_abs_activation"] == pytest.approx(direct.max_activation[0], rel=1e-5)


def test_inspect_command_rejects_more_labels_than_models(tmp_path):
    with pytest.raises(SystemExit, match="--label"):
        main(["inspect", "--model", str(tmp_path), "--label", "a", "--label", "b"])


@pytest.fixture
def one_thread():
    """On a 2-core machine shared with other jobs, 2 torch threads made this test 5-20x slower than 1."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.slow
def test_smollm2_sdpa_inspection_and_identity_gates(load_smollm2, smollm2_tokenizer, one_thread):
    model = load_smollm2()
    assert model.config._attn_implementation == "sdpa"
    tokens = tokenize_for_inspection(smollm2_tokenizer, default_text(), 128)

    plain = inspect_model(model, tokens, window=64, batch_size=2, progress=False)

    assert model.config._attn_implementation == "sdpa"
    assert len(plain.layers) == model.config.num_hidden_layers
    # a pretrained LM has first-token attention sinks: far more weight on token 0 than uniform attention gives
    assert plain.first_token_share_mean > 3 * plain.uniform_first_token_share
    gated_patch.patch_model(model)  # identity gates: every metric unchanged, every score exactly 1
    gated = inspect_model(model, tokens, window=64, batch_size=2, progress=False)
    assert gated.gate_mean == 1.0 and gated.gate_fraction_below(0.1) == 0.0
    assert gated.first_token_share_mean == pytest.approx(plain.first_token_share_mean, abs=1e-6)
    assert gated.max_activation[0] == pytest.approx(plain.max_activation[0], rel=1e-6)


@pytest.mark.slow
def test_inspect_command_on_a_saved_gated_checkpoint(tmp_path, smollm2_dir, smollm2_tokenizer):
    model = tiny_model("llama", seed=2, vocab_size=SMOLLM2_VOCAB)
    gated_patch.patch_model(model, gated_patch.GateConfig(granularity="headwise", init="paper"))
    randomize_gates(model)
    model.save_pretrained(tmp_path / "gated")
    tokens = tokenize_for_inspection(smollm2_tokenizer, default_text(), 64)
    direct = inspect_model(model, tokens, window=32, progress=False)

    code = main([
        "inspect", "--model", str(tmp_path / "gated"), "--tokenizer", str(smollm2_dir), "--max-tokens", "64",
        "--window", "32", "--output-dir", str(tmp_path / "out"),
    ])  # fmt: skip

    assert code == 0
    (loaded,) = json.loads((tmp_path / "out" / "inspect.json").read_text())["models"]
    assert loaded["gate_config"]["granularity"] == "headwise"
    for layer, expected in zip(loaded["layers"], direct.layers):
        assert layer["gate_mean_per_head"] == pytest.approx(expected.gate_mean_per_head, rel=1e-5)
        assert layer["first_token_share"] == pytest.approx(expected.first_token_share, rel=1e-5)
