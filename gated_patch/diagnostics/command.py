"""``gated-patch inspect``: measure F-Attn, M-Act and gate statistics of one or more models on a text."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..arguments import add_gate_config_arguments, gate_config_from_args
from ..default_model import default_model_dir
from ..patching import patch_model
from .measure import default_text, inspect_model, tokenize_for_inspection
from ..files import write_json
from .report import format_layer_table, format_summary_table, plot_inspections

DEFAULT_OUTPUT_DIR = "outputs/inspect"


def add_inspect_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "inspect",
        help="measure attention sinks (F-Attn), massive activations (M-Act) and gate statistics per layer",
        description=(
            "Per decoder layer: first-token attention share (F-Attn; query position 0 excluded), max |hidden state| "
            "(M-Act) and, for gated models, gate-score statistics and mean |attention output| before/after the "
            "gate. Prints tables, writes inspect.json (every number) and inspect.png (per-layer curves)."
        ),
    )
    parser.add_argument(
        "--model", action="append", default=None,
        help="local checkpoint directory; repeat to compare models on the same axes (default: SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--label", action="append", default=None, help="display name per --model (same order)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the first model's)")
    parser.add_argument("--text-file", default=None, help="UTF-8 text to run on (default: a slice of pydoc_data.topics)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="tokens of the text to use (default 1024)")
    parser.add_argument("--window", type=int, default=512, help="tokens per window; each window starts at position 0")
    parser.add_argument("--batch-size", type=int, default=2, help="windows per forward pass")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help=f"where to write JSON and PNG ({DEFAULT_OUTPUT_DIR})")
    parser.add_argument(
        "--patch", action="store_true",
        help="also inspect a copy of each model patched with the gate options below (e.g. to see an identity gate)",
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (default: torch's choice; 1 is much faster on a CPU shared with other jobs)",
    )
    add_gate_config_arguments(parser)
    parser.set_defaults(handler=run_inspect)
    return parser


def _load(path: str, dtype: str):
    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()


def run_inspect(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = args.model or [str(default_model_dir())]
    labels = args.label or []
    if len(labels) > len(paths):
        raise SystemExit(f"error: {len(labels)} --label values for {len(paths)} models; give at most one per --model.")
    labels = labels + [Path(p).name or p for p in paths[len(labels):]]
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or paths[0])
    text = Path(args.text_file).read_text(encoding="utf-8") if args.text_file else default_text()
    tokens = tokenize_for_inspection(tokenizer, text, args.max_tokens)
    print(f"text: {args.text_file or 'pydoc_data.topics (slice)'}, {len(tokens)} tokens, windows of {args.window}")

    results = []
    for path, label in zip(paths, labels):
        model = _load(path, args.dtype)
        results.append(inspect_model(model, tokens, window=args.window, batch_size=args.batch_size, label=label))
        if args.patch:
            gate = gate_config_from_args(args)
            patched = patch_model(copy.deepcopy(model), gate)
            results.append(
                inspect_model(patched, tokens, window=args.window, batch_size=args.batch_size,
                              label=f"{label}+gate({gate.granularity},{gate.init})")
            )
        del model

    for result in results:
        print(format_layer_table(result))
    print(format_summary_table(results))
    out = Path(args.output_dir)
    json_path = write_json(out / "inspect.json", {"text_tokens": len(tokens), "models": [r.to_dict() for r in results]})
    png_path = plot_inspections(results, out / "inspect.png")
    print(f"wrote {json_path} and {png_path}")
    return 0
