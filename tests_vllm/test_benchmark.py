"""The vLLM throughput benchmark runs end to end at small sizes (timings are its output, not asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "vllm_throughput.py"


def test_the_throughput_benchmark_runs_and_reports_every_variant(tmp_path):
    out = tmp_path / "result.json"
    subprocess.run([sys.executable, str(BENCHMARK), "--quick", "--cache", str(tmp_path / "checkpoints"), "--out", str(out)],
                   check=True, timeout=600)
    report = json.loads(out.read_text())
    for workload in ("prefill", "decode"):
        rows = report["workloads"][workload]
        assert set(rows) == {"ungated", "elementwise/hidden", "headwise/hidden"}
        assert rows["ungated"]["time_ratio"] == 1.0 and all(row["tokens_per_s"] > 0 for row in rows.values())
        # SmolLM2: an elementwise gate is a 576 x 576 projection per layer, about 7% of the matmul FLOPs per token
        assert 1.06 < rows["elementwise/hidden"]["flop_ratio"] < 1.08
        assert 1.0 < rows["headwise/hidden"]["flop_ratio"] < 1.002
