"""The gate cost of two versions of gated_patch, measured back to back on the same machine.

The old version is a source tree extracted from a git revision (``--old-rev REV``, required; only its ``gated_patch/``
directory), the new one is the working tree. `gate_cost.py` (this folder's, the same script for both) runs in a fresh subprocess
per measurement with ``PYTHONPATH=<tree>``, alternating old and new code for ``--rounds`` rounds, the order
alternating between rounds (old, new / new, old / ...). Each subprocess checks that ``gated_patch`` is imported from
its tree (an editable install of the package must not win) and exits with an error otherwise; the check is repeated
here on the file each run records.

Reported per workload and gated variant, for old and new code: the median over rounds of the gated / unpatched
CPU-time ratio (each round's ratio is itself a median over that run's repetitions), and the spread of the same code
over rounds (min - max). A difference new - old counts as beyond the spread when it is larger than the larger of the
two spreads. Decode workloads also get the paired-step ratio.

Output: a JSON file with every sample and the machine info (under outputs/ unless --out), and a Markdown table on
stdout.

    python benchmarks/gate_cost_compare.py --old-rev REV --quick   # smoke run: tiny model, few tokens (~2 min)
    python benchmarks/gate_cost_compare.py --old-rev REV           # SmolLM2, the target workloads (~40 min on 2 cores)
    python benchmarks/gate_cost_compare.py --from-json outputs/gate_cost_compare.json   # the table again
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

from tqdm import tqdm

from gated_patch import files

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
GATE_COST = os.path.join(HERE, "gate_cost.py")
DEFAULT_OUT = os.path.join(REPO, "outputs", "gate_cost_compare.json")
QUICK_OUT = os.path.join(REPO, "outputs", "gate_cost_compare_quick.json")
BASE = "unpatched"

TARGETS = ("--models smollm2 --variants elementwise/hidden,headwise/hidden --prefill-batches 1,8 --prefill-len 512 "
           "--decode-tokens 128 --decode-prompt 32 --compile-decode --train-batch 0 --no-memory --threads 1 "
           "--warmup 1 --reps 6 --heavy-reps 2 --decode-reps 2")
QUICK = ("--models tiny --variants elementwise/hidden,headwise/hidden --quick --compile-decode --train-batch 0 "
         "--no-memory --threads 1")
DEFAULT_ROUNDS, QUICK_ROUNDS = 3, 2


# --- source trees ---------------------------------------------------------------------------------------------------


def resolve_commit(repo: str, rev: str) -> str:
    return subprocess.run(["git", "-C", repo, "rev-parse", "--verify", f"{rev}^{{commit}}"], check=True,
                          capture_output=True, text=True).stdout.strip()


def extract_tree(repo: str, rev: str, dest: str) -> str:
    """Extract ``gated_patch/`` of `rev` into `dest` (``git archive | tar -x``); returns `dest`."""
    archive = subprocess.run(["git", "-C", repo, "archive", "--format=tar", rev, "gated_patch"], check=True,
                             capture_output=True).stdout
    os.makedirs(dest, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    if not os.path.isfile(os.path.join(dest, "gated_patch", "__init__.py")):
        raise SystemExit(f"{rev} has no gated_patch/__init__.py; nothing to measure.")
    return dest


def working_tree_state(repo: str) -> dict:
    """HEAD and whether gated_patch/ differs from it (read-only git calls: no index refresh is written)."""
    head = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    changes = subprocess.run(["git", "--no-optional-locks", "-C", repo, "status", "--porcelain", "--", "gated_patch"],
                             capture_output=True, text=True).stdout
    return {"head": head, "gated_patch_changed": bool(changes.strip())}


def imported_from(result: dict, tree: str) -> str:
    """The gated_patch file a gate_cost.py run recorded; SystemExit if it is not under `tree`."""
    recorded = result.get("gated_patch", {}).get("file")
    location, root = os.path.realpath(recorded) if recorded else "<not recorded>", os.path.realpath(tree)
    if not location.startswith(root + os.sep):
        raise SystemExit(f"gate_cost.py imported gated_patch from {location}, not from the tree under test {root}.")
    return location


# --- running ----------------------------------------------------------------------------------------------------------


def _child_progress(log: str) -> str:
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.path.getsize(log) - 400))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    found = re.findall(r"(\d+)/(\d+) \[", tail)
    return f"{found[-1][0]}/{found[-1][1]} runs" if found else "starting"


def run_gate_cost(tree: str, gate_cost_args: list, workdir: str, name: str, bar=None) -> dict:
    """One gate_cost.py subprocess with ``PYTHONPATH=tree``; returns its JSON (with the elapsed wall time)."""
    out, log = os.path.join(workdir, f"{name}.json"), os.path.join(workdir, f"{name}.log")
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, GATE_COST, *gate_cost_args, "--expect-gated-patch-in", tree, "--out", out]
    started = time.perf_counter()
    with open(log, "w") as f:
        process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=workdir)
        while process.poll() is None:
            time.sleep(2)
            if bar is not None:
                bar.set_postfix_str(f"{name}: {_child_progress(log)}")
    if process.returncode:
        with open(log, errors="replace") as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"gate_cost.py failed ({name}, exit {process.returncode}):\n{tail}\n"
                         f"command: PYTHONPATH={tree} {shlex.join(command)}")
    with open(out) as f:
        result = json.load(f)
    imported_from(result, tree)
    result["compare_wall_s"] = time.perf_counter() - started
    return result


def run_rounds(trees: dict, rounds: int, gate_cost_args: list, workdir: str, on_run=None) -> list:
    """`rounds` rounds of one run per tree; the order alternates between rounds (old, new / new, old / ...)."""
    runs = []
    with tqdm(total=rounds * len(trees), desc="gate cost compare", unit="run") as bar:
        for index in range(rounds):
            order = list(trees) if index % 2 == 0 else list(trees)[::-1]
            for position, code in enumerate(order):
                name = f"round{index + 1}-{code}"
                result = run_gate_cost(trees[code], gate_cost_args, workdir, name, bar)
                runs.append({"code": code, "round": index + 1, "position": position, "tree": trees[code],
                             "gated_patch_file": result["gated_patch"]["file"], "result": result})
                bar.update(1)
                if on_run is not None:
                    on_run(runs)
    return runs


# --- summary ----------------------------------------------------------------------------------------------------------


def _stats(values: list) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "spread": max(values) - min(values), "values": values}


def compare_rows(runs: list) -> list:
    """One row per model, workload, gated variant and metric (CPU-time ratio; decode also the paired-step ratio):
    old and new statistics over rounds, new - old, and whether that exceeds the larger spread."""
    ratios: dict = {}  # (model, workload, variant, metric) -> {code: [values by round]}
    for run in runs:
        for model in run["result"]["models"]:
            for workload, entry in model["workloads"].items():
                for variant, e in entry.items():
                    if variant == BASE:
                        continue
                    metrics = ["ratio_cpu"] + (["paired_ratio_cpu"] if "paired_ratio_cpu" in e else [])
                    for metric in metrics:
                        key = (model["label"], workload, variant, metric)
                        ratios.setdefault(key, {}).setdefault(run["code"], []).append(e[metric])
    rows = []
    for (model, workload, variant, metric), by_code in ratios.items():
        if set(by_code) != {"old", "new"}:
            continue
        old, new = _stats(by_code["old"]), _stats(by_code["new"])
        difference = new["median"] - old["median"]
        spread = max(old["spread"], new["spread"])
        rounds = min(len(old["values"]), len(new["values"]))
        beyond = None if rounds < 2 else abs(difference) > spread
        rows.append({"model": model, "workload": workload, "variant": variant, "metric": metric, "old": old, "new": new,
                     "difference": difference, "spread": spread, "beyond_spread": beyond})
    return rows


def reference_times(runs: list) -> list:
    """Median over rounds of the unpatched model's median CPU time per workload, old and new (the machine's drift)."""
    times: dict = {}
    for run in runs:
        for model in run["result"]["models"]:
            for workload, entry in model["workloads"].items():
                if BASE in entry:
                    key = (model["label"], workload)
                    times.setdefault(key, {}).setdefault(run["code"], []).append(entry[BASE]["median_cpu_s"])
    return [{"model": m, "workload": w, **{code: _stats(v) for code, v in by_code.items()}}
            for (m, w), by_code in times.items()]


def _verdict(row: dict) -> str:
    if row["beyond_spread"] is None:
        return "n/a (1 round)"
    if not row["beyond_spread"]:
        return "no"
    return "yes, new slower" if row["difference"] > 0 else "yes, new faster"


def _duration(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


def _cell(stats: dict, fmt=lambda ratio: f"{ratio:.3f}") -> str:
    """median [min - max]"""
    return f"{fmt(stats['median'])} [{fmt(stats['min'])} - {fmt(stats['max'])}]"


def format_table(data: dict) -> str:
    s = data["settings"]
    rows = data["rows"]
    lines = [
        "Gate cost of the old code (the library before the decode fast path and the fused gate were removed; the "
        "revisions are in the JSON) and of this version, "
        f"{s['rounds']} rounds, order alternating; each run: "
        f"`python benchmarks/gate_cost.py {shlex.join(s['gate_cost_args'])}`. "
        f"Machine: {data['machine']['cpu_model']}, {data['machine']['cpu_count']} cores, torch "
        f"{data['machine']['torch']}, transformers {data['machine']['transformers']}, 1 thread per process.",
        "",
        "Gated / unpatched CPU time, median over rounds [min - max over rounds]; \"beyond spread\": |new - old| "
        "larger than the larger of the two min - max spreads.",
        "",
    ]
    models = list(dict.fromkeys(r["model"] for r in rows))
    for model in models:
        if len(models) > 1:
            lines += [f"**{model}**", ""]
        lines += ["| workload | variant | old | new | new - old | beyond spread? |", "|---|---|---:|---:|---:|---|"]
        for r in (r for r in rows if r["model"] == model):
            workload = r["workload"] + (" (paired-step)" if r["metric"] == "paired_ratio_cpu" else "")
            lines.append(f"| {workload} | {r['variant']} | {_cell(r['old'])} | {_cell(r['new'])} | "
                         f"{r['difference']:+.3f} | {_verdict(r)} |")
        lines.append("")
    reference = [t for t in data.get("reference", []) if "old" in t and "new" in t]
    if reference:
        lines += ["Unpatched model, median CPU time per run (median over rounds [min - max]; the same model under both "
                  "codes, so this shows the machine's drift):", "",
                  "| model | workload | old | new |", "|---|---|---:|---:|"]
        for t in reference:
            lines.append(f"| {t['model'].split(' (')[0]} | {t['workload']} | {_cell(t['old'], _duration)} | "
                         f"{_cell(t['new'], _duration)} |")
    return "\n".join(lines).rstrip() + "\n"


def machine_info(first_result: Optional[dict]) -> dict:
    info = dict(first_result["machine"]) if first_result else {}
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info.update(cpu_model=model, cpu_count=os.cpu_count(), platform=platform.platform(),
                python=platform.python_version())
    return info


def summarise(data: dict) -> dict:
    if "machine" not in data:  # kept when rebuilding from a saved JSON (possibly from another machine)
        data["machine"] = machine_info(data["runs"][0]["result"] if data["runs"] else None)
    data["rows"] = compare_rows(data["runs"])
    data["reference"] = reference_times(data["runs"])
    data["table"] = format_table(data)
    return data


# --- command line -----------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old-rev", default=None, help="git revision of the old code (required unless --from-json)")
    p.add_argument("--repo", default=REPO, help="the git repository; its working tree is the new code")
    p.add_argument("--rounds", type=int, default=None,
                   help=f"rounds of one old and one new run (default {DEFAULT_ROUNDS}; --quick: {QUICK_ROUNDS})")
    p.add_argument("--gate-cost-args", default=None, help="arguments of every gate_cost.py run, as one string "
                   "(default: the target workloads on SmolLM2; with --quick: the tiny model)")
    p.add_argument("--no-compile", action="store_true", help="drop --compile-decode from the gate_cost.py arguments")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, few tokens")
    p.add_argument("--out", default=None, help=f"JSON path (default {os.path.relpath(DEFAULT_OUT, REPO)}; --quick: "
                   f"{os.path.relpath(QUICK_OUT, REPO)})")
    p.add_argument("--from-json", default=None, metavar="JSON", help="measure nothing: rebuild the table from a saved "
                   "compare JSON")
    args = p.parse_args(argv)
    if not args.old_rev and not args.from_json:
        p.error("--old-rev REV is required: the git revision to compare the working tree with")
    args.rounds = args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    args.gate_cost_args = shlex.split(args.gate_cost_args or (QUICK if args.quick else TARGETS))
    if args.no_compile:
        args.gate_cost_args = [a for a in args.gate_cost_args if a != "--compile-decode"]
    args.out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            data = summarise(json.load(f))
        print("\n" + data["table"])
        return data
    state = working_tree_state(args.repo)
    data = {"settings": {"old_rev": args.old_rev, "old_commit": resolve_commit(args.repo, args.old_rev),
                         "new_tree": os.path.realpath(args.repo), "new_head": state["head"],
                         "new_gated_patch_changed": state["gated_patch_changed"], "rounds": args.rounds,
                         "gate_cost_args": args.gate_cost_args, "quick": args.quick},
            "runs": []}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gate_cost_compare_") as workdir:
        trees = {"old": extract_tree(args.repo, data["settings"]["old_commit"], os.path.join(workdir, "old")),
                 "new": os.path.realpath(args.repo)}

        def save(runs):
            data["runs"] = runs
            data["elapsed_s"] = time.perf_counter() - started
            files.write_json(args.out, data)  # after every run, so that an interrupted compare keeps what it measured

        run_rounds(trees, args.rounds, args.gate_cost_args, workdir, on_run=save)
    summarise(data)
    files.write_json(args.out, data)
    print("\n" + data["table"])
    print(f"wrote {args.out} ({data['elapsed_s'] / 60:.1f} min)")
    return data


if __name__ == "__main__":
    main()
