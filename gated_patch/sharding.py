"""FSDP2 for gated models: the wrapping the tests check against one process (`docs/scale-out.md`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .core.model import decoder_layers_path, gate_modules_of
from .core.errors import NotPatchedError
from .patching import base_model_of, is_patched


def fully_shard_gated(model: nn.Module, **fsdp_kwargs: Any) -> nn.Module:
    """``torch.distributed.fsdp.fully_shard`` on every decoder layer of a gated model (each layer's gate is sharded,
    gathered and freed with its attention), then on `model` itself; `model` may be a PEFT model of one.

    Call it after `patch_model` (and after ``get_peft_model``), inside an initialised process group. `fsdp_kwargs`
    go to every ``fully_shard`` call (``mesh``, ``mp_policy``, ``reshard_after_forward``, ...). Returns `model`.
    accelerate's FSDP2 plugin with ``TRANSFORMER_BASED_WRAP`` on the decoder layer class wraps the same way.
    """
    from torch.distributed.fsdp import fully_shard

    base = base_model_of(model)
    if not is_patched(base):
        raise NotPatchedError(f"fully_shard_gated expects a patched model; {type(base).__name__} has no gates. "
                              "Call gated_patch.patch_model(model) first, or use torch's fully_shard directly.")
    for layer in base.get_submodule(decoder_layers_path(base, gate_modules_of(base.config)["decoder_layers"])):
        fully_shard(layer, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    return model
