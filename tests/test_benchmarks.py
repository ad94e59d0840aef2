"""The benchmark scripts run end to end (small sizes), count FLOPs right, and the old/new comparison measures the tree
it says it measures. No timing is asserted here: timings are the benchmarks' output, not pass/fail criteria."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import gate_cost  # noqa: E402
import gate_cost_compare  # noqa: E402
import torch  # noqa: E402
from conftest import tiny_model  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

import gated_patch as gp  # noqa: E402
from gated_patch.core.gate import AttentionGateLinear  # noqa: E402

OLD_REV = "HEAD"  # the machinery is tested against a revision every checkout has


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """The scripts set one intra-op thread (their benchmark setting); give the rest of the suite its threads back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


SMOLLM2 = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30,
                      intermediate_size=1536, vocab_size=49152)


def test_gate_flops_are_counted_from_the_shapes():
    config = SMOLLM2
    headwise = gp.GateConfig(granularity="headwise")
    elementwise = gp.GateConfig(granularity="elementwise")
    assert gate_cost.gate_flops_per_token(config, headwise) == 2 * 576 * 9 * 30
    assert gate_cost.gate_flops_per_token(config, elementwise) == 2 * 576 * 576 * 30
    assert gate_cost.gate_flops_per_token(config, gp.GateConfig(layers=[0, 5])) == 2 * 576 * 576 * 2
    assert gate_cost.gate_flops_per_token(config, gp.GateConfig(gate_input="attn_output")) == 2 * 576 * 576 * 30
    assert gate_cost.gate_flops_per_token(config, None) == 0
    # one token, no context: projections (q, o: 576x576; k, v: 192x576), MLP (3 x 576x1536), attention over itself
    per_layer = 2 * (2 * 576 * 576 + 2 * 192 * 576) + 2 * 3 * 576 * 1536 + 2 * 2 * 9 * 64
    assert gate_cost.base_flops(config, 1, 1, logits=False) == 30 * per_layer
    assert gate_cost.base_flops(config, 1, 1) == 30 * per_layer + 2 * 576 * 49152
    # a second token attends to two keys (one more than the first); cached context adds keys, not projections
    assert gate_cost.base_flops(config, 2, 1, logits=False) == 30 * (2 * per_layer + 2 * 2 * 9 * 64)
    assert (gate_cost.base_flops(config, 1, 1, context_before=4, logits=False)
            == 30 * (per_layer + 2 * 2 * 9 * 64 * 4))


def test_flop_ratios_of_the_workloads():
    config = SMOLLM2
    elementwise = gp.GateConfig(granularity="elementwise")
    base = gate_cost.base_flops(config, 512, 8)
    extra = 2 * 576 * 576 * 30 * 512 * 8
    prefill = gate_cost.flop_ratio(config, elementwise, "prefill", tokens=512, batch=8)
    assert prefill == pytest.approx((base + extra) / base)
    assert gate_cost.flop_ratio(config, None, "prefill", tokens=512, batch=8) == 1.0
    # full training is three forwards, so the same ratio; gate-only backward skips the non-gate weight gradients
    assert gate_cost.flop_ratio(config, elementwise, "train", tokens=512, batch=8) == pytest.approx(prefill)
    gate_only = gate_cost.flop_ratio(config, elementwise, "train", tokens=512, batch=8, gate_only=True)
    assert gate_only == pytest.approx((2 * (base + extra) + extra) / (3 * base))
    assert gate_only < 1
    decode = gate_cost.decode_flop_ratio(config, elementwise, prompt=32, tokens=128)
    steps = sum(gate_cost.base_flops(config, 1, 1, 32 + i) for i in range(128))
    assert decode == pytest.approx((steps + 2 * 576 * 576 * 30 * 128) / steps)
    assert 1 < gate_cost.decode_flop_ratio(config, gp.GateConfig(granularity="headwise"), prompt=32, tokens=128) < 1.002


def test_gate_cost_quick_run_writes_every_workload(tmp_path):
    out = tmp_path / "gate_cost.json"
    results = gate_cost.main(["--quick", "--models", "tiny", "--variants", "headwise/hidden,elementwise/attn_out",
                              "--record-steps", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["models"][0]["workloads"].keys() == results["models"][0]["workloads"].keys()
    assert saved["gated_patch"]["file"] == os.path.realpath(gp.__file__)
    workloads = saved["models"][0]["workloads"]
    assert set(workloads) == {"prefill_b1", "prefill_b2", "decode", "train_full", "train_gate_only"}
    assert set(workloads["decode"]) == {"unpatched", "headwise/hidden", "elementwise/attn_out"}
    assert set(workloads["train_gate_only"]) == {"headwise/hidden", "elementwise/attn_out"}  # unpatched has no gates
    assert workloads["decode"]["unpatched"]["ratio_cpu"] == 1.0
    assert workloads["decode"]["unpatched"]["paired_ratio_cpu"] == 1.0
    assert len(workloads["decode"]["headwise/hidden"]["cpu_s"]) == 3  # one total per decode run
    assert len(workloads["decode"]["headwise/hidden"]["step_cpu_s"]) == 3 * 16  # every step
    assert len(workloads["prefill_b2"]["headwise/hidden"]["cpu_s"]) == 3
    decode = workloads["decode"]
    assert decode["elementwise/attn_out"]["flop_ratio"] > decode["headwise/hidden"]["flop_ratio"] > 1
    assert all(e["median_cpu_s"] > 0 for w in workloads.values() for e in w.values())
    memory = saved["models"][0]["memory"]
    params = {name: row["param_bytes"] for name, row in memory.items()}
    assert params["elementwise/attn_out"] > params["headwise/hidden"] > params["unpatched"]
    assert "train_gate_only_peak_bytes" not in memory["unpatched"]
    assert (tmp_path / "gate_cost.png").stat().st_size > 0


def test_the_linear_ablation_is_the_same_gate_computed_by_nn_linear_and_runs_only_when_named():
    torch.manual_seed(0)
    model = tiny_model("llama").eval()
    siblings = gate_cost.Siblings(model, ["unpatched", "elementwise/hidden", "elementwise/hidden+linear"], seed=3)
    shipped, ablation = siblings["elementwise/hidden"], siblings["elementwise/hidden+linear"]
    gates = [m for m in ablation.modules() if isinstance(m, AttentionGateLinear)]
    assert len(gates) == model.config.num_hidden_layers
    assert all(type(m).forward is torch.nn.Linear.forward for m in gates)
    assert all(type(m).forward is AttentionGateLinear.forward for m in shipped.modules() if isinstance(m, AttentionGateLinear))
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        assert torch.equal(shipped(ids).logits, ablation(ids).logits)
        assert not torch.equal(shipped(ids).logits, model(ids).logits)  # the gates are trained-looking, not identity
    assert "elementwise/hidden+linear" not in gate_cost.parse_args(["--quick"]).variants
    assert "elementwise/hidden+linear" in gate_cost.parse_args(["--variants", "elementwise/hidden+linear"]).variants


def test_gate_cost_compiled_decode(tmp_path):
    results = gate_cost.main(["--quick", "--models", "tiny", "--variants", "headwise/hidden", "--compile-decode",
                              "--prefill-batches", "", "--train-batch", "0", "--no-memory", "--decode-reps", "1",
                              "--out", str(tmp_path / "c.json")])
    workloads = results["models"][0]["workloads"]
    assert set(workloads) == {"decode", "decode_compiled"}
    assert set(workloads["decode_compiled"]) == {"unpatched", "headwise/hidden"}
    assert "step_cpu_s" not in workloads["decode_compiled"]["headwise/hidden"]  # every step's time only on request
    assert workloads["decode_compiled"]["headwise/hidden"]["paired_ratio_cpu"] > 0


@pytest.mark.parametrize("bad", ["nonsense", "headwise/hiden", "elementwise/hidden+fused"])
def test_gate_cost_rejects_unknown_variants(bad, tmp_path):
    with pytest.raises(SystemExit, match="Unknown variants"):
        gate_cost.main(["--quick", "--models", "tiny", "--variants", bad, "--out", str(tmp_path / "x.json")])


def test_gate_cost_refuses_a_gated_patch_from_elsewhere(tmp_path):
    with pytest.raises(SystemExit, match="wrong source tree"):
        gate_cost.main(["--quick", "--models", "tiny", "--expect-gated-patch-in", str(tmp_path),
                        "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


# --- gate_cost_compare.py ---------------------------------------------------------------------------------------------


def test_compare_default_settings_are_valid_gate_cost_arguments():
    targets = gate_cost.parse_args(gate_cost_compare.parse_args(["--old-rev", "HEAD"]).gate_cost_args)
    assert targets.models == ["smollm2"] and targets.variants == ["unpatched", "elementwise/hidden", "headwise/hidden"]
    assert targets.prefill_batches == [1, 8] and targets.prefill_len == 512 and targets.decode_tokens == 128
    assert targets.compile_decode and not targets.train_batch and not targets.memory and targets.threads == 1
    quick = gate_cost.parse_args(gate_cost_compare.parse_args(["--old-rev", "HEAD", "--quick", "--no-compile"]).gate_cost_args)
    assert quick.models == ["tiny"] and quick.quick and not quick.compile_decode
    assert quick.train_batch == 0 and quick.decode_tokens == 16  # explicit options win over --quick's sizes


def test_compare_extracts_the_old_tree(tmp_path):
    tree = gate_cost_compare.extract_tree(REPO, OLD_REV, str(tmp_path / "old"))
    expected = subprocess.run(["git", "-C", REPO, "show", f"{OLD_REV}:gated_patch/__init__.py"], check=True,
                              capture_output=True, text=True).stdout
    assert (tmp_path / "old" / "gated_patch" / "__init__.py").read_text() == expected
    assert os.listdir(tree) == ["gated_patch"]  # nothing but the package


def test_the_old_revision_is_an_argument_never_a_default():
    with pytest.raises(SystemExit):
        gate_cost_compare.parse_args([])  # no revision of the project's history is built in
    assert gate_cost_compare.parse_args(["--from-json", "x.json"]).old_rev is None  # a saved compare needs none


def test_compare_fails_loudly_when_pythonpath_points_at_the_wrong_tree(tmp_path):
    old = gate_cost_compare.extract_tree(REPO, OLD_REV, str(tmp_path / "old"))
    # the subprocess imports the old tree but is told to expect the working tree: gate_cost.py must refuse to measure
    env = dict(os.environ, PYTHONPATH=old)
    done = subprocess.run([sys.executable, gate_cost_compare.GATE_COST, "--quick", "--models", "tiny",
                           "--expect-gated-patch-in", REPO, "--out", str(tmp_path / "x.json")],
                          env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode != 0
    assert "wrong source tree" in done.stderr and os.path.join(old, "gated_patch") in done.stderr
    assert not (tmp_path / "x.json").exists()
    # and the compare's own check of the recorded file
    old_file = os.path.join(old, "gated_patch", "__init__.py")
    with pytest.raises(SystemExit, match="not from the tree under test"):
        gate_cost_compare.imported_from({"gated_patch": {"file": old_file}}, REPO)
    with pytest.raises(SystemExit, match="not from the tree under test"):
        gate_cost_compare.imported_from({}, REPO)
    assert gate_cost_compare.imported_from({"gated_patch": {"file": old_file}}, old) == os.path.realpath(old_file)


def _result(ratios: dict, paired: float | None = None) -> dict:
    """A gate_cost.py result with one model: {workload: {variant: ratio_cpu}}."""
    workloads = {}
    for workload, variants in ratios.items():
        workloads[workload] = {"unpatched": {"ratio_cpu": 1.0, "median_cpu_s": 2.0}}
        for name, ratio in variants.items():
            workloads[workload][name] = {"ratio_cpu": ratio, "median_cpu_s": 2.0 * ratio}
            if workload == "decode":
                workloads[workload][name]["paired_ratio_cpu"] = paired
    return {"models": [{"label": "m", "workloads": workloads}], "gated_patch": {"file": "x"}}


def test_compare_table_and_spread_on_synthetic_numbers(tmp_path):
    runs = []
    by_round = [(1.05, 1.10, 1.03, 1.031), (1.06, 1.11, 1.05, 1.04), (1.04, 1.12, 1.04, 1.05)]  # old/new b1, decode
    for index, (old_b1, new_b1, old_decode, new_decode) in enumerate(by_round):
        for code, b1, decode in (("old", old_b1, old_decode), ("new", new_b1, new_decode)):
            result = _result({"prefill_b1": {"h": b1}, "decode": {"h": decode}}, paired=1.0)
            runs.append({"code": code, "round": index + 1, "result": result})
    rows = {(r["workload"], r["metric"]): r for r in gate_cost_compare.compare_rows(runs)}
    assert set(rows) == {("prefill_b1", "ratio_cpu"), ("decode", "ratio_cpu"), ("decode", "paired_ratio_cpu")}
    prefill = rows[("prefill_b1", "ratio_cpu")]
    assert prefill["old"]["median"] == pytest.approx(1.05) and prefill["new"]["median"] == pytest.approx(1.11)
    assert prefill["old"]["spread"] == pytest.approx(0.02) and prefill["new"]["spread"] == pytest.approx(0.02)
    assert prefill["difference"] == pytest.approx(0.06) and prefill["beyond_spread"] is True
    decode = rows[("decode", "ratio_cpu")]  # medians 1.04 vs 1.04, spreads 0.02 / 0.019
    assert decode["difference"] == pytest.approx(0.0) and decode["beyond_spread"] is False
    assert rows[("decode", "paired_ratio_cpu")]["beyond_spread"] is False
    one_round = gate_cost_compare.compare_rows(runs[:2])
    assert all(r["beyond_spread"] is None for r in one_round)  # one round has no spread to compare with

    data = {"settings": {"old_rev": OLD_REV, "old_commit": "1" * 40, "new_head": "a" * 40,
                         "new_gated_patch_changed": True, "rounds": 3, "gate_cost_args": ["--models", "tiny"]},
            "machine": {"cpu_model": "CPU", "cpu_count": 2, "torch": "t", "transformers": "x"}, "runs": runs}
    table = gate_cost_compare.summarise(data)["table"]
    assert "| prefill_b1 | h | 1.050 [1.040 - 1.060] | 1.110 [1.100 - 1.120] | +0.060 | yes, new slower |" in table
    assert "| decode (paired-step) | h |" in table and "| decode | h |" in table
    assert "| m | prefill_b1 | 2.00 s [2.00 s - 2.00 s] | 2.00 s [2.00 s - 2.00 s] |" in table  # unpatched times



def test_compare_rebuilds_the_table_from_a_saved_run(tmp_path, capsys):
    runs = [{"code": code, "round": index // 2 + 1, "result": _result({"decode": {"h": ratio}}, paired=ratio)}
            for index, (code, ratio) in enumerate([("old", 1.02), ("new", 1.03), ("new", 1.032), ("old", 1.022)])]
    saved = tmp_path / "compare.json"
    settings = {"old_rev": OLD_REV, "old_commit": "0" * 40, "new_head": "", "new_gated_patch_changed": False,
                "rounds": 2, "gate_cost_args": [], "quick": False}
    machine = {"cpu_model": "CPU", "cpu_count": 2, "torch": "t", "transformers": "x"}
    saved.write_text(json.dumps({"settings": settings, "machine": machine, "runs": runs}))
    data = gate_cost_compare.main(["--from-json", str(saved)])
    row = "| decode | h | 1.021 [1.020 - 1.022] | 1.031 [1.030 - 1.032] | +0.010 | yes, new slower |"
    assert row in data["table"] and row in capsys.readouterr().out


@pytest.mark.slow  # four gate_cost.py processes, one to two minutes
def test_compare_quick_runs_old_and_new_code(tmp_path, capsys):
    out = tmp_path / "compare.json"
    data = gate_cost_compare.main(["--quick", "--no-compile", "--rounds", "2", "--old-rev", OLD_REV, "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [(r["round"], r["code"]) for r in saved["runs"]] == [(1, "old"), (1, "new"), (2, "new"), (2, "old")]
    for run in saved["runs"]:
        expected = os.path.realpath(REPO) if run["code"] == "new" else run["tree"]
        assert run["gated_patch_file"].startswith(expected + os.sep)
        assert run["result"]["gated_patch"]["file"] == run["gated_patch_file"]
    assert {r["code"]: r["tree"] for r in saved["runs"]}["old"] != os.path.realpath(REPO)
    assert saved["settings"]["old_commit"] == gate_cost_compare.resolve_commit(REPO, OLD_REV)
    rows = {(r["workload"], r["variant"], r["metric"]) for r in data["rows"]}
    for variant in ("elementwise/hidden", "headwise/hidden"):
        assert {("prefill_b1", variant, "ratio_cpu"), ("prefill_b2", variant, "ratio_cpu"),
                ("decode", variant, "ratio_cpu"), ("decode", variant, "paired_ratio_cpu")} <= rows
    assert all(len(r["old"]["values"]) == 2 and len(r["new"]["values"]) == 2 for r in data["rows"])
    assert "| decode | headwise/hidden |" in capsys.readouterr().out
