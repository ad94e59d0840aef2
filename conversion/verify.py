"""``--verify``: check a written conversion against its source, one way per kind of conversion."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import CONFIG_NAME

from gated_patch import gate_parameters
from gated_patch.checkpoints.format import config_object
from gated_patch.core.errors import GatedCheckpointError
from gated_patch.core.gate import GATE_MODULE_NAME

from . import layouts, native
from .plan import QUERY_PROJECTION, ConversionPlan, source_shards

VERIFY_PROMPT = "The Python language reference describes"


def verify_conversion(plan: ConversionPlan, out: Path) -> str:
    """Check the written checkpoint against its source; returns a one-line summary, raises on a mismatch.

    Plain source: every upstream tensor is unchanged and (identity gates) the logits on a prompt are equal.
    Native architecture: plain transformers' model of the result gives the gated model's logits.
    Fused layouts: converting the result back gives the source tensors bit for bit.
    """
    out = Path(out)
    if plan.source_layout == "plain":
        return _verify_added_gates(plan, out)
    if plan.target_layout in native.NATIVE_LAYOUTS:
        return _verify_native(plan, out)
    return _verify_round_trip(plan, out)


def _verify_added_gates(plan: ConversionPlan, out: Path) -> str:
    source_model = AutoModelForCausalLM.from_pretrained(plan.source).eval()
    result = AutoModelForCausalLM.from_pretrained(out).eval()
    source_state, result_state = source_model.state_dict(), result.state_dict()
    changed = [k for k in source_state if not torch.equal(source_state[k], result_state[k])]
    gates = {name for name, _ in gate_parameters(result)}  # the model's names; the plan's are the files' names
    if changed or set(result_state) - set(source_state) != gates or len(gates) != len(plan.gate_tensors):
        raise GatedCheckpointError(f"verify: {out} differs from {plan.source} in {changed[:5]}; please report this.")
    diff = _max_logit_diff(source_model, result, out)
    if plan.gate.init == "identity" and diff != 0.0:
        raise GatedCheckpointError(f"verify: identity gates changed the logits (max |diff| {diff:g}); please report this.")
    return f"verify: OK, upstream tensors identical, max |logit diff| on the prompt {diff:g} (init={plan.gate.init})"


def _verify_native(plan: ConversionPlan, out: Path) -> str:
    source_model = AutoModelForCausalLM.from_pretrained(plan.source).eval()
    result = AutoModelForCausalLM.from_pretrained(out).eval()
    diff = _max_logit_diff(source_model, result, out)
    if diff > 1e-5:
        raise GatedCheckpointError(f"verify: {type(result).__name__} differs from the gated model (max |logit diff| "
                                   f"{diff:g}); please report this.")
    return f"verify: OK, {type(result).__name__} reproduces the gated logits (max |diff| {diff:g})"


def _verify_round_trip(plan: ConversionPlan, out: Path) -> str:
    """Fused layouts: every source tensor comes back bit for bit through the inverse conversion."""
    back_layout = plan.source_layout if plan.target_layout == layouts.PLUGIN else layouts.PLUGIN
    shape = layouts.AttentionShape.from_config(config_object(out / CONFIG_NAME))
    out_shards, out_names = source_shards(out, allow_pickle=False)
    src_names = {name: shard for shard in plan.sources for name in shard.entries}  # the shards the plan read
    granularity = plan.gate.granularity
    layer_tensor = re.compile(rf"^{re.escape(plan.modules['decoder_layers'])}\.\d+\.{re.escape(plan.modules['attention'])}"
                              r"\.(\w+)\.(weight|bias)$")

    def read(names, name):
        return names[name].get(name)

    checked = 0
    for name in src_names:
        expected, match = read(src_names, name), layer_tensor.match(name)
        if back_layout == layouts.PLUGIN and match and match.group(1) == GATE_MODULE_NAME:
            continue  # checked together with q_proj below
        if match and match.group(1) == QUERY_PROJECTION:
            gate_name = name.replace(f".{QUERY_PROJECTION}.", f".{GATE_MODULE_NAME}.")
            if back_layout == layouts.PLUGIN:  # the result is fused: split it back
                query, gate_part = layouts.split_fused(read(out_names, name), plan.target_layout, granularity, shape)
                same = torch.equal(query, expected) and (
                    gate_name not in src_names or torch.equal(gate_part, read(src_names, gate_name)))
            else:  # the result has the plugin layout: fuse it back
                fused = layouts.fuse(read(out_names, name), read(out_names, gate_name), back_layout, granularity, shape)
                same = torch.equal(fused, expected)
        else:
            same = torch.equal(read(out_names, name), expected)
        if not same:
            raise GatedCheckpointError(f"verify: {name} does not round-trip exactly; please report this.")
        checked += 1
    for shard in out_shards:
        shard.close()
    return f"verify: OK, {checked} source tensors round-trip exactly through the {back_layout} layout"


def _max_logit_diff(source_model, result, out: Path) -> float:
    """max |logits difference| of two models on the verify prompt (tokenized with OUT's tokenizer, if it has one)."""
    ids = _prompt_ids(out, source_model.config.get_text_config().vocab_size)
    with torch.no_grad():
        return (source_model(ids).logits - result(ids).logits).abs().max().item()


def _prompt_ids(path: Path, vocab_size: int) -> torch.Tensor:
    try:
        ids = AutoTokenizer.from_pretrained(path)(VERIFY_PROMPT, return_tensors="pt").input_ids
    except Exception:  # noqa: BLE001 - no (loadable) tokenizer: a fixed token sequence still checks identity
        ids = None
    if ids is None or not ids.numel() or int(ids.max()) >= vocab_size:  # a tokenizer built with no files: no tokens
        ids = torch.arange(1, 17).remainder(vocab_size).unsqueeze(0)
    return ids
