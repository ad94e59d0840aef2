"""examples/retrofit_study.py on a tiny random Llama with SmolLM2's tokenizer: every run is measured, the identity
row equals the original, the gate learning rate is the multiple asked for and moves the gates accordingly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_example
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

pytestmark = pytest.mark.slow  # SmolLM2's tokenizer: a fresh machine converts the real model first

@pytest.fixture(scope="module")
def study(tmp_path_factory, smollm2_dir):
    model_dir = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path_factory.mktemp("retrofit")
    assert run_example("retrofit_study", [
        "--model", str(model_dir), "--steps", "3", "--multipliers", "1", "30", "--lr", "1e-3", "--batch-size", "2",
        "--seq-len", "32", "--eval-tokens", "256", "--inspect-tokens", "128", "--inspect-window", "64",
        "--stream-window", "16", "--stream-seq-len", "64", "--output-dir", str(out),
    ]) == 0  # fmt: skip
    return out, json.loads((out / "results.json").read_text())


def test_every_run_is_measured(study):
    _, data = study
    rows = data["rows"]
    assert [(r["run"], r.get("multiplier")) for r in rows] == [
        ("original", None), ("identity", None), ("gates", 1.0), ("gates", 30.0), ("gates+full", 1.0),
        ("gates+full", 30.0), ("full", None)]
    for row in rows[2:]:
        assert len(row["train_losses"]) == 3
        assert row["gate_lr"] == (None if row["run"] == "full" else 1e-3 * row["multiplier"])
        assert set(row["streaming"]) == {"full", "window", "window+1", "window+4"}


def test_identity_gates_change_nothing(study):
    original, identity = study[1]["rows"][:2]
    for key in ("ppl", "f_attn", "m_act", "streaming"):
        assert identity[key] == original[key]
    assert identity["gate_weight_rms"] == identity["gate_bias_max_abs"] == identity["gate_distance"] == 0.0
    assert "gate_mean" in original and original["gate_mean"] is None


def test_the_gate_learning_rate_moves_the_gates(study):
    rows = {(r["run"], r.get("multiplier")): r for r in study[1]["rows"]}
    for mode in ("gates", "gates+full"):
        slow, fast = rows[(mode, 1.0)], rows[(mode, 30.0)]
        assert 0 < slow["gate_weight_rms"] < fast["gate_weight_rms"]
        assert slow["gate_distance"] < fast["gate_distance"]
        for row in (slow, fast):  # the mean of |1 - g| is at least |1 - mean g| (every layer has as many scores)
            assert row["gate_distance"] >= abs(1.0 - row["gate_mean"]) - 1e-12
            assert row["train_seconds_per_step"] > 0
    assert rows[("gates", 1.0)]["train_losses"][1:] != rows[("gates+full", 1.0)]["train_losses"][1:]  # modes differ


def test_reports_are_written_and_rebuilt(study, tmp_path):
    out, data = study
    table = (out / "table.md").read_text()
    assert table.startswith("| run |") and table.count("\n| ") == len(data["rows"])  # the header, then a line per row
    assert (out / "retrofit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "results.json").write_bytes((out / "results.json").read_bytes())
    assert run_example("retrofit_study", ["--retabulate", "--output-dir", str(tmp_path)]) == 0
    assert (tmp_path / "table.md").read_text() == table
