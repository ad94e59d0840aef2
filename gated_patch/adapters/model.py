"""Gate-aware PEFT models: create (`get_gated_peft_model`), save (the gate record sidecar) and load
(`load_gated_adapter`), never dropping a gate tensor silently."""

from __future__ import annotations

import copy
import inspect
import os
import shutil
import weakref
from importlib.metadata import version as _package_version
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn
from transformers.utils import logging

from ..files import staging_directory
from ..checkpoints.saving import PEFT_CONFIG_HOOKS
from ..core.gate import is_gate_name
from ..core.model import gated_subclass
from ..core.config import GateConfig
from ..core.errors import NotPatchedError
from ..patching import gate_config, is_patched, patch_model, unpatch_model
from .configs import check_gates_reproducible
from .peft_api import (BaseTunerLayer, LNTuningLayer, ModulesToSaveWrapper, PeftConfig, PeftModel, check_peft,
                       get_peft_model, get_peft_model_state_dict, load_peft_weights)
from .record import (
    FORMAT,
    FORMAT_VERSION,
    GATE_TENSORS_DELTA,
    GATE_TENSORS_FULL,
    GATE_TENSORS_NONE,
    SIDECAR_NAME,
    GatedAdapterError,
    base_gate_tensors,
    fingerprint,
    gate_module_names,
    read_record,
    write_record,
)

logger = logging.get_logger(__name__)

_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


# ----------------------------------------------------------------------------------------------------------- saving
def gate_storage(peft_model: PeftModel, adapter_name: str) -> str:
    """How adapter `adapter_name` stores the gates: whole tensors, a LoRA-style delta, or not at all."""
    check_peft()
    return _gate_storage(peft_model.get_base_model(), adapter_name)


def _gate_storage(base: nn.Module, adapter_name: str) -> str:
    kinds = set()
    for slot in gate_module_names(base):
        module = base.get_submodule(slot)
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            kinds.add(GATE_TENSORS_FULL)
        elif isinstance(module, LNTuningLayer) and adapter_name in module.ln_tuning_layers:
            kinds.add(GATE_TENSORS_FULL)
        elif isinstance(module, BaseTunerLayer) and any(
            adapter_name in getattr(module, attr, {}) for attr in module.adapter_layer_names
        ):
            kinds.add(GATE_TENSORS_DELTA)
    if len(kinds) > 1:
        raise GatedAdapterError(f"Adapter {adapter_name!r} stores some gates whole and some as deltas: {sorted(kinds)}.")
    return kinds.pop() if kinds else GATE_TENSORS_NONE


def adapter_record(peft_model: PeftModel, adapter_name: str = "default") -> dict[str, Any]:
    """The gate record that `save_pretrained` writes beside adapter `adapter_name`."""
    return _record(peft_model.get_base_model(), peft_model.peft_config[adapter_name], adapter_name)


def _record(base: nn.Module, config: PeftConfig, adapter_name: str) -> dict[str, Any]:
    if not is_patched(base):
        raise NotPatchedError("The PEFT model's base is not patched; there is no gate to record.")
    bound = config.__dict__.get(_BOUND)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "gate_config": gate_config(base).to_dict(),
        "gate_modules": gate_module_names(base),
        "gate_tensors": _gate_storage(base, adapter_name),
        "base_gate_sha256": (bound and bound[2]) or fingerprint(base_gate_tensors(base)),
        "peft_type": str(getattr(config.peft_type, "value", config.peft_type)),
        "gated_patch_version": _package_version_or_none("gated_patch"),
        "peft_version": _package_version_or_none("peft"),
    }


def _package_version_or_none(name: str) -> Optional[str]:
    try:
        return _package_version(name)
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        return None


_BOUND = "_gated_patch_base"  # PEFT config __dict__ key: (weakref to the gated base model, adapter name, base gate sha)


class GatedPeftConfigMixin:
    """In front of a PEFT config class once PEFT attaches the config to a gated model: its ``save_pretrained``
    (which every ``PeftModel.save_pretrained`` calls last, on the main process) also writes the gate record, so an
    adapter saved by any trainer (TRL's ``SFTTrainer`` calls ``get_peft_model`` itself) carries it. Pickled or
    deep-copied, it is the plain PEFT config again."""

    def save_pretrained(self, save_directory, **kwargs) -> None:
        super().save_pretrained(save_directory, **kwargs)
        base = _bound_model(self)
        if base is not None and is_patched(base):
            write_record(save_directory, _record(base, self, self.__dict__[_BOUND][1]))

    def __reduce_ex__(self, protocol):
        plain_class = type(self).__mro__[type(self).__mro__.index(GatedPeftConfigMixin) + 1]
        return _plain_config, (plain_class, {key: value for key, value in self.__dict__.items() if key != _BOUND})


def _bound_model(config: PeftConfig) -> Optional[nn.Module]:
    """The gated model a PEFT config is bound to (None if unbound, or if the model is gone)."""
    binding = config.__dict__.get(_BOUND)
    return binding[0]() if binding else None


def _plain_config(config_class: type, state: dict) -> PeftConfig:
    config = config_class.__new__(config_class)
    config.__dict__.update(state)
    return config


def bind_gate_records(model: nn.Module, configs: dict[str, PeftConfig]) -> None:
    """`PEFT_CONFIG_HOOKS` entry: bind each adapter config of a gated model to it (a copy: the caller may reuse its
    config for another model). The base gates are fingerprinted now, while every rank runs PEFT's wrapping: sharded
    gates must be gathered (a collective) and saving runs on the main process only, after FSDP may have sharded them.
    Gates on the meta device are fingerprinted when saving."""
    unbound = [name for name, config in configs.items() if _bound_model(config) is not model]
    if not unbound or not is_patched(model):
        return
    check_peft()
    gates = base_gate_tensors(model)
    sha = None if any(tensor.is_meta for tensor in gates.values()) else fingerprint(gates)  # meta: when saving
    for adapter_name in unbound:
        config = configs[adapter_name]
        bound = config if isinstance(config, GatedPeftConfigMixin) else copy.copy(config)
        bound.__class__ = gated_subclass(type(config), GatedPeftConfigMixin) if bound is not config else type(config)
        bound.__dict__[_BOUND] = (weakref.ref(model), adapter_name, sha)
        configs[adapter_name] = bound


PEFT_CONFIG_HOOKS.append(bind_gate_records)


def _publish(staging: Path, target: Path) -> None:
    """Move everything from `staging` into `target`; each file lands with ``os.replace`` (atomic), the gate record
    last, so a reader never sees a record without its adapter."""
    if not target.exists():
        os.replace(staging, target)
        return
    entries = sorted(staging.iterdir(), key=lambda p: p.name == SIDECAR_NAME)
    for entry in entries:
        destination = target / entry.name
        if entry.is_dir() and destination.is_dir():
            _publish(entry, destination)
        else:
            if destination.is_dir():
                shutil.rmtree(destination)
            os.replace(entry, destination)


class GatedPeftModelMixin:
    """Put in front of a PEFT model class: `save_pretrained` writes atomically, every adapter gets its gate record
    (also those added later), `load_adapter` checks that a gate adapter fits the base and that no tensor was dropped."""

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        bound = inspect.signature(PeftModel.save_pretrained).bind(self, save_directory, *args, **kwargs)
        bound.apply_defaults()
        if not bound.arguments.get("is_main_process", True):
            return super().save_pretrained(save_directory, *args, **kwargs)
        bind_gate_records(self.get_base_model(), self.peft_config)  # each config's save_pretrained writes its record
        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        with staging_directory(target) as staging:
            super().save_pretrained(str(staging), *args, **kwargs)
            _publish(staging, target)

    def add_adapter(self, adapter_name, peft_config, *args, **kwargs):
        result = super().add_adapter(adapter_name, peft_config, *args, **kwargs)
        bind_gate_records(self.get_base_model(), self.peft_config)  # PEFT only adds it to its dict: bind it on every rank
        return result

    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        directory = _local_adapter_dir(model_id, kwargs.get("revision"))
        _check_base_fits(self.get_base_model(), directory, str(model_id), patch_base=False, wrapped=True)
        result = super().load_adapter(str(directory), adapter_name, *args, **kwargs)
        bind_gate_records(self.get_base_model(), self.peft_config)
        verify_adapter_loaded(self, directory, adapter_name)
        return result


def _as_gated_peft_model(peft_model: PeftModel) -> PeftModel:
    peft_model.__class__ = gated_subclass(type(peft_model), GatedPeftModelMixin)
    return peft_model


def get_gated_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **kwargs) -> PeftModel:
    """`peft.get_peft_model` for a patched model; its `save_pretrained` also writes the gate record.

    Refuses an unpatched model, and LoRA on gates that could not be rebuilt exactly on load.
    """
    check_peft()
    if not is_patched(model):
        raise NotPatchedError(
            f"get_gated_peft_model needs a patched model; {type(model).__name__} has no attention gates. "
            "Call gated_patch.patch_model(model) first (identity init keeps the model's outputs unchanged)."
        )
    peft_model = get_peft_model(model, peft_config, adapter_name=adapter_name, **kwargs)
    if gate_storage(peft_model, adapter_name) == GATE_TENSORS_DELTA:
        check_gates_reproducible(peft_model.get_base_model())
    return _as_gated_peft_model(peft_model)


# ---------------------------------------------------------------------------------------------------------- loading
def _local_adapter_dir(adapter: Union[str, os.PathLike], revision: Optional[str] = None) -> Path:
    path = Path(adapter)
    if path.is_dir():
        return path
    if str(adapter).count("/") != 1 or path.exists():
        raise GatedAdapterError(f"Adapter {str(adapter)!r} is neither a local directory nor a Hub repo id (owner/name).")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=str(adapter), revision=revision))


def _adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter directory, read by PEFT's `load_peft_weights` (pickled weights with weights_only)."""
    if not any((directory / name).is_file() for name in _WEIGHT_FILES):
        raise GatedAdapterError(f"{directory} holds no adapter weights ({' or '.join(_WEIGHT_FILES)}).")
    return load_peft_weights(str(directory), device="cpu")


def _short_list(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > limit else shown


def _stored_tensor_mismatches(base: nn.Module, stored: dict[str, torch.Tensor]) -> list[str]:
    """Adapter tensors whose shape cannot fit `base` (an adapter trained on a base of another size): PEFT would fail
    with a bare "size mismatch" after having wrapped the base's modules in place."""
    problems = []
    modules = dict(base.named_modules())
    for key, tensor in stored.items():
        parts = key.split(".")
        if parts[:2] == ["base_model", "model"]:
            parts = parts[2:]
        for cut in range(len(parts) - 1, 0, -1):  # the longest prefix that is a module of the base
            module = modules.get(".".join(parts[:cut]))
            if module is not None:
                break
        else:
            continue
        tail, shape = parts[cut:], tuple(tensor.shape)
        if isinstance(module, nn.Linear) and tail[:1] == ["lora_A"] and tail[-1] == "weight":
            ok = len(shape) == 2 and shape[1] == module.in_features
        elif isinstance(module, nn.Linear) and tail[:1] == ["lora_B"]:
            ok = len(shape) >= 1 and shape[0] == module.out_features
        elif isinstance(getattr(module, tail[-1], None), torch.Tensor):
            ok = shape == tuple(getattr(module, tail[-1]).shape)
        else:
            continue
        if not ok:
            problems.append(f"{key} {shape}")
    return problems


def _check_base_fits(base: nn.Module, directory: Path, adapter: str, *, patch_base: bool, wrapped: bool) -> None:
    """Raise `GatedAdapterError` unless the adapter at `directory` can load onto `base` without losing gate tensors;
    with `patch_base`, patch an unpatched base as the adapter's record says."""
    record = read_record(directory)
    if record is None:
        gate_keys = sorted(k for k in _adapter_weights(directory) if is_gate_name(k))
        if gate_keys and not is_patched(base):
            raise GatedAdapterError(
                f"Adapter {adapter!r} holds {len(gate_keys)} gate tensors ({_short_list(gate_keys)}) but has no "
                f"{SIDECAR_NAME} (saved with plain PEFT), so its gate config is unknown, and the base model has no "
                "gates: PEFT would drop them. Fix: patch the base with the config used for training, e.g. "
                "gated_patch.patch_model(base_model, gated_patch.GateConfig(granularity=...)), then call "
                f"gated_patch.load_gated_adapter(base_model, {adapter!r})."
            )
        return
    config = GateConfig.from_dict(record["gate_config"])
    fix = f"gated_patch.load_gated_adapter(base_model, {adapter!r})"
    if not is_patched(base):
        missing = list(record["gate_modules"])
        if patch_base and not wrapped:
            patch_model(base, config)
        else:
            how = (
                "the model is already wrapped by PEFT and cannot be patched in place; load a fresh base model and call "
                if wrapped
                else "call "
            )
            raise GatedAdapterError(
                f"Cannot load gate adapter {adapter!r} onto an unpatched {type(base).__name__}: the model lacks the "
                f"gate modules {_short_list(missing)} that the adapter holds weights for (PEFT would silently drop "
                f"them). Fix: {how}{fix}, which patches the base with the recorded gate config "
                f"(GateConfig(**{config.to_dict()!r})) and then loads the adapter."
            )
    existing = gate_config(base)
    if existing != config:
        raise GatedAdapterError(
            f"Adapter {adapter!r} was trained with {config}, but the base model is patched with {existing}. Fix: "
            f"load a fresh (unpatched) base model and call {fix}."
        )
    present = set(gate_module_names(base))
    missing = [name for name in record["gate_modules"] if name not in present]
    if missing:
        raise GatedAdapterError(
            f"Adapter {adapter!r} holds weights for gate modules the base model lacks: {_short_list(missing)}. Is this "
            f"the base model the adapter was trained on? Fix: load that base model unpatched and call {fix}."
        )
    if record["gate_tensors"] == GATE_TENSORS_DELTA:
        actual = fingerprint(base_gate_tensors(base))
        if actual != record.get("base_gate_sha256"):
            raise GatedAdapterError(
                f"Adapter {adapter!r} holds LoRA deltas of the gates, trained on base gates with SHA-256 "
                f"{record.get('base_gate_sha256')}; this base's gates differ ({actual}), so the result would be wrong. "
                "Fix: load the base checkpoint the adapter was trained on (identity-init gates are rebuilt exactly by "
                f"{fix} on the unpatched base)."
            )


def verify_adapter_loaded(peft_model: PeftModel, adapter_dir: Union[str, os.PathLike], adapter_name: str = "default") -> None:
    """Raise `GatedAdapterError` unless every tensor in the adapter file is in the model with the same value."""
    check_peft()
    directory = Path(adapter_dir)
    stored = _adapter_weights(directory)
    current = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    dropped = sorted(k for k in stored if k not in current)
    changed = sorted(
        k for k in stored if k in current and not torch.equal(current[k].detach().cpu().to(stored[k].dtype), stored[k])
    )
    if dropped or changed:
        raise GatedAdapterError(
            f"Adapter {str(adapter_dir)!r} did not load completely into adapter {adapter_name!r}: "
            f"{len(dropped)} tensors missing from the model ({_short_list(dropped)}), {len(changed)} with other values "
            f"({_short_list(changed)}). Load it with gated_patch.load_gated_adapter(base_model, {str(adapter_dir)!r}) "
            "onto the base model it was trained on."
        )


def load_gated_adapter(
    model: nn.Module,
    adapter: Union[str, os.PathLike],
    *,
    adapter_name: str = "default",
    is_trainable: bool = False,
    patch_base: bool = True,
    revision: Optional[str] = None,
    **kwargs,
) -> PeftModel:
    """Load a (gate) adapter onto `model`, patching it first as the adapter's gate record says.

    Args:
        model: an unpatched base model (patched here as recorded), a base already patched with the recorded gate
            config, or a PEFT model made by this module (the adapter is then added as `adapter_name`).
        adapter: the adapter directory written by `save_pretrained` (or a Hub repo id).
        is_trainable: load for further training (resume), as in `PeftModel.from_pretrained`.
        patch_base: with ``False``, an unpatched base raises instead of being patched.
        kwargs: passed to `PeftModel.from_pretrained`.

    Raises `GatedAdapterError` when the adapter cannot load onto `model` without losing gate tensors, and after
    loading unless every tensor of the adapter file is in the model.
    """
    check_peft()
    directory = _local_adapter_dir(adapter, revision)
    name = str(adapter)
    if isinstance(model, PeftModel):
        if isinstance(model, GatedPeftModelMixin):  # its load_adapter checks the base and verifies the tensors
            model.load_adapter(directory, adapter_name, is_trainable=is_trainable, **kwargs)
            return model
        _check_base_fits(model.get_base_model(), directory, name, patch_base=False, wrapped=True)
        if is_patched(model.get_base_model()):
            model = _as_gated_peft_model(model)
        PeftModel.load_adapter(model, str(directory), adapter_name, is_trainable=is_trainable, **kwargs)
        verify_adapter_loaded(model, directory, adapter_name)
        return model
    was_patched = is_patched(model)
    _check_base_fits(model, directory, name, patch_base=patch_base, wrapped=False)
    mismatched = _stored_tensor_mismatches(model, _adapter_weights(directory))
    if mismatched:
        if not was_patched and is_patched(model):
            unpatch_model(model)  # leave the base as it was given
        weights = next((directory / f for f in _WEIGHT_FILES if (directory / f).is_file()), directory)
        raise GatedAdapterError(
            f"Adapter {name!r}: {weights} holds tensors that do not fit this {type(model).__name__} "
            f"({_short_list(mismatched)}): it was trained on a base model of another size. Load it onto the base model "
            "it was trained on (see its adapter_config.json, base_model_name_or_path)."
        )
    peft_model = PeftModel.from_pretrained(model, str(directory), adapter_name=adapter_name, is_trainable=is_trainable, **kwargs)
    verify_adapter_loaded(peft_model, directory, adapter_name)
    if is_patched(peft_model.get_base_model()):
        peft_model = _as_gated_peft_model(peft_model)
    return peft_model
