"""Writing a planned conversion: every output file into a temporary directory beside OUT, renamed into place at the
end, so OUT is the old checkpoint or the whole new one, never a part (tests/test_interrupted_conversion.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tqdm.auto import tqdm
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME

from gated_patch.checkpoints.remote_code import write_remote_code
from gated_patch.checkpoints.weights import write_safetensors
from gated_patch.core.errors import GatedCheckpointError
from gated_patch.files import staging_directory, write_json

from . import layouts
from .model_card import MODEL_CARD_FILE, exported_model_card, gated_model_card
from .plan import ConversionPlan


def check_output(source: Path, out: Path, overwrite: bool) -> None:
    out_abs, source_abs = out.resolve(), source.resolve()
    if out_abs == source_abs or source_abs in out_abs.parents or out_abs in source_abs.parents:
        raise GatedCheckpointError(f"OUT {out}: overlaps SRC {source}; choose an output directory outside SRC.")
    if out.exists() and not overwrite:
        raise GatedCheckpointError(f"OUT {out}: already exists; choose another directory or pass --overwrite.")
    if not out_abs.parent.is_dir():
        raise GatedCheckpointError(f"OUT {out}: parent directory {out_abs.parent} does not exist; create it first.")


def write_plan(plan: ConversionPlan, out: Path, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Write the planned checkpoint to `out` atomically (temporary directory beside it, renamed at the end)."""
    out = Path(out)
    check_output(plan.source, out, overwrite)
    try:
        with staging_directory(out) as tmp:
            _write_into(plan, tmp, progress)
            _commit(tmp, out, overwrite)
    finally:
        for shard in plan.sources:
            shard.close()
    return out


def _write_into(plan: ConversionPlan, tmp: Path, progress: bool) -> None:
    """Write every file of the planned checkpoint into the (staging) directory `tmp`."""
    weight_map, total_size, total_parameters = {}, 0, 0
    bar = tqdm(total=sum(s.nbytes for s in plan.shards), unit="B", unit_scale=True, desc="converting",
               disable=not progress)
    with bar:
        for shard in plan.shards:
            bar.set_postfix_str(shard.name)
            if shard.copy_from is not None:
                shutil.copyfile(shard.copy_from.path, tmp / shard.name)
            else:
                write_safetensors(tmp / shard.name, shard.entries, lambda n, s=shard: s.producers[n]())
            for name, _, shape in shard.entries:
                weight_map[name] = shard.name
                numel = 1
                for dim in shape:
                    numel *= dim
                total_parameters += numel
            total_size += shard.nbytes
            bar.update(shard.nbytes)
            for source_shard in plan.sources:  # unmap what this shard read: peak memory stays ~ one shard
                source_shard.close()
    index = {"metadata": {"total_size": total_size, "total_parameters": total_parameters}, "weight_map": weight_map}
    write_json(tmp / SAFE_WEIGHTS_INDEX_NAME, index, sort_keys=True)
    write_json(tmp / CONFIG_NAME, plan.config, sort_keys=True)
    for path in plan.extra_files:
        shutil.copyfile(path, tmp / path.name)
    if plan.target_layout == layouts.PLUGIN:
        write_remote_code(tmp)
        card = gated_model_card(plan.base_model, plan.source_name, plan.gate, plan.source_layout)
    else:
        card = exported_model_card(plan.source_name, plan.gate, plan.target_layout)
    card.save(tmp / MODEL_CARD_FILE)


def _commit(tmp: Path, out: Path, overwrite: bool = False) -> None:
    """Move the finished output into place. Without `overwrite` the rename never replaces a non-empty OUT, so of two
    converters racing to the same OUT exactly one wins and the other refuses (tests/test_interrupted_conversion.py)."""
    if overwrite and out.exists():
        with staging_directory(out) as trash:  # the old OUT waits there, whole, until the new one is in place
            os.replace(out, trash / "old")
            os.replace(tmp, out)
        return
    try:
        os.rename(tmp, out)  # fails with ENOTEMPTY / EEXIST when another process created OUT meanwhile
    except OSError as exc:
        if not out.exists():
            raise
        raise GatedCheckpointError(
            f"OUT {out}: created by another process while this conversion ran; refusing to replace it (this run "
            "wrote nothing). Check which result you want, or pass --overwrite to replace it.") from exc
