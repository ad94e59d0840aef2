"""examples/sink_mechanism.py at a tiny size: what it writes is consistent with itself, its variants start from the
same weights, and two worker processes give the numbers of one."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest
from conftest import EXAMPLES, run_example

EXAMPLE = EXAMPLES / "sink_mechanism.py"
ARGS = ["--steps", "20", "--eval-every", "10", "--batch-size", "4", "--seq-len", "32", "--hidden", "32",
        "--seeds", "0", "1", "--settings", "decay", "--eval-batch", "8", "--window", "8"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("sink")
    assert run_example("sink_mechanism", [*ARGS, "--workers", "1", "--output-dir", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_every_run_is_recorded(one_process):
    _, data = one_process
    runs = data["runs"]
    assert sorted((r["variant"], r["seed"]) for r in runs) == sorted(
        (v, s) for v in ("baseline", "elementwise", "headwise") for s in (0, 1))
    for run in runs:
        assert [h["step"] for h in run["history"]] == [0, 10, 20]
        assert "train_loss" not in run["history"][0] and all(h["train_loss"] > 0 for h in run["history"][1:])
        assert run["final"] == run["history"][-1]
        gated = run["variant"] != "baseline"
        assert ("gate_trigger" in run["final"]) == gated and ("gate_other" in run["final"]) == gated
        assert set(run["streaming"]) == {"full", "window", "window+1"}


def test_variants_of_a_seed_start_from_the_same_attention(one_process):
    """The gate acts after attention and the other weights are the baseline's: at step 0 attention is identical."""
    _, data = one_process
    for seed in (0, 1):
        starts = {r["variant"]: r["history"][0] for r in data["runs"] if r["seed"] == seed}
        for key in ("f_attn_all", "f_attn_trigger", "f_attn_other"):
            assert starts["elementwise"][key] == starts["baseline"][key] == starts["headwise"][key]
    assert data["runs"][0]["history"][0]["f_attn_all"] != data["runs"][3]["history"][0]["f_attn_all"]  # seeds differ


def test_tables_hold_the_means_over_seeds(one_process):
    out, data = one_process
    lines = (out / "table.md").read_text().splitlines()
    for variant in ("baseline", "headwise"):
        row = next(line for line in lines if line.startswith(f"| decay | {variant} |")).split(" | ")
        values = [r["final"]["f_attn_all"] for r in data["runs"] if r["variant"] == variant]
        assert row[3] == f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
    stream = (out / "streaming.md").read_text()
    deltas = [r["streaming"]["window"] - r["streaming"]["full"] for r in data["runs"] if r["variant"] == "baseline"]
    assert f"{statistics.mean(deltas):.3f} ± {statistics.stdev(deltas):.3f}" in stream
    for png in ("training.png", "streaming.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_retabulate_rebuilds_the_same_tables(one_process, tmp_path):
    out, _ = one_process
    (tmp_path / "results.json").write_bytes((out / "results.json").read_bytes())
    assert run_example("sink_mechanism", ["--retabulate", "--output-dir", str(tmp_path)]) == 0
    for name in ("table.md", "streaming.md"):
        assert (tmp_path / name).read_text() == (out / name).read_text()


@pytest.mark.slow  # two processes
def test_two_worker_processes_give_the_same_numbers(one_process, tmp_path):
    _, data = one_process
    completed = subprocess.run([sys.executable, str(EXAMPLE), *ARGS, "--workers", "2", "--output-dir", str(tmp_path)],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    parallel = json.loads((tmp_path / "results.json").read_text())
    key = lambda r: (r["variant"], r["seed"])  # noqa: E731
    for mine, theirs in zip(sorted(data["runs"], key=key), sorted(parallel["runs"], key=key)):
        assert mine["history"] == theirs["history"] and mine["streaming"] == theirs["streaming"]
