"""Pretrain a tiny Llama-style model from scratch three times -- baseline, elementwise-gated, headwise-gated (paper
init) -- with identical data, seed, steps and learning rate, at a base and a higher learning rate; then measure
attention sinks (F-Attn), massive activations (M-Act) and gate scores on held-out text and write a comparison in
the form of the paper's Table 4.

Data: the Python reference prose in `pydoc_data.topics`, tokenized with the SmolLM2 tokenizer; token ids are
remapped to the ids that occur in the corpus (about 5.3k) so the embedding does not dominate a tiny model. Every
10th topic (sorted by name) is held out. All variants see exactly the same batches and start from the same
non-gate weights (the gate is created after the base model, from the same seed).

    python examples/pretrain_tiny.py     # defaults: est. ~7 min on 2 idle CPU cores (20 min measured under heavy shared load)
    python examples/pretrain_tiny.py --steps 5000 --d-model 512 --layers 8 --heads 8 --device cuda

Outputs (in --output-dir, default outputs/pretrain_tiny): results.json (every number, loss curves included),
table.md (the comparison table), loss_curves.png, metrics.png and inspect_lr*.png (per-layer curves).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import gated_patch
from gated_patch.diagnostics import format_summary_table, inspect_model, plot_inspections, write_json

VARIANTS = {
    "baseline": None,
    "elementwise": gated_patch.GateConfig(granularity="elementwise", init="paper"),
    "headwise": gated_patch.GateConfig(granularity="headwise", init="paper"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3, help="base peak learning rate")
    p.add_argument(
        "--high-lr", type=float, default=1.5e-2,
        help="the higher peak learning rate run as a second setting (0 to skip)",
    )
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of steps with linear warmup")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens for the loss")
    p.add_argument("--inspect-tokens", type=int, default=2048, help="held-out tokens for the instruments")
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: on a shared 2-core machine, 2 threads ran 6x slower than 1)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--output-dir", default="outputs/pretrain_tiny")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the SmolLM2 cache)")
    p.add_argument(
        "--retabulate", action="store_true",
        help="do not train: rebuild table.md and the training plots from --output-dir/results.json",
    )
    return p.parse_args(argv)


# -- data -------------------------------------------------------------------------------------------------------


def load_corpus(tokenizer_dir=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(train ids, held-out ids, vocab size) with ids remapped to the tokens that occur in the corpus."""
    from pydoc_data.topics import topics
    from transformers import AutoTokenizer

    from gated_patch.default_model import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or default_model_dir())
    separator = tokenizer.eos_token_id
    train, held_out = [], []
    for index, key in enumerate(sorted(topics)):
        ids = tokenizer(topics[key], add_special_tokens=False)["input_ids"] + [separator]
        (held_out if index % 10 == 9 else train).extend(ids)
    used = sorted(set(train) | set(held_out))
    remap = {token: i for i, token in enumerate(used)}
    as_tensor = lambda ids: torch.tensor([remap[t] for t in ids], dtype=torch.long)  # noqa: E731
    return as_tensor(train), as_tensor(held_out), len(used)


def batch_offsets(num_tokens: int, steps: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """Random window starts for every step, fixed by `seed`: every variant sees the same batches."""
    generator = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, num_tokens - seq_len - 1, (steps, batch_size), generator=generator)


def windows(ids: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    return torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()])


# -- model and training -----------------------------------------------------------------------------------------


def model_config(args, vocab_size: int):
    from transformers import LlamaConfig

    intermediate = int(round(8 / 3 * args.d_model / 32)) * 32
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.d_model,
        intermediate_size=intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        initializer_range=0.02,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def build_model(config, gate, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if gate is None:
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return gated_patch.gated_model_from_config(config, gate, attn_implementation="sdpa")


def learning_rate(step: int, steps: int, peak: float, warmup: float) -> float:
    warm = max(1, int(warmup * steps))
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def held_out_loss(model, ids: torch.Tensor, seq_len: int, max_tokens: int, device) -> float:
    model.eval()
    ids = ids[: max_tokens + 1]
    total, count = 0.0, 0
    for start in range(0, len(ids) - seq_len - 1, seq_len):
        chunk = ids[start : start + seq_len + 1].unsqueeze(0).to(device)
        logits = model(input_ids=chunk[:, :-1]).logits
        total += torch.nn.functional.cross_entropy(logits[0].float(), chunk[0, 1:], reduction="sum").item()
        count += seq_len
    return total / count


def train_one(name, gate, config, args, lr, train_ids, offsets, device) -> tuple:
    model = build_model(config, gate, args.seed).to(device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), eps=1e-8,
    )
    losses, grad_norms = [], []
    progress = tqdm(range(args.steps), desc=f"{name} lr={lr:g}", leave=False)
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, lr, args.warmup)
        batch = windows(train_ids, offsets[step], args.seq_len).to(device)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = args.grad_clip if args.grad_clip > 0 else float("inf")
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0:
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
    return model.eval(), losses, grad_norms


def loss_spikes(losses: list[float], window: int = 10, threshold: float = 0.2) -> int:
    """Loss spikes: excursions of the `window`-step moving average of the training loss more than `threshold` nats
    above its running minimum (each excursion counted once; the first 10% of steps, warmup, are skipped)."""
    smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(losses))]
    start = max(window, len(losses) // 10)
    if start >= len(smooth):
        return 0
    best, spikes, inside = min(smooth[:start]), 0, False
    for value in smooth[start:]:
        above = value > best + threshold
        spikes += above and not inside
        inside = above
        best = min(best, value)
    return spikes


# -- reporting --------------------------------------------------------------------------------------------------


def markdown_table(rows: list[dict]) -> str:
    header = ("| lr | model | F-Attn mean | F-Attn max (layer) | M-Act max (layer) | mean gate | gate < 0.1 "
              "| final train loss | held-out loss | held-out PPL | loss spikes |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        gate = "-" if r["gate_mean"] is None else f"{r['gate_mean']:.3f}"
        below = "-" if r["gate_fraction_below_0.1"] is None else f"{r['gate_fraction_below_0.1']:.3f}"
        lines.append(
            f"| {r['lr']:g} | {r['variant']} | {r['first_token_share_mean']:.3f} | "
            f"{r['first_token_share_max']:.3f} ({r['first_token_share_max_layer']}) | "
            f"{r['max_abs_activation']:.1f} ({r['max_abs_activation_layer']}) | {gate} | {below} | "
            f"{r['final_train_loss']:.3f} | {r['held_out_loss']:.3f} | {math.exp(r['held_out_loss']):.1f} | "
            f"{r['loss_spikes']} |"
        )
    return "\n".join(lines)


def plot_training(runs: list[dict], rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = sorted({r["lr"] for r in runs})
    fig, axes = plt.subplots(1, len(lrs), figsize=(6 * len(lrs), 4), squeeze=False)
    for ax, lr in zip(axes[0], lrs):
        for i, run in enumerate(r for r in runs if r["lr"] == lr):
            losses = run["train_losses"]
            k = max(1, len(losses) // 50)
            smooth = [sum(losses[max(0, j - k + 1) : j + 1]) / len(losses[max(0, j - k + 1) : j + 1]) for j in range(len(losses))]
            ax.plot(losses, color=f"C{i}", alpha=0.25, lw=0.8)
            ax.plot(smooth, color=f"C{i}", label=f"{run['variant']} (held-out {run['held_out_loss']:.3f})")
        ax.set(title=f"training loss, peak lr {lr:g}", xlabel="step", ylabel="cross-entropy (nats)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save(fig, path / "loss_curves.png")

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    labels = [f"{r['variant']}\nlr {r['lr']:g}" for r in rows]
    colors = [f"C{list(VARIANTS).index(r['variant'])}" for r in rows]
    for ax, key, title in zip(
        axes,
        ("first_token_share_mean", "max_abs_activation", "held_out_loss"),
        ("F-Attn (mean over layers)", "M-Act (max over layers)", "held-out loss"),
    ):
        ax.bar(range(len(rows)), [r[key] for r in rows], color=colors)
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    _save(fig, path / "metrics.png")


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)


def retabulate(out: Path) -> int:
    data = json.loads((out / "results.json").read_text())
    rows, runs = data["table"], data["runs"]
    for row, run in zip(rows, runs):
        row["loss_spikes"] = loss_spikes(run["train_losses"])
    uniform = runs[0]["inspection"]["uniform_first_token_share"]
    table = markdown_table(rows) + table_note(data["settings"]["seq_len"], uniform)
    write_json(out / "results.json", data)
    _write_text(out / "table.md", table + "\n")
    plot_training(runs, rows, out)
    print(table)
    return 0


def table_note(seq_len: int, uniform: float) -> str:
    return (
        f"\n\nF-Attn excludes query position 0; uniform causal attention over the same {seq_len}-token windows would "
        f"give F-Attn {uniform:.4f}. M-Act: max |output hidden state| of any decoder layer. Loss spikes: times the "
        "10-step moving average of the training loss rose > 0.2 nats above its running minimum (after the first "
        "10% of steps)."
    )


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.retabulate:
        return retabulate(Path(args.output_dir))
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    train_ids, held_ids, vocab = load_corpus(args.tokenizer)
    if len(train_ids) <= args.seq_len + 1 or len(held_ids) <= args.seq_len + 1:
        raise SystemExit(f"error: corpus too small for --seq-len {args.seq_len}.")
    config = model_config(args, vocab)
    offsets = batch_offsets(len(train_ids), args.steps, args.batch_size, args.seq_len, args.seed)
    inspect_ids = held_ids[: args.inspect_tokens]
    lrs = [args.lr] + ([args.high_lr] if args.high_lr > 0 else [])
    print(
        f"corpus: {len(train_ids):,} train / {len(held_ids):,} held-out tokens, vocab {vocab}; model d={args.d_model} "
        f"L={args.layers} H={args.heads} seq={args.seq_len} batch={args.batch_size} steps={args.steps} "
        f"({args.steps * args.batch_size * args.seq_len:,} tokens, {args.steps * args.batch_size * args.seq_len / len(train_ids):.1f} epochs); lrs {lrs}"
    )

    runs, rows, inspections = [], [], {}
    for lr in lrs:
        for name in args.variants:
            t0 = time.time()
            model, losses, grad_norms = train_one(name, VARIANTS[name], config, args, lr, train_ids, offsets, device)
            held = held_out_loss(model, held_ids, args.seq_len, args.eval_tokens, device)
            result = inspect_model(model, inspect_ids, window=args.seq_len, batch_size=8, label=name, progress=False)
            inspections.setdefault(lr, []).append(result)
            tail = losses[-max(1, len(losses) // 10) :]
            row = {
                "lr": lr,
                "variant": name,
                **result.summary(),
                "final_train_loss": sum(tail) / len(tail),
                "held_out_loss": held,
                "loss_spikes": loss_spikes(losses),
                "max_grad_norm": max(grad_norms),
                "seconds": time.time() - t0,
            }
            rows.append(row)
            runs.append({"lr": lr, "variant": name, "train_losses": losses, "grad_norms": grad_norms,
                         "held_out_loss": held, "inspection": result.to_dict()})
            print(
                f"  {name:>11} lr={lr:g}: train {row['final_train_loss']:.3f}, held-out {held:.3f}, "
                f"F-Attn {row['first_token_share_mean']:.3f}, M-Act {row['max_abs_activation']:.1f}, "
                f"gate {row['gate_mean'] if row['gate_mean'] is not None else '-'}, {row['seconds']:.0f}s",
                flush=True,
            )
            del model

    uniform = inspections[lrs[0]][0].uniform_first_token_share
    table = markdown_table(rows) + table_note(args.seq_len, uniform)
    for lr, results in inspections.items():
        print(f"\npeak lr {lr:g}:")
        print(format_summary_table(results, {r["variant"]: {"held-out loss": r["held_out_loss"]} for r in rows if r["lr"] == lr}))
        plot_inspections(results, out / f"inspect_lr{lr:g}.png", title=f"tiny Llama from scratch, peak lr {lr:g}")
    print("\n" + table)
    settings = {k: v for k, v in vars(args).items()}
    settings.update(vocab_size=vocab, train_tokens=len(train_ids), held_out_tokens=len(held_ids),
                    parameters=sum(p.numel() for p in build_model(config, None, args.seed).parameters()),
                    command=" ".join(["python", "examples/pretrain_tiny.py", *(sys.argv[1:] if argv is None else argv)]),
                    total_seconds=time.time() - started, torch_threads=torch.get_num_threads())
    write_json(out / "results.json", {"settings": settings, "table": rows, "runs": runs})
    _write_text(out / "table.md", table + "\n")
    plot_training(runs, rows, out)
    print(f"\n{settings['parameters']:,} parameters (baseline); total {settings['total_seconds']:.0f}s; wrote {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
