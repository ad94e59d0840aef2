"""The transformers releases this code supports; any other release fails loudly instead of computing something else."""

from __future__ import annotations

import re

import transformers

from .errors import UpstreamStructureError

MIN_TRANSFORMERS, MAX_TRANSFORMERS = "5.13.0", "6.0.0"  # oldest tested (.ci/oldest-transformers); first unsupported


def check_version(package: str, installed: str, low: str, high: str, fix: str = "") -> None:
    """Raise `UpstreamStructureError` unless ``low <= installed < high`` (first three numbers; "5.13" is 5.13.0)."""
    oldest, have, first_unsupported = ((*map(int, re.findall(r"\d+", v)[:3]), 0, 0)[:3] for v in (low, installed, high))
    if not oldest <= have < first_unsupported:
        raise UpstreamStructureError(f"gated_patch supports {package}>={low},<{high}; {package} {installed} is installed. "
                                     f"pip install '{package}>={low},<{high}'{fix}")


def check_transformers_version(version: str | None = None) -> None:
    """Raise `UpstreamStructureError` unless transformers (or `version`) is in the supported range."""
    check_version("transformers", version or transformers.__version__, MIN_TRANSFORMERS, MAX_TRANSFORMERS)
