"""What one small tensor operation costs at decode time: warm (timed in a loop) vs cold (right after a GEMV that
streams a layer's worth of weights through the caches, as every operation of a decode step is).

At decode a gated layer does its gate on one token: a [1, 1, hidden] input, a few hundred numbers. The arithmetic is
nothing; what the gate costs is the fixed cost of each operation (Python binding, dispatcher, kernel setup) and of
each Python lookup. Timed in a loop those costs look like 1-4 us, but in a real decode step the caches have just been
flushed by the weight GEMVs before them, and the same operation costs several times more. This script measures both,
for the operations the gate is made of and for alternatives, at the shapes of SmolLM2-135M (hidden 576, 9 heads of
64), so that benchmarks/README.md can say where the gate's decode time goes and why it cannot get below a floor.

    python benchmarks/op_cost.py            # writes benchmarks/results/op_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))


def _operations(hidden: int, heads: int, head_dim: int):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, hidden, generator=generator)
    y = torch.randn(1, 1, heads * head_dim, generator=generator)
    head_gate = torch.nn.Linear(hidden, heads)
    weight, bias = head_gate.weight.detach(), head_gate.bias.detach()
    wide = torch.randn(heads * head_dim, hidden, generator=generator) * 0.02
    scores = torch.rand(1, 1, heads, generator=generator)
    two = torch.tensor(2.0)
    vector = x.reshape(-1)
    return {
        "python function call (no tensor op)": lambda: None,
        "nn.Linear module call, headwise gate": lambda: head_gate(x),
        "F.linear, headwise gate": lambda: F.linear(x, weight, bias),
        "torch.addmv, headwise gate (one token)": lambda: torch.addmv(bias, weight, vector),
        "F.linear, elementwise gate": lambda: F.linear(x, wide),
        "torch.sigmoid (9 values)": lambda: torch.sigmoid(scores),
        "multiply by a Python float (9 values)": lambda: scores * 2.0,
        "multiply by a 0-dim tensor (9 values)": lambda: scores * two,
        "view": lambda: y.view(1, 1, heads, head_dim),
        "broadcast multiply per head": lambda: y.view(1, 1, heads, head_dim) * scores.unsqueeze(-1),
        "elementwise multiply (576 values)": lambda: y * y,
    }


def measure(fn, evict, repeats: int) -> tuple[float, float]:
    """Median seconds of `fn()`: cold (each call right after `evict()`) and warm (back to back)."""
    cold, warm = [], []
    for _ in range(repeats):
        evict()
        start = time.perf_counter_ns()
        fn()
        cold.append(time.perf_counter_ns() - start)
    for _ in range(repeats):
        start = time.perf_counter_ns()
        fn()
        warm.append(time.perf_counter_ns() - start)
    return statistics.median(cold) / 1e9, statistics.median(warm) / 1e9


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--evict-mib", type=float, default=14.0, help="weights streamed before each cold call")
    parser.add_argument("--repeats", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3, help="the table reports the median over rounds")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "op_cost.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = int(args.evict_mib * 2**20 / 4 / args.hidden)
    big = torch.randn(rows, args.hidden)
    token = torch.randn(1, 1, args.hidden)

    def evict():
        F.linear(token, big)

    operations = _operations(args.hidden, args.heads, args.head_dim)
    samples = {name: ([], []) for name in operations}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, fn in operations.items():
                cold, warm = measure(fn, evict, args.repeats)
                samples[name][0].append(cold)
                samples[name][1].append(warm)
    results = {
        "settings": vars(args),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "operations": {
            name: {"cold_us": statistics.median(c) * 1e6, "warm_us": statistics.median(w) * 1e6}
            for name, (c, w) in samples.items()
        },
    }
    print(f"\n| operation (shapes of hidden {args.hidden}, {args.heads} heads x {args.head_dim}) | warm | cold | cold / warm |")
    print("|---|---:|---:|---:|")
    for name, row in results["operations"].items():
        print(f"| {name} | {row['warm_us']:.1f} us | {row['cold_us']:.1f} us | {row['cold_us'] / row['warm_us']:.1f}x |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, args.out)
    print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
