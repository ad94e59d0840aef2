"""``gated-patch convert`` / ``gated-patch push``: the conversion scripts (``conversion/``) as subcommands."""

from __future__ import annotations

import argparse


def add_checkpoint_parsers(commands) -> None:
    """Add ``convert`` and ``push`` to the ``gated-patch`` subcommands (same options as the console scripts)."""
    from conversion import convert, push

    for name, module, help_text in (
        ("convert", convert, "convert a checkpoint to the gated format / import or export fused gate layouts"),
        ("push", push, "upload a gated checkpoint directory to the Hugging Face Hub"),
    ):
        parser = commands.add_parser(name, help=help_text, description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(parser)
        parser.set_defaults(handler=module.run)
