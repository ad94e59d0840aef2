"""One-line errors for the conversion scripts."""

from __future__ import annotations

import sys
from typing import Callable

from gated_patch.core.errors import GatedPatchError


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """Run `body`; a known failure becomes one line on stderr and exit status 2 (never a traceback)."""
    try:
        return body()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written.", file=sys.stderr)
        return 130
    except (GatedPatchError, OSError) as exc:
        message = " ".join(str(exc).split())
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
