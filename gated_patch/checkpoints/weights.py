"""The weight files of a checkpoint on disk: which files transformers reads, their index, and safetensors files read
and written one tensor at a time (peak memory: about one tensor).

Every error names the file at fault: without these checks a truncated shard surfaces as safetensors' "incomplete
metadata" with no file name, and a malformed index as a bare ``KeyError``.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from safetensors import safe_open
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from ..core.errors import GatedCheckpointError
from ..files import read_json

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class WeightFiles:
    """The weight files of a checkpoint directory, as transformers would read them."""

    files: list[Path]
    listing: Path  # the file that lists the tensors: the index, or the single weight file
    weight_map: Optional[dict[str, str]]  # tensor name -> file name, from the index; None for a single file

    @property
    def pickled(self) -> bool:
        return all(path.suffix == ".bin" for path in self.files)  # pytorch_model[.variant].bin and its shards


def with_variant(name: str, variant: Optional[str]) -> str:
    """A weight file's name for a ``from_pretrained(..., variant=...)`` load, as transformers names it:
    ``model.safetensors`` -> ``model.fp16.safetensors``, ``model.safetensors.index.json`` ->
    ``model.safetensors.index.fp16.json``."""
    if not variant:
        return name
    stem, _, suffix = name.rpartition(".")
    return f"{stem}.{variant}.{suffix}"


def find_weight_files(directory: Path, variant: Optional[str] = None) -> Optional[WeightFiles]:
    """The weight files of `directory` (``model.safetensors`` first, as in transformers, then the safetensors index,
    then pickled ``pytorch_model.bin`` weights; of `variant`, if given), every listed file present; None when it has
    none of them."""
    for single, index in ((SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME), (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)):
        single, index = with_variant(single, variant), with_variant(index, variant)
        if (directory / single).is_file():
            return WeightFiles([directory / single], directory / single, None)
        if (directory / index).is_file():
            weight_map = read_json(directory / index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
                raise GatedCheckpointError(f"{directory / index}: no valid weight_map; restore or re-download the index.")
            files = [directory / name for name in sorted(set(weight_map.values()))]
            for path in files:
                if not path.is_file():
                    raise GatedCheckpointError(f"{path}: listed in {directory / index} but missing; download or copy the "
                                               "complete checkpoint.")
            return WeightFiles(files, directory / index, weight_map)
    return None


def check_index(weights: WeightFiles, tensors: dict[str, Path]) -> None:
    """Every tensor the index lists is in the file it names (`tensors`: tensor name -> file holding it)."""
    for name, file in (weights.weight_map or {}).items():
        if name not in tensors or tensors[name].name != file:
            raise GatedCheckpointError(f"{weights.listing.parent / file}: does not hold {name!r}, which {weights.listing} "
                                       "lists there; the checkpoint is incomplete or mixed up. Download or copy it again.")


# ------------------------------------------------------------------------------------------------------ safetensors

def tensor_nbytes(dtype: str, shape: Iterable[int]) -> int:
    size = torch.empty((), dtype=DTYPES[dtype]).element_size()
    for dim in shape:
        size *= dim
    return size


def read_safetensors_header(path: str | os.PathLike) -> dict:
    """The header ``{name: {"dtype", "shape", "data_offsets"}}`` (metadata removed) of a complete safetensors file."""
    path = Path(path)

    def corrupt(reason: str) -> GatedCheckpointError:
        return GatedCheckpointError(f"{path}: not a complete safetensors file ({reason}); it is truncated or corrupt. "
                                    "Download or copy it again.")

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
    except OSError as exc:
        raise GatedCheckpointError(f"{path}: cannot read ({exc.strerror or exc}). Check the path and permissions.") from exc
    except (ValueError, UnicodeDecodeError) as exc:
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


def write_safetensors(path: str | os.PathLike, entries: list[tuple[str, str, tuple[int, ...]]],
                      produce: Callable[[str], torch.Tensor], metadata: Optional[dict[str, str]] = None) -> int:
    """Write `entries` (name, safetensors dtype, shape) to `path`, calling ``produce(name)`` for one tensor at a time.
    Returns the number of data bytes. Each produced tensor must have the announced dtype and shape."""
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
                raise GatedCheckpointError(f"internal error writing {path}: tensor {name!r} is {tensor.dtype} "
                                           f"{tuple(tensor.shape)}, expected {dtype} {tuple(shape)}")
            handle.write(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            del tensor
    return offset


class SourceShard:
    """Lazy, read-only access to the tensors of one weight file (safetensors, or pickled ``.bin`` when allowed)."""

    def __init__(self, path: Path, allow_pickle: bool = False) -> None:
        self.path = path
        self.is_safetensors = path.suffix == ".safetensors"
        self._handle = None
        if self.is_safetensors:
            header = read_safetensors_header(path)
            self.entries = {name: (info["dtype"], tuple(info["shape"])) for name, info in header.items()}
            return
        if not allow_pickle:
            raise GatedCheckpointError(f"{path}: pickled PyTorch weights are refused (loading them can run arbitrary "
                                       "code). Use a safetensors checkpoint, or pass --allow-pickle if you trust this file.")
        try:
            self._tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad source file
            raise GatedCheckpointError(f"{path}: cannot read pickled weights ({exc}). Check the file.") from exc
        self.entries = {name: (DTYPE_NAMES[t.dtype], tuple(t.shape)) for name, t in self._tensors.items()}

    def get(self, name: str) -> torch.Tensor:
        if not self.is_safetensors:
            return self._tensors[name]
        if self._handle is None:
            self._handle = safe_open(str(self.path), framework="pt")
        return self._handle.get_tensor(name)

    def close(self) -> None:
        """Release the memory map of a safetensors shard (reopened lazily if read again)."""
        self._handle = None


def open_shards(weights: WeightFiles, allow_pickle: bool = False) -> tuple[list[SourceShard], dict[str, SourceShard]]:
    """The weight files as `SourceShard` s (each validated) and a map tensor name -> shard, checked against the index."""
    shards = [SourceShard(path, allow_pickle=allow_pickle) for path in weights.files]
    by_name = {name: shard for shard in shards for name in shard.entries}
    check_index(weights, {name: shard.path for name, shard in by_name.items()})
    return shards, by_name
