"""Ready PEFT configs for training attention output gates.

Three recipes, each a plain PEFT config (so `get_peft_model`, `save_pretrained`, `PeftModel.from_pretrained` and
`merge_and_unload` are PEFT's own):

* `gate_only_config` - only the gate weights train; the adapter holds whole gate tensors and nothing else.
* `gates_and_lora_config` - whole gates plus LoRA on chosen projections.
* `gate_lora_config` - LoRA on the gate projection itself (stores only a low-rank change of the base gates, so it
  needs base gates that can be rebuilt exactly: identity init, or gates stored in the base checkpoint).

PEFT facts these recipes rely on (pinned by tests/test_adapters_peft_facts.py): ``LoraConfig(target_modules=None)``
adds LoRA on the family's default projections (not "gates only"); ``target_modules=[]`` raises; an adapter that
saves a module through ``modules_to_save`` loads onto a base without that module silently; ``LNTuningConfig``
raises instead, which is why it is the default gate-only route.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

from ..checkpoints.weights import find_weight_files, open_shards
from ..core.gate import GATE_MODULE_NAME
from ..patching import gate_config, is_patched
from .peft_api import DUMMY_TARGET_MODULES, LNTuningConfig, LoraConfig, check_peft
from .record import GatedAdapterError, base_gate_tensors, gate_module_names

GATE_ONLY_ROUTES = ("ln_tuning", "modules_to_save")

TargetModules = Union[str, Sequence[str]]


def gate_only_config(*, route: str = "ln_tuning", task_type: Optional[str] = "CAUSAL_LM", **kwargs) -> Union[
    LNTuningConfig, LoraConfig
]:
    """A PEFT config under which only the gate parameters train and the adapter stores only gate tensors.

    Args:
        route: ``"ln_tuning"`` (default: `LNTuningConfig` on the gate; plain `PeftModel.from_pretrained` onto an
            ungated base raises instead of dropping the gates) or ``"modules_to_save"`` (a LoRA config with PEFT's
            dummy target and the gate in ``modules_to_save``; plain PEFT loads it onto an ungated base silently
            without the gates - use `gated_patch.load_gated_adapter`).
        task_type: PEFT task type (``"CAUSAL_LM"`` gives a `PeftModelForCausalLM`).
        kwargs: further fields of the underlying PEFT config.
    """
    check_peft()
    if route == "ln_tuning":
        return LNTuningConfig(target_modules=[GATE_MODULE_NAME], task_type=task_type, **kwargs)
    if route == "modules_to_save":
        extra = list(kwargs.pop("modules_to_save", None) or [])
        return LoraConfig(
            target_modules=DUMMY_TARGET_MODULES,
            modules_to_save=[GATE_MODULE_NAME, *[m for m in extra if m != GATE_MODULE_NAME]],
            task_type=task_type,
            **kwargs,
        )
    raise GatedAdapterError(f"gate_only_config(route={route!r}) is invalid; choose one of {list(GATE_ONLY_ROUTES)}.")


def _sample_gate_name() -> str:
    return f"model.layers.0.self_attn.{GATE_MODULE_NAME}"


def _targets_gate(target_modules: TargetModules) -> bool:
    """Whether PEFT's matching of `target_modules` would select the gate slot."""
    if isinstance(target_modules, str):
        if target_modules in ("all-linear", DUMMY_TARGET_MODULES):
            return False  # handled separately ("all-linear" gets an exclusion)
        return re.fullmatch(target_modules, _sample_gate_name()) is not None or target_modules == GATE_MODULE_NAME
    name = _sample_gate_name()
    return any(name == key or name.endswith(f".{key}") for key in target_modules)


def gates_and_lora_config(
    *,
    r: int = 8,
    lora_alpha: int = 16,
    target_modules: TargetModules = ("q_proj", "v_proj"),
    lora_dropout: float = 0.0,
    task_type: Optional[str] = "CAUSAL_LM",
    **kwargs,
) -> LoraConfig:
    """Whole gates (trained through ``modules_to_save``) plus LoRA on `target_modules`, as in `LoraConfig`.

    `target_modules` must name projections explicitly (a list of suffixes, a regex string, or ``"all-linear"``,
    which here excludes the gate). ``None`` or an empty list is refused: PEFT would pick default targets or raise.
    Note: the MLP's ``gate_proj`` is not the attention gate (``attn_gate``); naming it adds LoRA on the MLP.
    """
    check_peft()
    if target_modules is None or (not isinstance(target_modules, str) and len(list(target_modules)) == 0):
        raise GatedAdapterError(
            f"gates_and_lora_config(target_modules={target_modules!r}): name the projections that get LoRA, e.g. "
            "target_modules=['q_proj', 'v_proj'] (PEFT would otherwise choose defaults or raise). For gates alone "
            "use gated_patch.gate_only_config()."
        )
    if _targets_gate(target_modules):
        raise GatedAdapterError(
            f"target_modules={target_modules!r} selects the attention gate ({GATE_MODULE_NAME!r}), which this recipe "
            "already trains whole. Remove it from target_modules, or use gated_patch.gate_lora_config(model) for LoRA "
            "on the gate."
        )
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    modules_to_save = [GATE_MODULE_NAME, *[m for m in (kwargs.pop("modules_to_save", None) or []) if m != GATE_MODULE_NAME]]
    exclude = kwargs.pop("exclude_modules", None)
    if target_modules == "all-linear":
        exclude = [GATE_MODULE_NAME, *([exclude] if isinstance(exclude, str) else list(exclude or []))]
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=target_modules,
        lora_dropout=lora_dropout,
        modules_to_save=modules_to_save,
        exclude_modules=exclude,
        task_type=task_type,
        **kwargs,
    )


def gate_lora_config(
    model: nn.Module,
    *,
    r: int = 8,
    lora_alpha: int = 16,
    target_modules: Iterable[str] = (),
    lora_dropout: float = 0.0,
    task_type: Optional[str] = "CAUSAL_LM",
    **kwargs,
) -> LoraConfig:
    """LoRA on the gate projection (its pre-activation), optionally also on other projections (`target_modules`).

    The adapter stores only ``B @ A``, a change of the base gate weights, so it reloads exactly only onto the same
    base gates. `model` (the patched base) is checked: its gates must be at their identity init (rebuilt exactly by
    `patch_model`) or equal to the gates stored in the checkpoint it was loaded from. Otherwise `GatedAdapterError`.
    """
    check_peft()
    check_gates_reproducible(model)
    extra = [m for m in target_modules if m != GATE_MODULE_NAME]
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=[GATE_MODULE_NAME, *extra],
        lora_dropout=lora_dropout,
        task_type=task_type,
        **kwargs,
    )


def _checkpoint_gate_tensors(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The gate tensors stored in the local checkpoint `model` was loaded from (empty when there is none)."""
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or getattr(model, "name_or_path", "")
    directory = Path(source) if source else None
    if directory is None or not directory.is_dir():
        return {}
    weights = find_weight_files(directory)
    if weights is None or weights.pickled:  # pickled weights are not unpickled to compare gates
        return {}
    _, by_name = open_shards(weights)  # checked against the index; a stray *.safetensors beside them is not read
    return {name: by_name[name].get(name) for name in sorted(set(names) & set(by_name))}


def gates_reproducible(model: nn.Module) -> tuple[bool, str]:
    """``(True, how)`` when the base gates of patched `model` can be rebuilt exactly on load, else ``(False, why)``."""
    if not is_patched(model):
        return False, "the model is not patched (it has no gates)"
    tensors = base_gate_tensors(model)
    config = gate_config(model)
    if config.init == "identity" and all(bool(torch.all(t == 0)) for t in tensors.values()):
        return True, "identity init (patch_model rebuilds these gates exactly)"
    stored = _checkpoint_gate_tensors(model, tensors)
    if stored and set(stored) == set(tensors) and all(
        torch.equal(stored[k].to(tensors[k].dtype), tensors[k].cpu()) for k in tensors
    ):
        return True, "equal to the gates stored in the base checkpoint"
    if config.init != "identity":
        why = f"init={config.init!r} draws random gates at every patch_model call"
    else:
        why = "the gates moved away from their identity init (they were trained or edited)"
    return False, f"{why}, and they are not stored in the checkpoint the model was loaded from"


def check_gates_reproducible(model: nn.Module) -> None:
    ok, why = gates_reproducible(model)
    if not ok:
        raise GatedAdapterError(
            f"LoRA on the gate is refused: {why}. A gate LoRA adapter stores only a low-rank change of the base gate "
            "weights, so it could not be reloaded onto the same gates. Fix: save the patched model "
            "(model.save_pretrained(dir)) and reload it with from_pretrained(dir) before adding the adapter, or "
            "train whole gates with gated_patch.gate_only_config() / gated_patch.gates_and_lora_config()."
        )


__all__ = [
    "GATE_ONLY_ROUTES",
    "check_gates_reproducible",
    "gate_lora_config",
    "gate_module_names",
    "gate_only_config",
    "gates_and_lora_config",
    "gates_reproducible",
]
