"""Tensor names as a checkpoint holds them.

transformers renames some families' weights as it loads a checkpoint and back as it saves one (a multimodal model's
``language_model.model.*``, legacy layouts such as EXAONE's ``transformer.h.*``, fused experts): the files hold the
names the family's published checkpoints use, the model holds others. A gated checkpoint follows the same rule, so
vLLM and llama.cpp find every tensor where the family has it. The tools that read the files without building the
model (the checks before loading, the converter, vLLM) need the saved names: the config records where the gate
tensors are (``checkpoint_attention``) wherever they differ from the module paths.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from ..core.errors import GatedCheckpointError, UpstreamStructureError
from ..core.gate import GATE_MODULE_NAME

#: ``attn_output_gate_modules`` key: a gated attention module's name in the files, ``{}`` for the layer index.
CHECKPOINT_ATTENTION = "checkpoint_attention"
_PROBE = 987654321  # a layer index no rename pattern spells out: where it lands in the saved name is the layer index


def saved_name_function(model: nn.Module) -> Callable[[str], str]:
    """The name `model`'s ``save_pretrained`` writes a tensor under (the one transformers loads it from)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError as exc:  # guarded: the function save_pretrained itself calls
        raise UpstreamStructureError(f"transformers has no core_model_loading.revert_weight_conversion ({exc}); "
                                     "gated_patch cannot tell which names a checkpoint holds. Install a supported "
                                     "transformers.") from None

    def saved_name(name: str) -> str:
        try:
            (saved,) = revert_weight_conversion(model, {name: torch.empty(0, device="meta")})
        except Exception as exc:  # noqa: BLE001 - a conversion that takes this tensor apart: no single saved name
            raise GatedCheckpointError(f"transformers saves {type(model).__name__}'s tensor {name} converted, not "
                                       f"renamed ({type(exc).__name__}: {exc}); gated_patch cannot place gates "
                                       "there.") from None
        return saved

    return saved_name


def checkpoint_attention(model: nn.Module, decoder_layers: str, attention: str, layers: Iterable[int]) -> str | None:
    """``"<path>.{}.<attention>"``, a gated attention module as `model`'s checkpoint names it (`layers`: the gated
    layer indices, checked), or None where that is its module path."""
    saved_name, module_path = saved_name_function(model), f"{decoder_layers}.{{}}.{attention}"
    suffix = f".{GATE_MODULE_NAME}.weight"
    probe = saved_name(module_path.format(_PROBE) + suffix)
    if not probe.endswith(suffix) or probe.count(str(_PROBE)) != 1:
        raise GatedCheckpointError(f"transformers saves {type(model).__name__}'s gate {module_path.format(_PROBE)}"
                                   f"{suffix} as {probe}; gated_patch cannot tell where its gates are in the files.")
    template = probe[:-len(suffix)].replace(str(_PROBE), "{}")
    for index in layers:
        if saved_name(module_path.format(index) + suffix) != template.format(index) + suffix:
            raise GatedCheckpointError(f"transformers saves {type(model).__name__}'s layer {index} where no single "
                                       f"path template ({template}) puts it; gated_patch cannot record its gates.")
    return None if template == module_path else template
