"""Command line: ``gated-patch demo`` (the main job on the embedded default model)."""

from __future__ import annotations

import argparse
import sys

from .core.config import ACTIVATIONS, GATE_INPUTS, GRANULARITIES, INITS, GateConfig

DEFAULT_PROMPT = "The Python language reference describes"


def add_gate_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Options mirroring `GateConfig` (shared by every command that patches or converts)."""
    parser.add_argument("--granularity", choices=GRANULARITIES, default="elementwise")
    parser.add_argument("--gate-input", choices=GATE_INPUTS, default="hidden_states")
    parser.add_argument("--init", choices=INITS, default="identity")
    parser.add_argument("--no-bias", action="store_true", help="gate projection without bias")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="layer indices to gate (default: all)")
    parser.add_argument("--activation", choices=ACTIVATIONS, default="sigmoid")


def gate_config_from_args(args: argparse.Namespace) -> GateConfig:
    return GateConfig(
        granularity=args.granularity,
        gate_input=args.gate_input,
        init=args.init,
        bias=not args.no_bias,
        layers=args.layers,
        activation=args.activation,
    )


def _demo(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .default_model import DEFAULT_MODEL_NAME, default_model_dir
    from .report import patch_and_verify

    path = args.model or default_model_dir()
    print(f"model: {args.model or DEFAULT_MODEL_NAME} ({path})")
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    gate = gate_config_from_args(args)
    _, report = patch_and_verify(model, tokenizer, gate, args.prompt, args.max_new_tokens)
    print(f"prompt: {args.prompt!r}")
    print(report.format())
    if gate.init == "identity" and not (report.identity_max_abs_diff <= 1e-5 and report.same_generation):
        print("ERROR: the identity-initialised gated model does not reproduce the original.", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gated-patch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="patch a model, verify identity, generate, report")
    demo.add_argument("--model", default=None, help="local checkpoint directory (default: SmolLM2-135M-Instruct)")
    demo.add_argument("--prompt", default=DEFAULT_PROMPT)
    demo.add_argument("--max-new-tokens", type=int, default=16)
    add_gate_config_arguments(demo)
    demo.set_defaults(handler=_demo)
    from .diagnostics.command import add_inspect_parser  # `gated-patch inspect` (issue 5)

    add_inspect_parser(commands)
    from .checkpoints.command import add_checkpoint_parsers  # `gated-patch convert` / `push` (issue 3)

    add_checkpoint_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
