"""Files written and read by the package: atomic writes, atomic directories, JSON (checkpoints, records, reports,
plots). Every error names the file at fault."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .core.errors import GatedCheckpointError


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` to `path` through a temporary file beside it and ``os.replace``: readers see the old file or the
    whole new one, never a part. The one atomic file write of the package (checkpoints, records, reports, plots)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the mode open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, data: Any, sort_keys: bool = False) -> Path:
    """`data` as indented JSON, written with `atomic_write` (keys in their order, or sorted as transformers sorts a
    ``config.json``)."""
    return atomic_write(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


@contextlib.contextmanager
def staging_directory(target: str | os.PathLike) -> Iterator[Path]:
    """A new directory beside `target` (on its file system, so it can be renamed onto it), for writing a directory
    atomically: build it here, then move it into place. Removed on exit unless it was moved away."""
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.resolve().parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result gets the usual directory mode
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: str | os.PathLike, missing: str = "restore or re-download it") -> dict:
    """The JSON object in `path`; a `GatedCheckpointError` naming the file (and, if it is absent, `missing`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GatedCheckpointError(f"{path}: not found; {missing}.") from None
    except (OSError, ValueError) as exc:
        raise GatedCheckpointError(f"{path}: cannot read it as JSON ({exc}); restore or re-download the file.") from exc
    if not isinstance(data, dict):
        raise GatedCheckpointError(f"{path}: expected a JSON object; restore or re-download the file.")
    return data
