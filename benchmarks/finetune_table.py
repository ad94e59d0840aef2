"""The README table "Gate-only fine-tuning vs LoRA vs full": runs examples/finetune_gates.py once per method, each in
its own process (so peak RSS is per method), same data, steps, seed and batch, and writes a Markdown table, the raw
JSON and a plot.

    python benchmarks/finetune_table.py --steps 40 --seq-len 128 --batch-size 4 --eval-blocks 32   # the README table

LoRA alone uses r=32 on every linear projection (attention and MLP): 9.8M parameters, about the 10.0M of elementwise
gates on SmolLM2-135M. s/step is the median over the steps of one run (the first step excluded); the machine is
shared, so treat it as indicative.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from gated_patch.files import atomic_write, write_json

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "finetune_gates.py"

METHODS = [
    ("gate-only, elementwise", ["--mode", "gates", "--granularity", "elementwise"]),
    ("gate-only, headwise", ["--mode", "gates", "--granularity", "headwise"]),
    ("gates (elementwise) + LoRA r=8 on q,v", ["--mode", "gates+lora", "--lora-r", "8", "--lora-targets", "q_proj,v_proj"]),
    ("LoRA r=32, all linear (no gates)", ["--mode", "lora", "--lora-r", "32", "--lora-targets", "all-linear"]),
    ("full fine-tuning (no gates)", ["--mode", "full"]),
]


def run(label: str, extra: list[str], common: list[str], work: Path) -> dict:
    result_file = work / f"{len(list(work.iterdir()))}.json"
    command = [sys.executable, str(EXAMPLE), *extra, *common, "--json", str(result_file)]
    print(f"\n=== {label}: {' '.join(command)}", flush=True)
    subprocess.run(command, check=True, cwd=ROOT)
    result = json.loads(result_file.read_text())
    result["method"] = label
    return result


def markdown(results: list[dict], settings: str) -> str:
    lines = [
        f"Settings: {settings}",
        "",
        "| method | trainable params | saved MB | peak RSS MiB | s/step | lr | held-out PPL before | after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} | {r['saved_mb']:.2f} | {r['peak_rss_mib']:.0f} | "
            f"{r['s_per_step_median']:.2f} | {r['lr']:g} | {r['ppl_before']:.3f} | {r['ppl_after']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    labels = [r["method"].replace(" (no gates)", "").replace(" on q,v", "") for r in results]
    y = range(len(results))
    axes[0].barh(y, [r["ppl_before"] for r in results], color="lightgray", label="before")
    axes[0].barh(y, [r["ppl_after"] for r in results], height=0.5, color="tab:blue", label="after")
    axes[0].set_yticks(list(y), labels)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("held-out perplexity (lower is better)")
    axes[0].legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, frameon=False)
    axes[1].barh(y, [r["trainable_params"] / 1e6 for r in results], color="tab:orange")
    axes[1].set_yticks(list(y), [""] * len(results))
    axes[1].invert_yaxis()
    axes[1].set_xscale("log")
    axes[1].set_xlabel("trainable parameters (millions, log scale)")
    fig.suptitle("SmolLM2-135M-Instruct on pydoc topics: same data, steps, seed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-blocks", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None)
    parser.add_argument("--only", default=None, help="comma-separated method indices to run (default: all)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "finetune"))
    args = parser.parse_args(argv)
    common = ["--steps", str(args.steps), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
              "--eval-blocks", str(args.eval_blocks), "--seed", str(args.seed)]  # fmt: skip
    if args.model:
        common += ["--model", args.model]
    methods = METHODS if args.only is None else [METHODS[int(i)] for i in args.only.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = (
        f"{args.steps} steps, {args.seq_len} tokens x batch {args.batch_size}, seed {args.seed}, held-out "
        f"{args.eval_blocks} blocks x {args.seq_len} tokens, 1 process, CPU threads: {os.cpu_count()} "
        "(shared machine)"
    )
    results = []
    with tempfile.TemporaryDirectory() as work:
        for label, extra in methods:
            results.append(run(label, extra, common, Path(work)))
            write_outputs(results, settings, out)  # after every method, so a cut-short run keeps what it measured
    plot(results, out / "finetune.png")
    print("\n" + markdown(results, settings))


def write_outputs(results: list[dict], settings: str, out: Path) -> None:
    atomic_write(out / "table.md", markdown(results, settings))
    write_json(out / "results.json", results)


if __name__ == "__main__":
    main()
