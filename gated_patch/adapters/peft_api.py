"""Every PEFT name the gate recipes use, in one place, behind a supported version range and a structure check.

Most of it is PEFT's public API. Four things are not, and a PEFT release could change them without notice:
`LNTuningLayer` and `ModulesToSaveWrapper` (how an adapter holds whole gates), `DUMMY_TARGET_MODULES` (a LoRA config
that adds no LoRA layer), and ``BaseTuner.__init__`` assigning ``model.peft_config`` (how a gate record reaches every
adapter, whoever calls ``get_peft_model``). `check_peft` checks the installed PEFT before any of them is used; a PEFT
outside the range, or one whose internals moved, fails loudly with the fix instead of dropping a gate.
"""

from __future__ import annotations

import importlib
import inspect
import re
from functools import lru_cache
from typing import Any

import peft
from peft import LNTuningConfig, LoraConfig, PeftConfig, PeftModel, get_peft_model  # noqa: F401 - re-exported
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import get_peft_model_state_dict, load_peft_weights  # noqa: F401 - re-exported

from ..core.errors import UpstreamStructureError
from ..core.versions import check_version

MIN_PEFT, MAX_PEFT = "0.21.0", "1.0.0"  # oldest tested (make test-oldest); first unsupported


def _internal(module: str, name: str) -> Any:
    """``module.name``, or None when this PEFT has no such name (`check_peft` then refuses it)."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


LNTuningLayer = _internal("peft.tuners.ln_tuning.layer", "LNTuningLayer")
ModulesToSaveWrapper = _internal("peft.utils.other", "ModulesToSaveWrapper")
DUMMY_TARGET_MODULES = _internal("peft.utils.constants", "DUMMY_TARGET_MODULES")


def _source(function: Any) -> str:
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return ""


def peft_structure_problems() -> list[str]:
    """What the installed PEFT lacks of the internals the gate recipes rely on (empty if nothing)."""
    problems = []
    if not (isinstance(LNTuningLayer, type) and issubclass(LNTuningLayer, BaseTunerLayer)
            and "ln_tuning_layers" in getattr(LNTuningLayer, "adapter_layer_names", ())):
        problems.append("peft.tuners.ln_tuning.layer.LNTuningLayer (a tuner layer holding ln_tuning_layers)")
    if not (isinstance(ModulesToSaveWrapper, type) and "original_module" in _source(ModulesToSaveWrapper)
            and "modules_to_save" in _source(ModulesToSaveWrapper)):
        problems.append("peft.utils.other.ModulesToSaveWrapper (holding original_module and modules_to_save)")
    if not isinstance(DUMMY_TARGET_MODULES, str):
        problems.append("peft.utils.constants.DUMMY_TARGET_MODULES (a target that adds no LoRA layer)")
    if not re.search(r"self\.model\.peft_config\s*=", _source(BaseTuner.__init__)):
        problems.append("BaseTuner.__init__ assigning model.peft_config (how the gate record binds to an adapter)")
    if "is_main_process" not in inspect.signature(PeftModel.save_pretrained).parameters:
        problems.append("PeftModel.save_pretrained(is_main_process=...)")
    if not callable(getattr(BaseTunerLayer, "get_base_layer", None)):
        problems.append("BaseTunerLayer.get_base_layer")
    return problems


@lru_cache(maxsize=None)
def check_peft(version: str | None = None) -> None:
    """Raise `UpstreamStructureError` unless the installed PEFT (or `version`) is supported and has every internal
    the gate recipes use."""
    check_version("peft", version or peft.__version__, MIN_PEFT, MAX_PEFT, " (gated_patch.adapters relies on it)")
    problems = peft_structure_problems()
    if problems:
        raise UpstreamStructureError(
            f"PEFT {peft.__version__} lacks what gated_patch's gate recipes rely on: {'; '.join(problems)}. Install a "
            f"tested PEFT (pip install 'peft>={MIN_PEFT},<{MAX_PEFT}'), or upgrade gated_patch.")
