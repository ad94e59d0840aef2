"""Command-line helpers shared by every command: the gate-config options, and one-line errors."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .core.config import CHOICES, GateConfig
from .core.errors import GatedPatchError


def add_gate_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Options mirroring `GateConfig` (every command that patches or converts)."""
    defaults = GateConfig()
    for name in ("granularity", "gate_input", "init"):
        parser.add_argument(f"--{name.replace('_', '-')}", choices=CHOICES[name], default=getattr(defaults, name))
    parser.add_argument("--no-bias", action="store_true", help="gate projection without bias")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="layer indices to gate (default: all)")
    parser.add_argument("--activation", choices=CHOICES["activation"], default=defaults.activation)


def gate_config_from_args(args: argparse.Namespace) -> GateConfig:
    return GateConfig(granularity=args.granularity, gate_input=args.gate_input, init=args.init, bias=not args.no_bias,
                      layers=args.layers, activation=args.activation)


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """Run `body`; a known failure becomes one line on stderr and exit status 2 (never a traceback)."""
    try:
        return body()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written.", file=sys.stderr)
        return 130
    except (GatedPatchError, OSError) as exc:
        print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
