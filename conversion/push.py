"""``gated-patch-push DIR --repo-id REPO``: upload a gated checkpoint directory to the Hugging Face Hub (token from
``HF_TOKEN`` or ``hf auth login``)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from gated_patch.arguments import run_cli

from .hub import push_to_hub

PROG = "gated-patch-push"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``gated-patch-push``."""
    parser.add_argument("folder", metavar="DIR", help="directory written by gated-patch-convert or save_pretrained")
    parser.add_argument("--repo-id", required=True, help="Hub repo, owner/name (created if missing)")
    parser.add_argument("--private", action="store_true", default=None, help="create the repo private")
    parser.add_argument("--revision", default=None, help="branch to upload to (created if missing)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--commit-message", default=None)


def main(argv: Optional[list[str]] = None, *, api=None) -> int:
    return run(build_parser().parse_args(argv), api=api)


def run(args: argparse.Namespace, *, api=None) -> int:
    def body() -> int:
        result = push_to_hub(args.folder, args.repo_id, private=args.private, revision=args.revision,
                             create_pr=args.create_pr, commit_message=args.commit_message, api=api)
        print(f"uploaded {args.folder} to {args.repo_id}: {result}")
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
