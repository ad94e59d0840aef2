"""Command line: ``gated-patch demo`` (the main job on the embedded default model), ``gated-patch inspect`` and
``gated-patch remote-code``."""

from __future__ import annotations

import argparse
import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

from .arguments import add_gate_config_arguments, gate_config_from_args
from .checkpoints.remote_code import REMOTE_CODE_FILE, remote_code_source
from .default_model import DEFAULT_MODEL_NAME, default_model_dir
from .diagnostics.command import add_inspect_parser
from .demo import patch_and_verify

DEFAULT_PROMPT = "The Python language reference describes"


def _demo(args: argparse.Namespace) -> int:
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


def _print_remote_code(args: argparse.Namespace) -> int:
    sys.stdout.write(remote_code_source())
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
    add_inspect_parser(commands)
    remote = commands.add_parser("remote-code", help=f"print the {REMOTE_CODE_FILE} that every gated checkpoint carries")
    remote.set_defaults(handler=_print_remote_code)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
