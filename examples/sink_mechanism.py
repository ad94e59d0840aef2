"""The attention sink, made in minutes, and its removal by the gate: Bigram-Backcopy on a one-layer attention-only
Llama, baseline vs elementwise vs headwise gates (paper init), several seeds, two optimiser settings.

Task (`gated_patch.diagnostics.BigramBackcopy`): BOS, then a character bigram chain from `pydoc_data.topics`; after a
trigger (the three most frequent characters) the next character copies the one before the trigger. Fresh samples
every step. Model: transformers' Llama, 1 layer, 1 head, hidden 128, no MLP (intermediate_size=0), untied
embeddings; the gated variants share every other weight with the baseline of the same seed.

Measured every --eval-every steps on a fixed held-out batch: loss, F-Attn (attention on BOS) over all queries and
split into trigger / other queries, mean gate score at trigger / other queries, and the mean training loss since
the last measurement; at the end also M-Act (`inspect_model`) and the sink-free streaming losses
(`streaming_losses`: a KV cache of --window tokens, without and with position 0 kept).

    python examples/sink_mechanism.py              # defaults: 18 runs on 2 processes; about 11 min on 2 cores
    python examples/sink_mechanism.py --seeds 0 --settings decay --steps 1000   # one seed, one setting, quick
    python examples/sink_mechanism.py --retabulate  # rebuild table.md and the plots from results.json

Writes results.json (every number), table.md, streaming.md, training.png and streaming.png to --output-dir
(default outputs/sink_mechanism).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import gated_patch
from gated_patch.files import atomic_write, read_json
from gated_patch.diagnostics import (
    BigramBackcopy,
    environment,
    inspect_model,
    query_group_stats,
    streaming_losses,
    write_json,
)

VARIANTS = {
    "baseline": None,
    "elementwise": gated_patch.GateConfig(granularity="elementwise", init="paper"),
    "headwise": gated_patch.GateConfig(granularity="headwise", init="paper"),
}
# AdamW settings: strong weight decay (the sink forms and the gate replaces it), and Guo et al.'s.
SETTINGS = {
    "decay": {"lr": 1e-3, "weight_decay": 0.5},
    "guo": {"lr": 3e-4, "weight_decay": 1e-4},
}
BETAS = (0.9, 0.99)
SAMPLE_CHUNK = 50  # steps of training data drawn at once (drawing is a Python loop over positions)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3500)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps, then a constant learning rate")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-batch", type=int, default=64, help="held-out sequences for every measurement")
    p.add_argument("--window", type=int, default=16, help="KV-cache window of the streaming evaluation")
    p.add_argument("--workers", type=int, default=2, help="runs trained in parallel, one process each")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--output-dir", default="outputs/sink_mechanism")
    p.add_argument("--retabulate", action="store_true", help="do not train: rebuild the tables and plots")
    return p.parse_args(argv)


# -- one run ----------------------------------------------------------------------------------------------------


def model_config(task: BigramBackcopy, args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=task.vocab_size, hidden_size=args.hidden, intermediate_size=0, num_hidden_layers=1,
        num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=args.seq_len,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=None, pad_token_id=None,
    )


def build_model(config, variant: str, seed: int):
    """The baseline from `seed`; a gated variant is the same model with the gate added (created after it)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    gate = VARIANTS[variant]
    if gate is None:
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return gated_patch.gated_model_from_config(config, gate, attn_implementation="sdpa")


def measure(model, batch) -> dict:
    groups = {"all": torch.ones_like(batch.trigger_mask), "trigger": batch.trigger_mask, "other": ~batch.trigger_mask}
    stats = query_group_stats(model, batch.input_ids, groups)
    with torch.no_grad():
        loss = float(model(input_ids=batch.input_ids, labels=batch.input_ids).loss)
    row = {"loss": loss}
    for name, group in stats.items():
        row[f"f_attn_{name}"] = group.first_token_share[0]
        if group.gate_mean is not None and name != "all":
            row[f"gate_{name}"] = group.gate_mean[0]
    return row


def train_run(job: tuple) -> dict:
    variant, setting, seed, args = job
    torch.set_num_threads(args.threads)
    started = time.time()
    task = BigramBackcopy.from_text()
    config = model_config(task, args)
    model = build_model(config, variant, seed)
    if variant != "baseline":  # the comparison is fair only if every non-gate weight equals the baseline's
        baseline = build_model(config, "baseline", seed).state_dict()
        if any(not torch.equal(t, baseline[k]) for k, t in model.state_dict().items() if k in baseline):
            raise RuntimeError(f"{variant} seed {seed}: non-gate weights differ from the baseline's.")
    held_out = task.sample(args.eval_batch, args.seq_len, torch.Generator().manual_seed(10_000 + seed))
    data = torch.Generator().manual_seed(seed)  # the same training batches for every variant of a seed
    hyper = SETTINGS[setting]
    optimizer = torch.optim.AdamW(model.parameters(), lr=hyper["lr"], weight_decay=hyper["weight_decay"], betas=BETAS)
    history, interval, chunk = [], [], None  # interval: the training losses since the last measurement
    model.train()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            train_loss = {"train_loss": statistics.mean(interval)} if interval else {}
            history.append({"step": step, **measure(model, held_out), **train_loss})
            interval = []
            model.train()
        if step == args.steps:
            break
        if step % SAMPLE_CHUNK == 0:
            chunk = task.sample(args.batch_size * SAMPLE_CHUNK, args.seq_len, data).input_ids
        ids = chunk[(step % SAMPLE_CHUNK) * args.batch_size :][: args.batch_size]
        for group in optimizer.param_groups:
            group["lr"] = hyper["lr"] * min(1.0, (step + 1) / args.warmup)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        interval.append(loss.item())
    inspection = inspect_model(model, held_out.input_ids.reshape(-1), window=args.seq_len, progress=False)
    streaming = streaming_losses(model, held_out.input_ids, window=args.window, sink_tokens=(1,))
    return {
        "variant": variant, "setting": setting, "seed": seed, "history": history,
        "final": history[-1], "max_abs_activation": inspection.max_activation[0],
        "uniform_first_token_share": inspection.uniform_first_token_share, "streaming": streaming,
        "seconds": time.time() - started,
    }


# -- tables and plots -------------------------------------------------------------------------------------------


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (setting, variant): means over seeds of the final measurements."""
    rows = []
    for setting in dict.fromkeys(r["setting"] for r in runs):
        for variant in dict.fromkeys(r["variant"] for r in runs):
            group = [r for r in runs if r["setting"] == setting and r["variant"] == variant]
            if not group:
                continue
            row = {"setting": setting, "variant": variant, "seeds": [r["seed"] for r in group]}
            for key in ("loss", "f_attn_all", "f_attn_trigger", "f_attn_other", "gate_trigger", "gate_other"):
                if key in group[0]["final"]:
                    row[key] = [r["final"][key] for r in group]
            row["max_abs_activation"] = [r["max_abs_activation"] for r in group]
            for name in group[0]["streaming"]:
                row[f"stream_{name}"] = [r["streaming"][name] for r in group]
            rows.append(row)
    return rows


def targets(rows: list[dict]) -> list[str]:
    """The evidence targets, checked on the numbers: at each setting, is there a baseline sink (mean final F-Attn
    >= 0.3), and does each gated variant have at most half of it?"""
    lines = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        by_variant = {r["variant"]: statistics.mean(r["f_attn_all"]) for r in rows if r["setting"] == setting}
        if "baseline" not in by_variant:
            continue
        base = by_variant["baseline"]
        verdict = "sink forms" if base >= 0.3 else "no sink (baseline F-Attn < 0.3)"
        gated = [f"{v} {f:.3f} ({'<=' if f <= base / 2 else '>'} half)" for v, f in by_variant.items() if v != "baseline"]
        lines.append(f"- {setting}: baseline F-Attn {base:.3f}, {verdict}; " + ", ".join(gated))
    return lines


def markdown_tables(rows: list[dict], settings: dict) -> tuple[str, str]:
    header = ("| setting | model | loss | F-Attn all | F-Attn trigger | F-Attn other | gate trigger | gate other "
              "| M-Act |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        cell = lambda key: _mean_sd(r[key]) if key in r else "-"  # noqa: E731
        lines.append(
            f"| {r['setting']} | {r['variant']} | {cell('loss')} | {cell('f_attn_all')} | {cell('f_attn_trigger')} | "
            f"{cell('f_attn_other')} | {cell('gate_trigger')} | {cell('gate_other')} | {cell('max_abs_activation')} |"
        )
    seeds = len(rows[0]["seeds"])
    note = (
        f"\n\nFinal values after {settings['steps']} steps, mean ± standard deviation over {seeds} seed(s), on "
        f"{settings['eval_batch']} held-out sequences of {settings['seq_len']} tokens. F-Attn: attention on position "
        f"0 (BOS), queries 1..T-1; uniform causal attention would give {settings['uniform_first_token_share']:.3f}. "
        "Trigger queries are those whose next token is a copy. M-Act: max |hidden state| after the layer.\n\n"
        "Targets:\n" + "\n".join(targets(rows))
    )
    names = [k[len("stream_"):] for k in rows[0] if k.startswith("stream_")]
    header = "| setting | model | " + " | ".join(f"loss {n}" for n in names) + " | window - full | window+1 - full |"
    stream = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        deltas = [[w - f for w, f in zip(r[f"stream_{k}"], r["stream_full"])] for k in ("window", "window+1")]
        stream.append(
            f"| {r['setting']} | {r['variant']} | " + " | ".join(_mean_sd(r[f"stream_{n}"]) for n in names) + " | "
            + " | ".join(_mean_sd(d) for d in deltas) + " |"
        )
    stream_note = (
        f"\n\nMean next-token loss (nats) on the held-out targets whose query is at position >= {settings['window']}: "
        f"full causal attention; a KV cache of the last {settings['window']} tokens (position 0 evicted); the same "
        "cache plus position 0 (StreamingLLM's sink token)."
    )
    return "\n".join(lines) + note, "\n".join(stream) + stream_note


def plot(runs: list[dict], out: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in runs))
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    panels = (("f_attn_all", "F-Attn, all queries"), ("f_attn_other", "F-Attn, other queries"), ("f_attn_trigger", "F-Attn, trigger queries"),
              ("gate_other", "gate score, other queries"), ("gate_trigger", "gate score, trigger queries"),
              ("loss", "held-out loss (after step 0)"))
    fig, axes = plt.subplots(len(settings), len(panels), figsize=(4 * len(panels), 3.3 * len(settings)), squeeze=False)
    for row, setting in zip(axes, settings):
        for ax, (key, title) in zip(row, panels):
            for i, variant in enumerate(variants):
                for j, run in enumerate(r for r in runs if r["setting"] == setting and r["variant"] == variant):
                    points = [(h["step"], h[key]) for h in run["history"] if key in h and (key != "loss" or h["step"])]
                    if points:
                        ax.plot(*zip(*points), color=f"C{i}", alpha=0.8, lw=1.2, label=variant if j == 0 else None)
            hyper = SETTINGS[setting]
            ax.set(title=f"{title}\n{setting}: lr {hyper['lr']:g}, wd {hyper['weight_decay']:g}", xlabel="step",
                   ylabel="nats" if key == "loss" else None)
            if key.startswith(("f_attn", "gate")):
                ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out / "training.png", plt, io)

    rows = summarise(runs)
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 3.6), squeeze=False)
    names = [k[len("stream_"):] for k in rows[0] if k.startswith("stream_")]
    for ax, setting in zip(axes[0], settings):
        group = [r for r in rows if r["setting"] == setting]
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            means = [statistics.mean(r[f"stream_{name}"]) for r in group]
            ax.bar([i + k * width for i in range(len(group))], means, width, label=name, color=f"C{k}")
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(group))], [r["variant"] for r in group])
        ax.set(title=f"streaming loss, {setting}", ylabel="loss (nats)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out / "streaming.png", plt, io)


def _save(fig, path: Path, plt, io) -> None:
    image = io.BytesIO()
    fig.savefig(image, dpi=100, format="png")
    plt.close(fig)
    atomic_write(path, image.getvalue())


def write_reports(data: dict, out: Path) -> str:
    rows = summarise(data["runs"])
    table, stream = markdown_tables(rows, data["settings"])
    atomic_write(out / "table.md", table + "\n")
    atomic_write(out / "streaming.md", stream + "\n")
    plot(data["runs"], out)
    return table + "\n\n" + stream


# -- main -------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.output_dir)
    if args.retabulate:
        print(write_reports(read_json(out / "results.json", missing="run the example without --retabulate first"), out))
        return 0
    if args.steps < 1 or args.eval_every < 1 or args.warmup < 1:
        raise SystemExit("error: --steps, --eval-every and --warmup must be at least 1.")
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    jobs = [(v, s, seed, args) for s in args.settings for seed in args.seeds for v in args.variants]
    print(f"{len(jobs)} runs of {args.steps} steps ({args.batch_size} x {args.seq_len} tokens) on {args.workers} "
          f"process(es)", flush=True)
    if args.workers > 1:
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            runs = list(tqdm(pool.imap(train_run, jobs), total=len(jobs), desc="runs"))
    else:
        runs = [train_run(job) for job in tqdm(jobs, desc="runs")]
    for r in runs:
        f = r["final"]
        print(f"  {r['setting']:>5} {r['variant']:>11} seed {r['seed']}: loss {f['loss']:.3f}, F-Attn {f['f_attn_all']:.3f} "
              f"(trigger {f['f_attn_trigger']:.3f}, other {f['f_attn_other']:.3f}), {r['seconds']:.0f}s")
    settings = {k: v for k, v in vars(args).items() if k != "retabulate"}
    settings.update(
        command=" ".join(["python", "examples/sink_mechanism.py", *(sys.argv[1:] if argv is None else argv)]),
        total_seconds=time.time() - started, uniform_first_token_share=runs[0]["uniform_first_token_share"],
        optimiser={name: {**SETTINGS[name], "betas": BETAS} for name in args.settings}, environment=environment(),
        parameters=sum(p.numel() for p in build_model(model_config(BigramBackcopy.from_text(), args), "baseline", 0).parameters()),
    )
    data = {"settings": settings, "runs": runs}
    write_json(out / "results.json", data)
    print(write_reports(data, out))
    print(f"\ntotal {settings['total_seconds']:.0f}s; wrote {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
