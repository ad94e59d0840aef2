"""Peak memory of ``gated-patch-convert`` on a multi-shard checkpoint, against loading the model to convert it.

The default model (SmolLM2-135M-Instruct, float32, 538 MB of weights) is re-saved as a checkpoint of --shards
shards (``save_pretrained(max_shard_size=...)``). Each variant runs in a fresh subprocess that reports its peak
resident set size (``VmHWM``); the variants are interleaved over --repeats repetitions and medians reported:

  baseline        import gated_patch (torch, transformers), nothing else: the floor every variant pays
  convert         gated-patch-convert SRC OUT (add identity gates): shards are byte copies, gates an extra shard
  export          gated-patch-convert GATED OUT --target-layout paper: every shard that holds a q_proj is rewritten
                  tensor by tensor (the streaming writer), from a gated checkpoint (init paper, no bias)
  load+save       the non-streaming way: from_pretrained, patch_model, save_pretrained

"above baseline" = variant peak - baseline peak: the memory the conversion itself needs. Streaming keeps it near
one shard (or one tensor) instead of the model size.

Run:  python benchmarks/convert_memory.py            (writes benchmarks/results/convert_memory.{json,png})
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# VmHWM (peak RSS of this process image); ru_maxrss would carry over the parent's peak across fork + exec
PEAK = "print('PEAK_KB', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
SCRIPTS = {
    "baseline": "import gated_patch, conversion.convert\n",
    "convert": (
        "import sys; from conversion.convert import main\n"
        "assert main([sys.argv[1], sys.argv[2], '--no-progress', '--overwrite']) == 0\n"
    ),
    "export": (
        "import sys; from conversion.convert import main\n"
        "assert main([sys.argv[3], sys.argv[2], '--no-progress', '--overwrite', '--target-layout', 'paper']) == 0\n"
    ),
    "load+save": (
        "import sys, shutil, gated_patch\nfrom transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "gated_patch.patch_model(model)\nshutil.rmtree(sys.argv[2], ignore_errors=True)\n"
        "model.save_pretrained(sys.argv[2])\n"
    ),
}


def peak_kb(variant: str, src: Path, out: Path, gated: Path) -> int:
    code = SCRIPTS[variant] + PEAK
    proc = subprocess.run([sys.executable, "-c", code, str(src), str(out), str(gated)], capture_output=True,
                          text=True, cwd=HERE.parent, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return int(proc.stdout.split("PEAK_KB")[-1].split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()

    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from gated_patch.default_model import DEFAULT_MODEL_NAME, default_model_dir

    work = Path(args.workdir or tempfile.mkdtemp(prefix="convert_memory-"))
    src, gated, out = work / "src", work / "gated", work / "out"
    model = AutoModelForCausalLM.from_pretrained(default_model_dir())
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    unique_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    shard_mb = max(1, unique_bytes // args.shards // 2**20 + 1)
    if not src.exists():
        model.save_pretrained(src, max_shard_size=f"{shard_mb}MB")
    del model
    shard_sizes = sorted(p.stat().st_size for p in src.glob("model-*.safetensors"))
    if not gated.exists():
        from conversion.convert import main as convert_main

        assert convert_main([str(src), str(gated), "--init", "paper", "--no-bias", "--no-progress"]) == 0

    runs: dict[str, list[int]] = {v: [] for v in SCRIPTS}
    order = list(SCRIPTS)
    with tqdm(total=args.repeats * len(order), desc="subprocess runs") as bar:
        for repeat in range(args.repeats):
            rotated = order[repeat % len(order):] + order[: repeat % len(order)]
            for variant in rotated:
                runs[variant].append(peak_kb(variant, src, out, gated))
                bar.update()
    median = {v: statistics.median(kb) * 1024 for v, kb in runs.items()}
    base = median["baseline"]
    result = {
        "model": DEFAULT_MODEL_NAME,
        "dtype": str(torch.float32),
        "weights_MiB": round(unique_bytes / 2**20, 1),
        "state_dict_MiB_incl_tied": round(weight_bytes / 2**20, 1),
        "source_shards": len(shard_sizes),
        "largest_shard_MiB": round(shard_sizes[-1] / 2**20, 1),
        "repeats": args.repeats,
        "peak_rss_MiB": {v: round(b / 2**20, 1) for v, b in median.items()},
        "above_baseline_MiB": {v: round((b - base) / 2**20, 1) for v, b in median.items() if v != "baseline"},
        "runs_peak_rss_KiB": runs,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU, Python {platform.python_version()}, "
        f"torch {torch.__version__}",
        "command": "python benchmarks/convert_memory.py " + " ".join(sys.argv[1:]),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "convert_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs_peak_rss_KiB"}, indent=2))
    plot(result, RESULTS / "convert_memory.png")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    above = result["above_baseline_MiB"]
    names = list(above)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    bars = ax.bar(names, [above[n] for n in names], color=["tab:green", "tab:blue", "tab:red"][: len(names)])
    ax.axhline(result["weights_MiB"], color="gray", linestyle="--", label=f"model weights ({result['weights_MiB']} MiB)")
    ax.axhline(result["largest_shard_MiB"], color="gray", linestyle=":",
               label=f"largest shard ({result['largest_shard_MiB']} MiB)")
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel("peak RSS above import baseline (MiB)")
    ax.set_title(f"{result['model']}, {result['source_shards']} shards: memory to convert (median of {result['repeats']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
