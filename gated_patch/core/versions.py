"""The transformers releases this code supports; any other release fails loudly instead of computing something else."""

from __future__ import annotations

import re

import transformers

from .errors import UpstreamStructureError

MIN_TRANSFORMERS, MAX_TRANSFORMERS = "5.13.0", "6.0.0"  # oldest tested (.ci/oldest-transformers); first unsupported


def check_transformers_version(version: str | None = None) -> None:
    """Raise `UpstreamStructureError` unless transformers (or `version`) is in the supported range."""
    installed = version or transformers.__version__
    low, have, high = (tuple(int(n) for n in re.findall(r"\d+", v)[:3]) for v in (MIN_TRANSFORMERS, installed, MAX_TRANSFORMERS))
    if not low <= have < high:
        raise UpstreamStructureError(f"gated_patch's gated attention supports transformers>={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS}; "
                                     f"transformers {installed} is installed. pip install 'transformers>={MIN_TRANSFORMERS},"
                                     f"<{MAX_TRANSFORMERS}'")
