"""``gated-patch-convert SRC OUT``: convert a checkpoint to the gated format (streaming, atomic), import the fused
gate layouts of other implementations, or export a gated checkpoint to them or to a native architecture."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from gated_patch.checkpoints import layouts
from gated_patch.checkpoints.convert import SOURCE_LAYOUTS, TARGET_LAYOUTS, convert
from gated_patch.checkpoints.hub import push_to_hub
from gated_patch.arguments import add_gate_config_arguments, gate_config_from_args, run_cli

PROG = "gated-patch-convert"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``gated-patch-convert``."""
    parser.add_argument("src", metavar="SRC", help="local checkpoint directory or Hugging Face Hub repo id")
    parser.add_argument("out", metavar="OUT", help="output directory (must not exist unless --overwrite)")
    gate = parser.add_argument_group("gate (new gates on a plain checkpoint; ignored for fused and gated sources)")
    add_gate_config_arguments(gate)
    parser.add_argument("--seed", type=int, default=0, help="seed of --init paper gate weights")
    parser.add_argument("--source-layout", choices=SOURCE_LAYOUTS, default="auto",
                        help="auto: paper if config.json sets a paper gate flag, else plain (default)")
    parser.add_argument("--target-layout", choices=TARGET_LAYOUTS, default=layouts.PLUGIN,
                        help="plugin (default), or export a gated checkpoint to a fused layout or (qwen3_5) to a "
                             "native transformers architecture")
    parser.add_argument("--revision", default=None, help="Hub revision of SRC")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    parser.add_argument("--verify", action="store_true", help="load source and result and check them")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT (atomically)")
    parser.add_argument("--allow-pickle", action="store_true", help="accept pickled .bin weights (runs unpickling)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    hub = parser.add_argument_group("upload (gated-patch-push)")
    hub.add_argument("--push-to-hub", metavar="REPO", default=None, help="upload OUT to this Hub repo afterwards")
    hub.add_argument("--private", action="store_true", default=None)
    hub.add_argument("--hub-revision", default=None, help="branch to upload to (created if missing)")
    hub.add_argument("--create-pr", action="store_true")


def main(argv: Optional[list[str]] = None, *, api=None, download=None) -> int:
    return run(build_parser().parse_args(argv), api=api, download=download)


def run(args: argparse.Namespace, *, api=None, download=None) -> int:
    def body() -> int:
        gate = gate_config_from_args(args)
        convert(
            args.src, args.out, gate, source_layout=args.source_layout, target_layout=args.target_layout,
            revision=args.revision, allow_pickle=args.allow_pickle, overwrite=args.overwrite, dry_run=args.dry_run,
            verify=args.verify, seed=args.seed, progress=not args.no_progress, download=download,
        )
        if args.push_to_hub and not args.dry_run:
            result = push_to_hub(args.out, args.push_to_hub, private=args.private, revision=args.hub_revision,
                                 create_pr=args.create_pr, api=api)
            print(f"uploaded {args.out} to {args.push_to_hub}: {result}")
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
