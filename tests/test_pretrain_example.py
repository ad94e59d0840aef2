"""Smoke test of examples/pretrain_tiny.py: a few steps of every variant at two learning rates."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import load_example


@pytest.fixture(scope="module")
def pretrain_tiny():
    return load_example("pretrain_tiny")


def test_variants_share_every_non_gate_initial_weight(pretrain_tiny):
    args = pretrain_tiny.parse_args(["--d-model", "32", "--layers", "2", "--heads", "2", "--seq-len", "16"])
    config = pretrain_tiny.model_config(args, vocab_size=50)
    baseline = pretrain_tiny.build_model(config, None, seed=3).state_dict()
    for name in ("elementwise", "headwise"):
        gated = pretrain_tiny.build_model(config, pretrain_tiny.VARIANTS[name], seed=3).state_dict()
        assert {k for k in gated if "attn_gate" not in k} == set(baseline)
        for key, value in baseline.items():
            assert torch.equal(gated[key], value), key
        gates = [v for k, v in gated.items() if k.endswith("attn_gate.weight")]
        assert gates and all(g.std() > 0 for g in gates)  # paper init: random gate weights, not identity


@pytest.mark.slow
def test_pretrain_tiny_smoke(pretrain_tiny, smollm2_dir, tmp_path):
    out = tmp_path / "run"
    code = pretrain_tiny.main([
        "--steps", "8", "--d-model", "32", "--layers", "2", "--heads", "2", "--seq-len", "32", "--batch-size", "4",
        "--lr", "1e-2", "--high-lr", "3e-2", "--eval-tokens", "256", "--inspect-tokens", "128",
        "--output-dir", str(out),
    ])  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["table"]
    assert [(r["lr"], r["variant"]) for r in rows] == [
        (lr, v) for lr in (1e-2, 3e-2) for v in ("baseline", "elementwise", "headwise")
    ]
    for row, run in zip(rows, results["runs"]):
        losses = run["train_losses"]
        assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
        assert losses[-1] < losses[0] - 0.1  # the optimizer really trains
        assert math.isfinite(row["held_out_loss"]) and 0.0 <= row["first_token_share_mean"] <= 1.0
        assert row["max_abs_activation"] > 0
        if row["variant"] == "baseline":
            assert row["gate_mean"] is None
        else:
            assert 0.0 < row["gate_mean"] < 1.0
            assert run["inspection"]["gate_config"]["init"] == "paper"
    # identical data: the first batch is the same for every run of one learning rate; the baseline's first loss
    # does not depend on the learning rate (no step has been taken yet)
    assert results["runs"][0]["train_losses"][0] == results["runs"][3]["train_losses"][0]
    assert "| lr | model | F-Attn mean" in (out / "table.md").read_text()
    for name in ("loss_curves.png", "metrics.png", "inspect_lr0.01.png", "inspect_lr0.03.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
