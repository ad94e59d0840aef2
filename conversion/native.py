"""Export to a native transformers architecture that computes exactly the gated function: a gated Qwen3 as Qwen3.5.

transformers' ``qwen3_5_text`` (`Qwen3_5ForCausalLM`) with every layer full attention is a Qwen3 whose attention
output is multiplied by ``sigmoid(x @ W_gate.T + b_gate)``, the gate fused into ``q_proj`` per head as
``[query | gate]`` (the qwen3-next layout). A gated Qwen3 with a sigmoid gate on the hidden states maps onto it
exactly:

* gate rows interleaved per head into ``q_proj``; a headwise gate repeated over its head's ``head_dim`` rows;
* the output scale (2 for an identity-init gate) folded into ``o_proj`` (exact: a power of two); an ungated layer
  gets zero gate rows (``sigmoid(0) = 0.5``) and a scale of 2;
* RMSNorm weights stored as ``w - 1`` (Qwen3.5 norms compute ``x * (1 + w)``);
* a gate bias needs ``attention_bias``, which also gives ``k_proj``, ``v_proj`` and ``o_proj`` biases: zeros.

Plain transformers (no plugin, no remote code) and every engine that supports the architecture load the result.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from gated_patch.checkpoints.weights import DTYPES
from gated_patch.core.config import GateConfig
from gated_patch.core.errors import GatedCheckpointError
from gated_patch.core.gate import GATE_MODULE_NAME

from .layouts import QWEN3_NEXT, AttentionShape, fuse

QWEN3_5 = "qwen3_5"
NATIVE_LAYOUTS = (QWEN3_5,)
SOURCE_FAMILY, NATIVE_MODEL_TYPE, NATIVE_ARCHITECTURE = "qwen3", "qwen3_5_text", "Qwen3_5ForCausalLM"
_KEPT_CONFIG_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache",
    "tie_word_embeddings", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype",
    "transformers_version", "_name_or_path",
)

#: Qwen3.5's linear-attention sizes (transformers' defaults): llama.cpp's converter writes them into the GGUF's ``ssm``
#: entries, which its ``qwen35`` loader requires even where no layer has linear attention.
LINEAR_ATTENTION_SIZES = {"linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
                          "linear_num_key_heads": 16, "linear_num_value_heads": 32}


def check_native_export(family: str, gate: GateConfig, config: dict[str, Any], layout: str = QWEN3_5) -> None:
    """Refuse what has no exact `layout` form, with every reason."""
    problems = []
    if family != SOURCE_FAMILY:
        problems.append(f"the model is {family!r}; only a gated Qwen3 has an exact native form (no native transformers "
                        "architecture computes a gated Llama, Qwen2 or Mistral)")
    if gate.activation != "sigmoid":
        problems.append(f"activation={gate.activation!r} (Qwen3.5's gate is a sigmoid)")
    if gate.gate_input != "hidden_states":
        problems.append(f"gate_input={gate.gate_input!r} (Qwen3.5 computes the gate in q_proj, from the hidden states)")
    if gate.preactivation_offset != 0.0 or gate.output_scale not in (1.0, 2.0):
        problems.append(f"the gate computes {gate.output_scale:g} * sigmoid(xW + b + {gate.preactivation_offset:g}), which "
                        "no weight of Qwen3.5 can hold exactly")
    if config.get("attention_bias"):
        problems.append("the source has attention biases (attention_bias=true): vLLM's Qwen3.5 has no o_proj bias, so "
                        "the export would be served wrongly there")
    if config.get("use_sliding_window") or any(t != "full_attention" for t in config.get("layer_types") or ()):
        problems.append("the source uses sliding-window attention (the export has full-attention layers only)")
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"rope_parameters {rope} (only the default rotary embedding over the full head is checked exact)")
    if problems:
        raise GatedCheckpointError(f"Cannot export this gated model to the native {layout} layout exactly: "
                                   f"{'; '.join(problems)}. Keep the plugin layout (vLLM serves it with the plugin).")


def native_config(config: dict[str, Any], gate: GateConfig) -> dict[str, Any]:
    """The ``qwen3_5_text`` config.json of an exported gated Qwen3 `config`."""
    out = {key: config[key] for key in _KEPT_CONFIG_KEYS if key in config}
    rope = {"rope_type": "default", **(config.get("rope_parameters") or {}), "partial_rotary_factor": 1.0}
    if "rope_theta" in config and "rope_theta" not in rope:
        rope["rope_theta"] = config["rope_theta"]
    out.update(model_type=NATIVE_MODEL_TYPE, architectures=[NATIVE_ARCHITECTURE], rope_parameters=rope,
               layer_types=["full_attention"] * config["num_hidden_layers"], attention_bias=gate.bias,
               qkv_bias=gate.bias)  # vLLM's Qwen3.5 reads qkv_bias, not attention_bias
    # Every layer full attention wherever the export is read: transformers reads layer_types; llama.cpp's converter,
    # mlx-lm and SGLang read full_attention_interval (their default, 4, would make three layers in four linear
    # attention). llama.cpp's converter also requires the linear-attention sizes, which no layer here uses.
    out.update(full_attention_interval=1, **LINEAR_ATTENTION_SIZES)
    return out


def is_norm_weight(name: str) -> bool:
    return name.endswith("norm.weight")


def native_norm(weight: torch.Tensor) -> torch.Tensor:
    return weight - 1


def native_query(query: torch.Tensor, gate: torch.Tensor | None, granularity: str, shape: AttentionShape) -> torch.Tensor:
    """``q_proj`` weight ``[heads * head_dim, in]`` or bias ``[heads * head_dim]`` and the gate's (None: no gate, zeros)
    as Qwen3.5's fused ``q_proj``."""
    if gate is None:
        gate = torch.zeros_like(query)
    elif granularity == "headwise":
        gate = gate.repeat_interleave(shape.head_dim, dim=0)
    return fuse(query, gate.to(query.dtype), QWEN3_NEXT, "elementwise", shape)


def layer_scale(gate: GateConfig, gated: bool) -> float:
    """What ``o_proj`` is multiplied by: the gate's output scale, or 2 for a layer whose zero gate gives 0.5."""
    return gate.output_scale if gated else 2.0


def native_tensor_plan(gate: GateConfig, shape: AttentionShape, num_layers: int, prefix: Callable[[int], str],
                       names: dict[str, tuple[str, tuple]], read: Callable[[str], torch.Tensor]):
    """``(replaced, dropped, added)`` for the converter: source tensor -> output tensors, dropped source tensors, new
    tensors; each output a ``(name, dtype, shape, producer)``. `prefix(i)`: layer i's attention module path."""
    replaced, dropped, added = {}, set(), []
    gated_layers = set(gate.layer_indices(num_layers))
    fused_rows = 2 * shape.num_heads * shape.head_dim
    for name, (dtype, tensor_shape) in names.items():
        if is_norm_weight(name):
            replaced[name] = [(name, dtype, tensor_shape, lambda n=name: native_norm(read(n)))]
    for i in range(num_layers):
        attention, gated = prefix(i), i in gated_layers
        gate_weight, gate_bias = f"{attention}.{GATE_MODULE_NAME}.weight", f"{attention}.{GATE_MODULE_NAME}.bias"
        dropped.update(n for n in (gate_weight, gate_bias) if n in names)
        q_weight, (dtype, (_, in_features)) = f"{attention}.q_proj.weight", names[f"{attention}.q_proj.weight"]
        replaced[q_weight] = [(q_weight, dtype, (fused_rows, in_features), lambda q=q_weight, g=gate_weight, on=gated:
                               native_query(read(q), read(g) if on else None, gate.granularity, shape))]
        scale = layer_scale(gate, gated)
        if scale != 1.0:
            o_weight = f"{attention}.o_proj.weight"
            replaced[o_weight] = [(o_weight, *names[o_weight], lambda n=o_weight, s=scale: read(n) * s)]
        if gate.bias:
            rows = {"q_proj": fused_rows, "k_proj": shape.num_kv_heads * shape.head_dim,
                    "v_proj": shape.num_kv_heads * shape.head_dim, "o_proj": shape.hidden_size}
            for module, count in rows.items():
                bias_name = f"{attention}.{module}.bias"
                if module == "q_proj":
                    def produce(g=gate_bias, on=gated, d=dtype):
                        query = torch.zeros(shape.num_heads * shape.head_dim, dtype=DTYPES[d])
                        return native_query(query, read(g) if on else None, gate.granularity, shape)
                else:
                    def produce(count=count, d=dtype):
                        return torch.zeros(count, dtype=DTYPES[d])
                added.append((bias_name, dtype, (count,), produce))
    return replaced, dropped, added
