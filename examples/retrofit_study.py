"""Retrofit study: do identity-initialised gates added to a pretrained model move, and do they remove its attention
sink, under gate-only or gates+full continued training with a larger gate learning rate?

SmolLM2-135M-Instruct (or ``--model DIR``) continues training on Python's reference prose (`pydoc_data.topics`,
split by topic; every run sees the same batches). Runs: for each mode (``gates``: only the gates train;
``gates+full``: every weight trains) and each gate learning-rate multiplier (gate lr = --lr x multiplier, no weight
decay on the gates, `gated_patch.gate_param_groups`), plus a control (``full``: continued training without gates).
Each trained model, the original and the original with identity gates (step 0 of every gated run) are measured on held-out text: perplexity, F-Attn, M-Act, gate scores, how
far the gates moved from identity (RMS of the gate weights, which start at 0; the mean |1 - gate score| over every
score), and the
sink-free streaming losses (`streaming_losses`).

    python examples/retrofit_study.py                 # defaults: 7 runs of 30 steps; about 12 min on 2 cores
    python examples/retrofit_study.py --steps 200 --multipliers 1 30 --modes gates
    python examples/retrofit_study.py --retabulate     # rebuild table.md and the plot from results.json

Writes results.json, table.md and retrofit.png to --output-dir (default outputs/retrofit_study). The paper
(arXiv 2505.06708, App. A.7) reports that gates added during continued training did not remove sinks.
"""

from __future__ import annotations

import argparse
import io
import math
import random
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import gated_patch
from gated_patch.files import atomic_write, read_json
from gated_patch.core.gate import GATE_MODULE_NAME
from gated_patch.core.hooks import is_gated_attention
from gated_patch.core.gate import gate_scores
from gated_patch.diagnostics import environment, inspect_model, streaming_losses, token_windows, write_json

MODES = ("gates", "gates+full")
HELD_OUT_FRACTION = 0.1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local checkpoint (default: the packaged SmolLM2-135M-Instruct)")
    p.add_argument("--granularity", choices=("elementwise", "headwise"), default="elementwise")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--multipliers", type=float, nargs="+", default=[1.0, 10.0, 30.0], help="gate lr / --lr")
    p.add_argument("--no-control", action="store_true", help="skip the continued-training run without gates")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of the non-gate weights (and the gates x1)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="weight decay of the non-gate weights")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens for perplexity")
    p.add_argument("--inspect-tokens", type=int, default=1024, help="held-out tokens for F-Attn / M-Act / gates")
    p.add_argument("--inspect-window", type=int, default=512)
    p.add_argument("--stream-window", type=int, default=64, help="KV-cache window of the streaming evaluation")
    p.add_argument("--stream-seq-len", type=int, default=512, help="two held-out sequences of this length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output-dir", default="outputs/retrofit_study")
    p.add_argument("--retabulate", action="store_true", help="do not train: rebuild the table and the plot")
    return p.parse_args(argv)


def load_corpus(tokenizer, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and held-out token streams, split by topic."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    random.Random(seed).shuffle(names)
    held_out = set(names[: max(1, round(len(names) * HELD_OUT_FRACTION))])
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    streams = {True: [], False: []}
    for name in sorted(topics):
        streams[name in held_out].extend(tokenizer(topics[name], add_special_tokens=False)["input_ids"] + eos)
    return torch.tensor(streams[False]), torch.tensor(streams[True])


def blocks(ids: torch.Tensor, length: int, limit: int) -> torch.Tensor:
    usable = min(len(ids), limit) // length * length
    if usable == 0:
        raise SystemExit(f"error: the held-out text has {len(ids)} tokens, fewer than one block of {length}.")
    return ids[:usable].view(-1, length)


@torch.no_grad()
def perplexity(model, held: torch.Tensor, seq_len: int, limit: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for block in blocks(held, seq_len, limit).split(4):
        logits = model(input_ids=block).logits.float()
        total += float(torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), block[:, 1:], reduction="sum"))
        count += block[:, 1:].numel()
    return math.exp(total / count)


def gate_movement(model) -> dict:
    """RMS of every gate weight (0 at identity init), and the largest |bias| (0 at identity init, too)."""
    weights = [p.detach().float() for n, p in gated_patch.gate_parameters(model) if n.endswith("weight")]
    biases = [p.detach().float() for n, p in gated_patch.gate_parameters(model) if n.endswith("bias")]
    squares = sum(float((w ** 2).sum()) for w in weights)
    return {"gate_weight_rms": math.sqrt(squares / sum(w.numel() for w in weights)),
            "gate_bias_max_abs": max((float(b.abs().max()) for b in biases), default=0.0)}


@torch.no_grad()
def gate_distance(model, tokens: torch.Tensor, window: int) -> float:
    """Mean |1 - gate score| over every score of every gated layer on `tokens` (in windows of `window`): how far the
    gates are from identity, as the model uses them."""
    total, count, handles = 0.0, 0, []

    def hook(attention):
        def accumulate(module, args, output):
            nonlocal total, count
            distance = (1.0 - gate_scores(output.float(), attention.gate_config)).abs()
            total, count = total + float(distance.sum()), count + distance.numel()
        return accumulate

    for module in model.modules():
        if is_gated_attention(module):
            handles.append(getattr(module, GATE_MODULE_NAME).register_forward_hook(hook(module)))
    try:
        model.eval()
        for ids in token_windows(tokens.tolist(), window):
            model(input_ids=torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    return total / count


def measure(model, args, held: torch.Tensor) -> dict:
    inspection = inspect_model(model, held[: args.inspect_tokens], window=args.inspect_window, progress=False)
    summary = inspection.summary()
    row = {
        "ppl": perplexity(model, held, args.seq_len, args.eval_tokens),
        "f_attn": summary["first_token_share_mean"],
        "m_act": summary["max_abs_activation"],
        "gate_mean": summary["gate_mean"],
        "gate_below_0.1": summary["gate_fraction_below_0.1"],
        "uniform_f_attn": summary["uniform_first_token_share"],
        "streaming": streaming_losses(model, blocks(held, args.stream_seq_len, 2 * args.stream_seq_len),
                                      window=args.stream_window, sink_tokens=(1, 4)),
    }
    if gated_patch.is_patched(model):
        row.update(gate_movement(model))
        row["gate_distance"] = gate_distance(model, held[: args.inspect_tokens], args.inspect_window)
    return row


def train(model, args, train_ids: torch.Tensor, gate_lr) -> list[float]:
    if gate_lr is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    else:
        groups = gated_patch.gate_param_groups(model, lr=args.lr, gate_lr=gate_lr, weight_decay=args.weight_decay)
        optimizer = torch.optim.AdamW(groups)
    generator = torch.Generator().manual_seed(args.seed)  # the same batches for every run
    starts = torch.randint(0, len(train_ids) - args.seq_len, (args.steps, args.batch_size), generator=generator)
    model.train()
    losses = []
    for step in tqdm(range(args.steps), desc="train", leave=False):
        batch = torch.stack([train_ids[s : s + args.seq_len] for s in starts[step].tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return losses


def runs_to_do(args) -> list[tuple[str, float]]:
    runs = [(mode, multiplier) for mode in args.modes for multiplier in args.multipliers]
    return runs + ([] if args.no_control else [("full", None)])


def table(data: dict) -> str:
    header = ("| run | gate lr | held-out PPL | F-Attn | M-Act | gate mean | gate < 0.1 | mean abs(1 - gate) "
              "| gate weight RMS | stream: window - full | window+1 - full | window+4 - full |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in data["rows"]:
        s = r["streaming"]
        gate = lambda key, spec: "-" if r.get(key) is None else format(r[key], spec)  # noqa: E731
        lines.append(
            f"| {r['run']} | {gate('gate_lr', 'g')} | {r['ppl']:.3f} | {r['f_attn']:.3f} | {r['m_act']:.1f} | "
            f"{gate('gate_mean', '.4f')} | {gate('gate_below_0.1', '.4f')} | {gate('gate_distance', '.4f')} | "
            f"{gate('gate_weight_rms', '.2e')} | {s['window'] - s['full']:+.3f} | {s['window+1'] - s['full']:+.3f} | "
            f"{s['window+4'] - s['full']:+.3f} |"
        )
    a = data["settings"]
    lines.append(
        f"\n{Path(a['model']).name}, {a['granularity']} gates (identity init), {a['steps']} steps of "
        f"{a['batch_size']} x {a['seq_len']} tokens, AdamW, lr {a['lr']:g} (weight decay {a['weight_decay']:g}; gates: "
        "no decay). PPL on held-out topics; F-Attn (mean over layers; uniform attention would give "
        f"{data['rows'][0]['uniform_f_attn']:.3f}) and M-Act on {a['inspect_tokens']} held-out tokens in windows of "
        f"{a['inspect_window']}; mean abs(1 - gate) over every gate score there. Streaming: mean loss change on the "
        f"targets whose query is at position >= {a['stream_window']} when "
        f"a KV cache keeps only the last {a['stream_window']} tokens, and when it keeps the first 1 or 4 tokens too."
    )
    return "\n".join(lines)


def plot(data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    labels = [r["run"] if r.get("multiplier") is None else f"{r['run']} x{r['multiplier']:g}" for r in rows]
    panels = (("F-Attn (mean over layers)", lambda r: r["f_attn"]), ("M-Act (max over layers)", lambda r: r["m_act"]),
              ("held-out perplexity", lambda r: r["ppl"]), ("mean |1 - gate score|", lambda r: r.get("gate_distance") or 0.0),
              ("streaming: loss change without position 0", lambda r: r["streaming"]["window"] - r["streaming"]["full"]))
    colors = [f"C{MODES.index(r['run']) + 1}" if r["run"] in MODES else "C0" for r in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.2))
    for ax, (title, value) in zip(axes, panels):
        ax.bar(range(len(rows)), [value(r) for r in rows], color=colors)
        ax.set_xticks(range(len(rows)), labels, fontsize=7, rotation=60, ha="right")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"retrofit: {Path(data['settings']['model']).name}, {data['settings']['steps']} steps")
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, dpi=100, format="png")
    plt.close(fig)
    atomic_write(out / "retrofit.png", image.getvalue())


def write_reports(data: dict, out: Path) -> str:
    text = table(data)
    atomic_write(out / "table.md", text + "\n")
    plot(data, out)
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.output_dir)
    if args.retabulate:
        print(write_reports(read_json(out / "results.json", missing="run the example without --retabulate first"), out))
        return 0
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gated_patch.default_model import default_model_dir

    path = args.model or str(default_model_dir())
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    train_ids, held = load_corpus(AutoTokenizer.from_pretrained(path), args.seed)
    load = lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")  # noqa: E731
    gate = gated_patch.GateConfig(granularity=args.granularity)  # identity init: step 0 is the original model

    rows = [{"run": "original", **measure(load(), args, held)},
            {"run": "identity", **measure(gated_patch.patch_model(load(), gate), args, held)}]  # must equal original
    print(f"original: PPL {rows[0]['ppl']:.3f}, F-Attn {rows[0]['f_attn']:.3f}, M-Act {rows[0]['m_act']:.1f}", flush=True)
    for mode, multiplier in tqdm(runs_to_do(args), desc="runs"):
        model = load()
        gate_lr = None if multiplier is None else args.lr * multiplier
        if mode in MODES:
            gated_patch.patch_model(model, gate)
        if mode == "gates":
            gate_names = {name for name, _ in gated_patch.gate_parameters(model)}
            for name, parameter in model.named_parameters():
                parameter.requires_grad_(name in gate_names)
        trained = time.time()
        losses = train(model, args, train_ids, gate_lr)
        trained = time.time() - trained
        row = {"run": mode, "multiplier": multiplier, "gate_lr": gate_lr, **measure(model, args, held),
               "train_losses": losses, "train_seconds_per_step": trained / args.steps}
        rows.append(row)
        print(f"{mode} x{multiplier}: PPL {row['ppl']:.3f}, F-Attn {row['f_attn']:.3f}, M-Act {row['m_act']:.1f}, "
              f"gate {row.get('gate_mean')}", flush=True)
        del model
    settings = {k: v for k, v in vars(args).items() if k != "retabulate"}
    settings.update(model=path, seconds=time.time() - started, train_tokens=len(train_ids), held_out_tokens=len(held),
                    environment=environment(),
                    command=" ".join(["python", "examples/retrofit_study.py", *(sys.argv[1:] if argv is None else argv)]))
    data = {"settings": settings, "rows": rows}
    write_json(out / "results.json", data)
    print(write_reports(data, out))
    print(f"\ntotal {settings['seconds']:.0f}s; wrote {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
