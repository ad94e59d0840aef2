"""The benchmark scripts run end to end (small sizes) and count FLOPs right. No timing is asserted here: timings are
the benchmarks' output, not pass/fail criteria."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import gate_cost  # noqa: E402
import op_cost  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

import gated_patch as gp  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """The scripts set one intra-op thread (their benchmark setting); give the rest of the suite its threads back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_gate_flops_are_counted_from_the_shapes():
    config = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30,
                         intermediate_size=1536, vocab_size=49152)
    headwise = gp.GateConfig(granularity="headwise")
    elementwise = gp.GateConfig(granularity="elementwise")
    assert gate_cost.gate_flops_per_token(config, headwise) == 2 * 576 * 9 * 30
    assert gate_cost.gate_flops_per_token(config, elementwise) == 2 * 576 * 576 * 30
    assert gate_cost.gate_flops_per_token(config, gp.GateConfig(layers=[0, 5])) == 2 * 576 * 576 * 2
    assert gate_cost.gate_flops_per_token(config, None) == 0
    # one token, no context: projections (q, o: 576x576; k, v: 192x576), MLP (3 x 576x1536), attention over itself
    per_layer = 2 * (2 * 576 * 576 + 2 * 192 * 576) + 2 * 3 * 576 * 1536 + 2 * 2 * 9 * 64
    assert gate_cost.base_flops(config, 1, 1, logits=False) == 30 * per_layer
    assert gate_cost.base_flops(config, 1, 1) == 30 * per_layer + 2 * 576 * 49152


def test_gate_cost_quick_run_writes_every_workload(tmp_path):
    out = tmp_path / "gate_cost.json"
    results = gate_cost.main(
        ["--quick", "--models", "tiny", "--variants", "headwise/hidden,elementwise/hidden+fused", "--out", str(out)]
    )
    saved = json.loads(out.read_text())
    assert saved["models"][0]["workloads"].keys() == results["models"][0]["workloads"].keys()
    workloads = saved["models"][0]["workloads"]
    assert set(workloads) == {"prefill_b1", "prefill_b2", "decode", "train_full", "train_gate_only"}
    assert set(workloads["decode"]) == {"unpatched", "headwise/hidden", "elementwise/hidden+fused"}
    assert "elementwise/hidden+fused" not in workloads["train_full"]  # fused models are inference-only
    assert workloads["decode"]["unpatched"]["ratio_cpu"] == 1.0
    assert len(workloads["decode"]["headwise/hidden"]["cpu_s"]) == 3  # one total per decode run
    assert workloads["decode"]["elementwise/hidden+fused"]["flop_ratio"] > workloads["decode"]["headwise/hidden"]["flop_ratio"] > 1
    assert (tmp_path / "gate_cost.png").stat().st_size > 0


def test_gate_cost_breakdown_runs_every_stage(tmp_path):
    results = gate_cost.main(["--breakdown", "--models", "tiny", "--reps", "1", "--decode-tokens", "2", "--decode-prompt",
                              "4", "--warmup", "0", "--out", str(tmp_path / "b.json")])
    stages = results["breakdowns"][0]["stages"]
    assert "headwise: full gate (as shipped)" in stages and "elementwise: fused" in stages
    assert stages["unpatched"]["attention block extra us/layer"] == 0.0
    assert all(row["attention block us/layer"] > 0 for row in stages.values())


def test_op_cost_measures_every_operation(tmp_path):
    results = op_cost.main(["--repeats", "3", "--rounds", "1", "--evict-mib", "1", "--out", str(tmp_path / "o.json")])
    assert len(results["operations"]) >= 10
    assert all(row["cold_us"] > 0 and row["warm_us"] > 0 for row in results["operations"].values())


@pytest.mark.parametrize("bad", ["nonsense", "headwise/hiden"])
def test_gate_cost_rejects_unknown_variants(bad, tmp_path):
    with pytest.raises(SystemExit, match="Unknown variants"):
        gate_cost.main(["--quick", "--models", "tiny", "--variants", bad, "--out", str(tmp_path / "x.json")])
