"""Reading and writing checkpoint weight files one tensor at a time (peak memory: about one tensor).

* `read_safetensors_header` validates a ``.safetensors`` file without reading its data: a truncated or corrupt shard
  is a clear error naming the file, before anything is written.
* `write_safetensors` streams tensors produced on demand into a ``.safetensors`` file (the standard format: 8-byte
  little-endian header size, JSON header padded to 8 bytes, then the data).
* `SourceShard` gives lazy access to the tensors of one source shard (safetensors, or a pickled ``.bin`` only when
  explicitly allowed).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from ..core.errors import GatedCheckpointError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def dtype_size(name: str) -> int:
    return torch.empty((), dtype=DTYPES[name]).element_size()


def tensor_nbytes(dtype: str, shape: Iterable[int]) -> int:
    size = dtype_size(dtype)
    for dim in shape:
        size *= dim
    return size


def read_safetensors_header(path: str | os.PathLike) -> dict:
    """The header ``{name: {"dtype", "shape", "data_offsets"}}`` (metadata removed) of a valid safetensors file."""
    path = Path(path)

    def corrupt(reason: str) -> GatedCheckpointError:
        return GatedCheckpointError(
            f"{path}: not a complete safetensors file ({reason}); it is truncated or corrupt. Download or copy it again."
        )

    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise corrupt(f"{size} bytes")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(_MAX_HEADER, size - 8):
                raise corrupt(f"header length {header_len} exceeds the file size {size}")
            header = json.loads(handle.read(header_len))
    except GatedCheckpointError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, OSError):
            raise GatedCheckpointError(f"{path}: cannot read ({exc.strerror or exc}). Check the path and permissions.") from exc
        raise corrupt(f"invalid header: {exc}") from exc
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        try:
            begin, stop = info["data_offsets"]
            expected = tensor_nbytes(info["dtype"], info["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise corrupt(f"bad header entry for {name!r}") from exc
        if stop - begin != expected:
            raise corrupt(f"tensor {name!r} has {stop - begin} bytes, its shape needs {expected}")
        end = max(end, stop)
    if 8 + header_len + end != size:
        raise corrupt(f"{size} bytes on disk, header describes {8 + header_len + end}")
    return header


def write_safetensors(
    path: str | os.PathLike,
    entries: list[tuple[str, str, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor],
    metadata: Optional[dict[str, str]] = None,
) -> int:
    """Write ``entries`` (name, safetensors dtype, shape) to `path`, calling ``produce(name)`` for one tensor at a
    time. Returns the number of data bytes. Each produced tensor must have the announced dtype and shape."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = tensor_nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name, dtype, shape in entries:
            tensor = produce(name)
            if DTYPE_NAMES.get(tensor.dtype) != dtype or tuple(tensor.shape) != tuple(shape):
                raise GatedCheckpointError(
                    f"internal error writing {path}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                    f"expected {dtype} {tuple(shape)}"
                )
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            handle.write(data.numpy().tobytes())
            del tensor, data
    return offset


class SourceShard:
    """Lazy, read-only access to the tensors of one weight file of a source checkpoint."""

    def __init__(self, path: Path, allow_pickle: bool = False) -> None:
        self.path = path
        self.is_safetensors = path.suffix == ".safetensors"
        if self.is_safetensors:
            header = read_safetensors_header(path)
            self.entries = {name: (info["dtype"], tuple(info["shape"])) for name, info in header.items()}
            self._handle = None
        else:
            if not allow_pickle:
                raise GatedCheckpointError(
                    f"{path}: pickled PyTorch weights are refused (loading them can run arbitrary code). Use a "
                    "safetensors checkpoint, or pass --allow-pickle if you trust this file."
                )
            try:
                self._tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad source file
                raise GatedCheckpointError(f"{path}: cannot read pickled weights ({exc}). Check the file.") from exc
            self.entries = {
                name: (DTYPE_NAMES[t.dtype], tuple(t.shape)) for name, t in self._tensors.items()
            }

    def get(self, name: str) -> torch.Tensor:
        if not self.is_safetensors:
            return self._tensors[name]
        if self._handle is None:
            from safetensors import safe_open

            self._handle = safe_open(str(self.path), framework="pt")
        return self._handle.get_tensor(name)

    def close(self) -> None:
        """Release the memory map of a safetensors shard (reopened lazily if read again)."""
        self._handle = None
