"""Upload a converted (or saved) gated checkpoint to the Hugging Face Hub with `huggingface_hub.HfApi`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from huggingface_hub import HfApi
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from gated_patch.checkpoints.format import is_gated_model_type
from gated_patch.checkpoints.remote_code import REMOTE_CODE_FILE
from gated_patch.checkpoints.weights import find_weight_files
from gated_patch.core.errors import GatedCheckpointError
from gated_patch.core.model import GATE_CONFIG_KEY
from gated_patch.files import read_json

from .model_card import MODEL_CARD_FILE


def check_pushable(folder: Path) -> dict:
    """The config of a complete gated checkpoint directory; a clear error otherwise."""
    if not folder.is_dir():
        raise GatedCheckpointError(f"{folder}: no such directory; pass the directory written by gated-patch-convert.")
    config = read_json(folder / CONFIG_NAME, "pass a checkpoint directory")
    model_type = config.get("model_type")
    if is_gated_model_type(model_type):
        weights = find_weight_files(folder)  # an index whose shards are missing raises, naming the shard
        safetensors = weights is not None and not weights.pickled
        missing = [] if safetensors else [f"{SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}"]
        missing += [] if (folder / REMOTE_CODE_FILE).exists() else [REMOTE_CODE_FILE]
        missing += [f"{CONFIG_NAME}:{GATE_CONFIG_KEY}"] if GATE_CONFIG_KEY not in config else []
        if missing:
            raise GatedCheckpointError(f"{folder}: incomplete gated checkpoint (missing {missing}); re-run "
                                       "gated-patch-convert or model.save_pretrained.")
    elif not _is_exported(folder):
        raise GatedCheckpointError(
            f"{folder}: model_type {model_type!r} is not a gated checkpoint; convert it first (gated-patch-convert).")
    return config


def _is_exported(folder: Path) -> bool:
    """A checkpoint exported by gated_patch to a fused gate layout (its model card says so)."""
    try:
        return "gate-layout-" in (folder / MODEL_CARD_FILE).read_text(encoding="utf-8")
    except OSError:
        return False


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: Optional[bool] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    token: Optional[str] = None,
    commit_message: Optional[str] = None,
    api: Any = None,
) -> Any:
    """Create `repo_id` if needed (and branch `revision`), then upload `folder` in one commit.

    `token` defaults to the usual huggingface_hub resolution (``HF_TOKEN``, ``hf auth login``). `api` may be an
    ``HfApi`` instance (tests inject a mock). Returns the ``upload_folder`` result (commit info or PR URL).
    """
    folder = Path(folder)
    config = check_pushable(folder)
    if api is None:
        api = HfApi(token=token)
    message = commit_message or f"Upload gated checkpoint ({config.get('model_type')}) with gated_patch"
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id=repo_id, repo_type="model", branch=revision, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=str(folder),
            revision=revision,
            create_pr=create_pr,
            commit_message=message,
        )
    except Exception as exc:  # noqa: BLE001 - any Hub failure: one clear line (the folder itself is untouched)
        raise GatedCheckpointError(
            f"upload of {folder} to {repo_id} failed ({type(exc).__name__}: {' '.join(str(exc).split())}); check the "
            "repo id, your token (HF_TOKEN or `hf auth login`) and the network, then run gated-patch-push again."
        ) from exc
