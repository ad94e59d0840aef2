"""What the gate costs when vLLM serves it: throughput of gated / ungated SmolLM2-135M-Instruct in vLLM.

Runs in the vLLM venv (`make test-vllm` builds it). Three checkpoints (ungated, elementwise and headwise gates on the
hidden states, the paper's G1, with identity init plus N(0, 0.02) noise) are served by three vLLM engines, all
started before timing and all in this process (an idle engine in processes of its own keeps polling a core). Every repetition runs each workload once per engine, the order rotated
between repetitions, after one untimed warm-up; the report gives the median time ratio gated / ungated (the inverse
of the throughput ratio) beside the ratio of matmul FLOPs per token counted from the shapes.

Workloads: ``prefill`` (--requests prompts of --prefill-len tokens, one output token each) and ``decode``
(--requests prompts of 16 tokens, --decode-tokens output tokens each, EOS ignored), submitted as one batch.

    .venv-vllm/bin/python benchmarks/vllm_throughput.py            # eager: results/vllm_throughput.json
    .venv-vllm/bin/python benchmarks/vllm_throughput.py --compile  # vLLM's default mode: ..._compiled.json
    .venv-vllm/bin/python benchmarks/vllm_throughput.py --model-impl transformers  # vLLM's Transformers backend
    .venv-vllm/bin/python benchmarks/vllm_throughput.py --profile  # where the time goes, per operator (eager)
    .venv-vllm/bin/python benchmarks/vllm_throughput.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engines in this process: an idle one takes no CPU

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("ungated", "elementwise/hidden", "headwise/hidden")


def build_checkpoints(root: str) -> dict[str, str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import gated_patch as gp
    from gated_patch.default_model import default_model_dir

    paths = {}
    for variant in VARIANTS:
        path = os.path.join(root, variant.replace("/", "-"))
        paths[variant] = path
        if os.path.isfile(os.path.join(path, "config.json")):
            continue
        model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
        if variant != "ungated":
            gp.patch_model(model, gp.GateConfig(granularity=variant.split("/")[0], gate_input="hidden_states"))
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if ".attn_gate." in name:
                        parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
        model.save_pretrained(path)
        AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(path)
    return paths


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def matmul_flops_per_token(variant: str) -> float:
    """Weight matmul FLOPs per token of SmolLM2 (hidden 576, 9 heads / 3 KV heads of 64, MLP 1536, 30 layers)."""
    hidden, heads, kv, head_dim, mlp, layers, vocab = 576, 9, 3, 64, 1536, 30, 49152
    per_layer = hidden * (heads + 2 * kv) * head_dim + heads * head_dim * hidden + 3 * hidden * mlp
    gate = {"ungated": 0, "elementwise/hidden": hidden * heads * head_dim, "headwise/hidden": hidden * heads}[variant]
    return 2.0 * (layers * (per_layer + gate) + hidden * vocab)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--prefill-len", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="vLLM's torch.compile (default: enforce_eager)")
    parser.add_argument("--model-impl", default="auto", choices=["auto", "transformers"],
                        help="transformers: every engine on vLLM's Transformers backend, the gated ones through their remote code")
    parser.add_argument("--cache", default=os.path.join(HERE, "..", "outputs", "vllm_throughput_checkpoints"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 reps, 2 requests, short sequences")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing: torch.profiler of one decode batch per engine (CPU time per operator)")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.requests, args.prefill_len, args.decode_tokens = 2, 2, 64, 8
    name = ("vllm_throughput" + ("_compiled" if args.compile else "") + ("_transformers" if args.model_impl != "auto" else "")
            + ("_quick" if args.quick else ""))
    out = args.out or os.path.join(HERE, "results", name + ".json")

    import vllm
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    paths = build_checkpoints(os.path.abspath(args.cache))
    engines = {variant: LLM(model=path, dtype="float32", enforce_eager=not args.compile, max_model_len=1024, seed=0,
                            model_impl=args.model_impl, trust_remote_code=args.model_impl == "transformers")
               for variant, path in paths.items()}
    prefill_prompts = [{"prompt_token_ids": [(17 * r + 31 * i) % 40000 + 100 for i in range(args.prefill_len)]}
                       for r in range(args.requests)]
    decode_prompts = [{"prompt_token_ids": [(13 * r + 7 * i) % 40000 + 100 for i in range(16)]} for r in range(args.requests)]
    workloads = {
        "prefill": (prefill_prompts, SamplingParams(temperature=0, max_tokens=1), args.requests * args.prefill_len),
        "decode": (decode_prompts, SamplingParams(temperature=0, max_tokens=args.decode_tokens, min_tokens=args.decode_tokens,
                                                  ignore_eos=True), args.requests * args.decode_tokens),
    }
    if args.profile:
        profile(engines, *workloads["decode"][:2])
        return
    times = {w: {v: [] for v in VARIANTS} for w in workloads}
    order = list(VARIANTS)
    for rep in tqdm(range(args.reps + 1), desc="repetitions"):
        for workload, (prompts, params, _) in workloads.items():
            for variant in order:
                start = time.perf_counter()
                results = engines[variant].generate(prompts, params, use_tqdm=False)
                elapsed = time.perf_counter() - start
                assert all(len(r.outputs[0].token_ids) == params.max_tokens for r in results)
                if rep:  # the first repetition warms up
                    times[workload][variant].append(elapsed)
        order = order[1:] + order[:1]

    report = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                          "python": platform.python_version(), "vllm": vllm.__version__},
              "args": vars(args), "workloads": {}}
    for workload, (_, _, tokens) in workloads.items():
        base = times[workload]["ungated"]
        rows = {}
        for variant in VARIANTS:
            ratios = [t / b for t, b in zip(times[workload][variant], base)]
            rows[variant] = {"median_s": statistics.median(times[workload][variant]),
                             "tokens_per_s": tokens / statistics.median(times[workload][variant]),
                             "time_ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                             "flop_ratio": matmul_flops_per_token(variant) / matmul_flops_per_token("ungated")}
        report["workloads"][workload] = rows
    from gated_patch import files

    files.write_json(out, report)
    table = render_table(report)
    print(table)
    if not args.quick:
        update_docs(DOCS, table, ("compiled" if args.compile else "eager") + (
            "-transformers" if args.model_impl != "auto" else ""))


def profile(engines: dict, prompts: list, params) -> None:
    """Each engine's CPU time per operator on one decode batch (after one warm-up batch), and the totals' ratios."""
    import torch

    totals = {}
    for variant, engine in engines.items():
        engine.generate(prompts, params, use_tqdm=False)
        with torch.profiler.profile() as prof:
            engine.generate(prompts, params, use_tqdm=False)
        events = prof.key_averages()
        totals[variant] = sum(event.self_cpu_time_total for event in events)
        print(f"\n{variant}\n{events.table(sort_by='self_cpu_time_total', row_limit=15)}")
    for variant, total in totals.items():
        print(f"{variant}: CPU time {total / 1e6:.3f} s, {total / totals['ungated']:.3f} of ungated")


DOCS = os.path.join(HERE, "..", "docs", "serving.md")


def update_docs(path: str, table: str, mode: str) -> None:
    """Replace the table between the `mode`'s markers in `path` (atomically)."""
    from gated_patch import files

    start_marker, end_marker = f"<!-- vllm-throughput-{mode}:start -->", f"<!-- vllm-throughput-{mode}:end -->"
    text = open(path).read()
    start, end = text.index(start_marker) + len(start_marker), text.index(end_marker)
    files.atomic_write(path, text[:start] + "\n" + table + "\n" + text[end:])


def render_table(report: dict) -> str:
    machine, args = report["machine"], report["args"]
    impl = args.get("model_impl", "auto")
    lines = [f"`.venv-vllm/bin/python benchmarks/vllm_throughput.py{' --compile' if args['compile'] else ''}"
             f"{' --model-impl ' + impl if impl != 'auto' else ''}`: "
             f"{args['requests']} requests per batch, prefill {args['prefill_len']} tokens, decode {args['decode_tokens']} "
             f"tokens, {args['reps']} repetitions, vLLM {machine['vllm']} "
             f"({'torch.compile' if args['compile'] else 'eager'}"
             f"{', Transformers backend' if impl != 'auto' else ''}), float32. Machine: {machine['cpu']}, "
             f"{machine['cores']} cores, CPU only.", "",
             "| workload | variant | tokens/s | time gated / ungated, median [min - max] | matmul FLOP ratio |",
             "|---|---|---:|---:|---:|"]
    for workload, rows in report["workloads"].items():
        for variant, row in rows.items():
            ratio = "1" if variant == "ungated" else \
                f"{row['time_ratio']:.3f} [{row['ratio_min']:.3f} - {row['ratio_max']:.3f}]"
            lines.append(f"| {workload} | {variant} | {row['tokens_per_s']:.0f} | {ratio} | {row['flop_ratio']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
