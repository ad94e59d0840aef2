"""``gated-patch-convert SRC OUT``: convert a checkpoint to the gated format (streaming, atomic), import the fused
gate layouts of other implementations, or export a gated checkpoint to them or to a native architecture.

`convert` is the same as a function: it plans (`plan`), writes (`write`) and optionally checks (`verify`) the result.
Peak memory is about one tensor (``benchmarks/convert_memory.py``); SRC is only read.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional

from transformers.utils import CONFIG_NAME

from gated_patch.arguments import add_gate_config_arguments, gate_config_from_args, run_cli
from gated_patch.core.config import GateConfig
from gated_patch.files import read_json

from . import layouts
from .hub import push_to_hub
from .plan import _REPO_ID, SOURCE_LAYOUTS, TARGET_LAYOUTS, ConversionPlan, plan_conversion, resolve_source
from .verify import verify_conversion
from .write import check_output, write_plan

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


def convert(src: str, out: str | os.PathLike, gate: Optional[GateConfig] = None, *, source_layout: str = "auto",
            target_layout: str = layouts.PLUGIN, revision: Optional[str] = None, token: Optional[str] = None,
            allow_pickle: bool = False, overwrite: bool = False, dry_run: bool = False, verify: bool = False,
            seed: int = 0, progress: bool = True, download: Optional[Callable] = None,
            log: Callable[[str], None] = print) -> ConversionPlan:
    """Convert `src` (local directory or Hub id) into `out`; see the module docstring and ``gated-patch-convert -h``."""
    source, repo_id = resolve_source(src, revision=revision, token=token, allow_pickle=allow_pickle, download=download)
    out = Path(out)
    if not dry_run:
        check_output(source, out, overwrite)
    base_model = repo_id
    if base_model is None:
        name = read_json(source / CONFIG_NAME, "SRC must be a transformers checkpoint directory").get("_name_or_path")
        base_model = name if isinstance(name, str) and _REPO_ID.match(name) else None
    plan = plan_conversion(source, gate, source_name=src, base_model=base_model, source_layout=source_layout,
                           target_layout=target_layout, allow_pickle=allow_pickle, seed=seed)
    log(plan.describe())
    if dry_run:
        log(f"dry run: nothing written (OUT would be {out})")
        for shard in plan.sources:
            shard.close()
        return plan
    write_plan(plan, out, overwrite=overwrite, progress=progress)
    log(f"wrote {out}")
    if verify:
        try:
            log(verify_conversion(plan, out))
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)  # a result that fails verification is not left behind
            raise
    return plan


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
