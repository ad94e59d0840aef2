"""Retrofit evidence: do attention sinks (F-Attn) or massive activations (M-Act) of a pretrained model move when
identity-initialised gates are added and only the gates are fine-tuned?

1. measures SmolLM2-135M-Instruct (or ``--model DIR``) as loaded (sdpa attention);
2. fine-tunes only the gates with ``examples/finetune_gates.py --mode gates`` (Trainer, PEFT gate-only adapter,
   pydoc_data.topics, split by topic) and saves the adapter;
3. loads a fresh base model, puts the adapter on it with ``gated_patch.adapters.load_gated_adapter`` and measures
   it again on the same text; the identity-patched model before training is measured too (it must equal step 1).

    python examples/retrofit_diagnostics.py      # 100 gate-only steps; 25 min measured on 2 busy shared CPU cores
    python examples/retrofit_diagnostics.py --steps 400 --lr 3e-3 --granularity headwise

Writes results.json, table.txt and inspect.png to --output-dir (default outputs/retrofit).
The paper (arXiv 2505.06708, App. A.7) reports that adding gates during continued training did not remove sinks.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

import gated_patch
from gated_patch.diagnostics import (
    default_text,
    format_layer_table,
    format_summary_table,
    inspect_model,
    plot_inspections,
    tokenize_for_inspection,
    write_json,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="local checkpoint (default: the packaged SmolLM2-135M-Instruct)")
    p.add_argument("--granularity", choices=("elementwise", "headwise"), default="elementwise")
    p.add_argument("--steps", type=int, default=100, help="gate-only optimizer steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seq-len", type=int, default=128, help="training sequence length")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=1024, help="tokens of the inspection text")
    p.add_argument("--window", type=int, default=512, help="inspection window")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core box)")
    p.add_argument("--output-dir", default="outputs/retrofit")
    return p.parse_args(argv)


def _finetune_module():
    path = Path(__file__).with_name("finetune_gates.py")
    spec = importlib.util.spec_from_file_location("finetune_gates", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gated_patch.adapters import load_gated_adapter
    from gated_patch.default_model import default_model_dir

    path = args.model or str(default_model_dir())
    out = Path(args.output_dir)
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokens = tokenize_for_inspection(tokenizer, default_text(), args.max_tokens)
    load = lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731

    base = load()
    original = inspect_model(base, tokens, window=args.window, label="original")
    identity = inspect_model(
        gated_patch.patch_model(copy.deepcopy(base), gated_patch.GateConfig(granularity=args.granularity)),
        tokens, window=args.window, label="identity gates (step 0)",
    )
    del base

    with tempfile.TemporaryDirectory(prefix="retrofit-adapter-") as adapter_dir:
        training = _finetune_module().main([
            "--model", path, "--mode", "gates", "--granularity", args.granularity, "--steps", str(args.steps),
            "--lr", str(args.lr), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
            "--output-dir", adapter_dir,
        ])  # fmt: skip
        torch.set_num_threads(args.threads)
        tuned_model = load_gated_adapter(load(), adapter_dir)
        tuned = inspect_model(tuned_model, tokens, window=args.window, label=f"gate-only fine-tune ({args.steps} steps)")

    results = [original, identity, tuned]
    extra = {
        original.label: {"held-out PPL": training["ppl_before"]},
        identity.label: {"held-out PPL": training["ppl_before"]},
        tuned.label: {"held-out PPL": training["ppl_after"]},
    }
    print(format_layer_table(tuned))
    table = format_summary_table(results, extra)
    f_before, f_after = original.first_token_share_mean, tuned.first_token_share_mean
    m_before, m_after = original.max_activation[0], tuned.max_activation[0]
    verdict = (
        f"F-Attn (mean over layers) {f_before:.3f} -> {f_after:.3f} ({100 * (f_after - f_before) / f_before:+.1f}%); "
        f"M-Act (max) {m_before:.1f} -> {m_after:.1f} ({100 * (m_after - m_before) / m_before:+.1f}%); "
        f"held-out PPL {training['ppl_before']:.3f} -> {training['ppl_after']:.3f}"
    )
    print(f"\n{table}\n\n{verdict}")
    settings = {**vars(args), "model": path, "seconds": time.time() - started, "text_tokens": len(tokens),
                "command": " ".join(["python", "examples/retrofit_diagnostics.py", *(sys.argv[1:] if argv is None else argv)])}
    write_json(out / "results.json", {"settings": settings, "training": training, "verdict": verdict,
                                      "models": [r.to_dict() for r in results]})
    tmp = out / ".table.txt.tmp"
    tmp.write_text(f"{table}\n\n{verdict}\n")
    tmp.replace(out / "table.txt")
    plot_inspections(results, out / "inspect.png", title=f"retrofit: {Path(path).name}, gate-only fine-tune")
    print(f"wrote {out}/ in {settings['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
