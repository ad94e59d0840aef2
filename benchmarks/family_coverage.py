"""Which transformers causal-LM families gated_patch gates, checked on a tiny model of each.

For every model type in transformers' AutoModelForCausalLM mapping: build a tiny randomly initialised model from the
family's own config class, `patch_model` it with no registration, and record either the refusal message or these
checks (all float32, eager attention):

  identity    identity-init gates: max |logits - unpatched logits| <= 1e-5
  gate acts   non-zero gates change the logits, and the first gated layer's output projection receives exactly
              Y * gate(X) computed independently from the unpatched model's own Y and X
  cache       greedy generation with the KV cache equals generation without it
  plugin      save_pretrained writes the tensors the unpatched model's save_pretrained writes, under the same names
              (what vLLM and llama.cpp read), plus the gates; AutoModelForCausalLM.from_pretrained gives the patched
              class and equal logits
  remote      the same checkpoint in a process where gated_patch cannot be imported, trust_remote_code=True:
              logits within 1e-5 (transformers gives classes outside its own files its eager MoE kernels)
  peft        gate_only_config: one training step moves only gate tensors; the adapter saved and loaded back with
              load_gated_adapter onto a fresh base gives the same logits

A family is "supported" when every check passes. A check that fails is "wrong" (a bug: the tests fail on it); a
model that cannot be built from its default config at tiny size, or whose unpatched forward fails, is "not built".

    python benchmarks/family_coverage.py            # every family; writes docs/families.md and results JSON
    python benchmarks/family_coverage.py llama opt  # some families, print only
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from tqdm import tqdm
from transformers import CONFIG_MAPPING, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging

import gated_patch as gp
from gated_patch.core.gate import is_gate_name

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "families.md"
RESULTS = ROOT / "benchmarks" / "results" / "family_coverage.json"
CHECKS = ("identity", "gate acts", "cache", "plugin", "remote", "peft")
SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=128, max_position_embeddings=256, moe_intermediate_size=32, num_experts=4,
             num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=32,
             d_model=64, n_head=4, n_layer=2, n_embd=64, num_layers=2, ffn_dim=96, decoder_layers=2,
             decoder_attention_heads=4, decoder_ffn_dim=96, encoder_layers=2, encoder_attention_heads=4,
             encoder_ffn_dim=96, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
             v_head_dim=16, image_size=32, patch_size=8, vision_layers=2, word_embed_proj_dim=64,
             rotary_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
IDS = [[1, 5, 7, 9, 11, 13, 17, 3, 4, 5, 6, 7]]
#: Hybrids whose default config has no softmax-attention layer: one layer of each kind.
LAYER_KINDS = {"granitemoehybrid": {"layer_types": ["mamba", "attention"], "num_hidden_layers": 2}}


def _fields(config_class: type) -> set[str]:
    fields = getattr(config_class, "__dataclass_fields__", None)
    if fields:
        return set(fields)
    import inspect

    return set(inspect.signature(config_class.__init__).parameters)


def tiny_config(model_type: str):
    """The family's config class with small sizes passed to its constructor (sub-configs too), so every derived
    field (layer types, head sizes) is computed for the small model."""
    config_class = CONFIG_MAPPING[model_type]
    default = config_class()
    kwargs = _sized(config_class, default)
    for name in getattr(default, "sub_configs", None) or {}:
        sub = getattr(default, name, None)
        if hasattr(sub, "to_dict"):
            kwargs[name] = {**sub.to_dict(), **_sized(type(sub), sub)}
    return config_class(**kwargs)


def _sized(config_class: type, default) -> dict:
    """Small sizes for the fields `config_class` has. A hybrid keeps one layer of each kind its default config has
    (attention among them), so that its tiny model has the layers the gate must find and those it must leave alone."""
    fields = _fields(config_class)
    kwargs = {key: value for key, value in SIZES.items() if key in fields}
    if "qk_rope_head_dim" in fields:  # multi-head latent attention: rope over qk_rope_head_dim, keys for every head
        kwargs.update(head_dim=SIZES["qk_rope_head_dim"], num_key_value_heads=SIZES["num_attention_heads"])
    for field in ("layer_types", "layers_block_type"):
        layer_types = getattr(default, field, None)
        if isinstance(layer_types, (list, tuple)) and field in fields:
            kinds = list(dict.fromkeys(layer_types))
            count = max(SIZES["num_hidden_layers"], len(kinds))
            kwargs.update({field: (kinds * count)[:count], "num_hidden_layers": count})
    if "attn_layer_period" in fields:  # Jamba: attention at layer 1 of every 2
        kwargs.update(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1)
    if "attn_layer_indices" in fields:  # Bamba
        kwargs["attn_layer_indices"] = [1]
    return {**kwargs, **LAYER_KINDS.get(getattr(config_class, "model_type", None), {})}


def saved_tensor_names(path: Path) -> set[str]:
    """The tensor names of a checkpoint folder, as written (after transformers' conversions back to the saved names)."""
    names = set()
    for file in path.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            names.update(handle.keys())
    return names


@torch.no_grad()
def _logits(model, ids=None):
    return model(torch.tensor(ids or IDS)).logits.float()


def _randomize_gates(model, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in gp.gate_parameters(model):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def _first_attention(model, family):
    """The attention module of the first gated decoder layer (in a hybrid, the first with softmax attention)."""
    index = family.attention_layers[0] if family.attention_layers else 0
    return getattr(model.get_submodule(family.decoder_layers)[index], family.attention)


def _first_layer_io(model, family):
    """(X, Y) of the first gated layer's attention: its input and its output projection's input."""
    attention = _first_attention(model, family)
    seen = {}

    def hold_x(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    def hold_y(module, args):
        seen["y"] = args[0]

    hooks = [attention.register_forward_pre_hook(hold_x, with_kwargs=True),
             getattr(attention, family.output_projection).register_forward_pre_hook(hold_y)]
    try:
        _logits(model)
    finally:
        for hook in hooks:
            hook.remove()
    return seen["x"], seen["y"]


def _independent_gate(y, x, attention):
    """Y * gate(X), written out from the gate's weights (not the plugin's code)."""
    config, heads = attention.gate_config, attention.gate_num_heads
    gate = attention.attn_gate
    source = x if config.gate_input == "hidden_states" else y
    z = source @ gate.weight.T + (gate.bias if gate.bias is not None else 0)
    g = 2 * torch.sigmoid(z)  # identity-init sigmoid gate: scale 2, offset 0
    if config.granularity == "elementwise":
        return y * g
    return (y.reshape(*y.shape[:-1], heads, -1) * g.unsqueeze(-1)).reshape(y.shape)


def check_family(model_type: str, workdir: Path) -> dict:
    """One row of the table: the outcome and what each check measured."""
    row = {"model_type": model_type, "outcome": "not built", "checks": {}, "detail": ""}
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(model_type), attn_implementation="eager").eval()
    except Exception as exc:  # noqa: BLE001 - a default config that does not build at tiny size: not ours
        row["detail"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        return row
    row["model_class"] = type(model).__name__
    try:
        family = gp.family_for(model)  # a refusal needs no forward pass
    except gp.GatedPatchError as exc:
        row.update(outcome="refused", detail=" ".join(str(exc).split()).split(" gated_patch gates attention")[0])
        return row
    try:
        reference = _logits(model)
    except Exception as exc:  # noqa: BLE001
        row["detail"] = f"unpatched forward fails: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
        return row
    model.save_pretrained(workdir / f"{model_type}-unpatched")
    upstream_names = saved_tensor_names(workdir / f"{model_type}-unpatched")
    try:
        gp.patch_model(model, gp.GateConfig(granularity="headwise" if len(model_type) % 2 else "elementwise"))
    except gp.GatedPatchError as exc:
        row.update(outcome="refused", detail=" ".join(str(exc).split()).split(" gated_patch gates attention")[0])
        return row
    row["family"] = {"decoder_layers": family.decoder_layers, "attention": family.attention,
                     "output_projection": family.output_projection}
    checks, problems = row["checks"], []

    def check(name, passed, value=None):
        checks[name] = {"passed": bool(passed), **({"value": value} if value is not None else {})}
        if not passed:
            problems.append(name)

    try:
        identity = (_logits(model) - reference).abs().max().item()
        check("identity", identity <= 1e-5, identity)
        _randomize_gates(model)
        gated = _logits(model)
        x, y = _first_layer_io(model, family)
        attention = _first_attention(model, family)
        with torch.no_grad():
            unpatched_y = copy.deepcopy(model)
            gp.unpatch_model(unpatched_y)
            _, plain_y = _first_layer_io(unpatched_y, family)
            expected = _independent_gate(plain_y, x, attention)
        first_layer = (y - expected).abs().max().item()
        check("gate acts", (gated - reference).abs().max().item() > 1e-4 and first_layer <= 1e-5, first_layer)
        ids = torch.tensor(IDS)[:, :6]
        with torch.no_grad():
            cached = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
            uncached = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
        check("cache", torch.equal(cached, uncached))
        path = workdir / model_type
        model.save_pretrained(path)
        loaded = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
        plugin = (_logits(loaded) - gated).abs().max().item()
        saved = saved_tensor_names(path)  # the unpatched model's names, and one more for each gate tensor
        names = upstream_names <= saved and sorted(is_gate_name(n) for n in saved - upstream_names) == [True] * len(
            list(gp.gate_parameters(model)))
        check("plugin", type(loaded) is type(model) and plugin == 0.0 and names, plugin)
        torch.save(gated, path / "expected_logits.pt")
        row["checkpoint"] = str(path)
        _check_peft(model_type, path, gated, check)
    except Exception as exc:  # noqa: BLE001 - a crash inside a check is a wrong result, reported with the check
        failing = next((c for c in ("identity", "gate acts", "cache", "plugin", "peft") if c not in checks), "?")
        checks[failing] = {"passed": False}
        problems.append(failing)
        row["detail"] = f"{failing}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    row["outcome"] = "wrong" if problems else "pending remote"
    if problems and not row["detail"]:
        row["detail"] = "failed: " + ", ".join(problems)
    return row


def _check_peft(model_type, path, gated, check):
    base = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    peft_model = gp.get_gated_peft_model(base, gp.gate_only_config())
    before = {k: v.detach().clone() for k, v in peft_model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.tensor(IDS)
    peft_model.train()
    peft_model(ids, labels=ids).loss.backward()
    optimizer.step()
    peft_model.eval()
    moved = {k for k, v in peft_model.named_parameters() if not torch.equal(v.detach(), before[k])}
    if not all(torch.isfinite(v).all() for k, v in peft_model.named_parameters() if k in moved):
        raise ValueError("one training step of the tiny model gave non-finite gate values")
    tuned = _logits(peft_model)
    peft_model.save_pretrained(path / "adapter")
    fresh = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    gp.unpatch_model(fresh)  # an unpatched base: load_gated_adapter patches it as the adapter records
    loaded = gp.load_gated_adapter(fresh, path / "adapter").eval()
    difference = (_logits(loaded) - tuned).abs().max().item()
    check("peft", moved and all(".attn_gate." in k for k in moved) and difference == 0.0, difference)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys, warnings
    warnings.filterwarnings("ignore")

    class BlockGatedPatch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "gated_patch":
                raise ImportError("gated_patch is blocked")

    sys.meta_path.insert(0, BlockGatedPatch())
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.set_verbosity_error()
    results = {}
    for path in json.loads(sys.argv[1]):
        try:
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, attn_implementation="eager")
            with torch.no_grad():
                logits = model.eval()(torch.tensor(json.loads(sys.argv[2]))).logits.float()
            results[path] = (logits - torch.load(f"{path}/expected_logits.pt")).abs().max().item()
        except Exception as exc:
            results[path] = f"{type(exc).__name__}: {exc}"[:200]
    print("RESULTS", json.dumps(results))
    """
)


def check_remote(rows: list[dict], workdir: Path) -> None:
    """The `remote` check of every row still pending, in one process where gated_patch cannot be imported."""
    pending = [row for row in rows if row["outcome"] == "pending remote"]
    if not pending:
        return
    script = workdir / "remote_check.py"
    script.write_text(REMOTE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(workdir / "modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(script), json.dumps([row["checkpoint"] for row in pending]),
                           json.dumps(IDS)], cwd=workdir, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"the remote-code check process failed: {proc.stderr[-2000:]}")
    results = json.loads(proc.stdout.split("RESULTS ", 1)[1])
    for row in pending:
        value = results[row["checkpoint"]]
        passed = isinstance(value, float) and value <= 1e-5
        row["checks"]["remote"] = {"passed": passed, "value": value}
        row["outcome"] = "supported" if passed else "wrong"
        if not passed:
            row["detail"] = f"remote: {value}"


def run(model_types, progress: bool = True) -> list[dict]:
    warnings.filterwarnings("ignore")
    logging.set_verbosity_error()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            rows = [check_family(model_type, workdir) for model_type in tqdm(model_types, desc="families",
                                                                                 disable=not progress)]
            check_remote(rows, workdir)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (the tests) gets its threads back
    for row in rows:
        row.pop("checkpoint", None)
    return rows


def markdown(rows: list[dict], seconds: float) -> str:
    counts = {outcome: sum(row["outcome"] == outcome for row in rows) for outcome in ("supported", "refused", "not built",
                                                                                       "wrong")}
    lines = [
        "# Model families",
        "",
        "Which of transformers' causal-LM model types `gated_patch` gates with no registration, on a tiny model of "
        "each family (float32, eager attention). Generated by `python benchmarks/family_coverage.py` "
        f"(transformers {transformers.__version__}, torch {torch.__version__}, {platform.machine()} CPU, "
        f"{seconds:.0f} s); `tests/test_families.py` reruns it and fails if a family listed as supported breaks "
        "or any family gives a wrong result.",
        "",
        f"**{counts['supported']} supported, {counts['refused']} refused with a reason, {counts['not built']} not "
        f"built at tiny size from their default config, {counts['wrong']} wrong** (of {len(rows)}).",
        "",
        "Checks of a supported family: identity init reproduces the logits (max |diff| <= 1e-5); non-zero gates change "
        "them, and the first gated layer's output projection receives exactly `Y * gate(X)` computed independently; "
        "cached generation equals uncached; save_pretrained writes the unpatched model's tensor names plus the gates, and loading with the plugin gives equal logits; load without the plugin "
        "(`trust_remote_code=True`) gives logits within 1e-5; a gate-only PEFT adapter trains only gates and loads "
        "back exactly. Families not in the table's supported rows can still be registered "
        "(`gated_patch.register_model_type`) if their attention fits with other names.",
        "",
        "| model type | outcome | gated modules / reason |",
        "|---|---|---|",
    ]
    for row in rows:
        if row["outcome"] == "supported":
            f = row["family"]
            what = f"`{f['decoder_layers']}.*.{f['attention']}.{f['output_projection']}`"
        else:
            what = row["detail"].replace("|", "\\|")
        lines.append(f"| `{row['model_type']}` | {row['outcome']} | {what} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_types", nargs="*", help="default: every causal-LM model type")
    args = parser.parse_args(argv)
    model_types = args.model_types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    start = time.time()
    rows = run(model_types)
    seconds = time.time() - start
    for row in rows:
        print(f"{row['model_type']:28} {row['outcome']:10} {row['detail'][:110]}")
    if not args.model_types:
        from gated_patch.files import atomic_write, write_json

        atomic_write(DOC, markdown(rows, seconds))
        write_json(RESULTS, {"transformers": transformers.__version__, "torch": torch.__version__,
                             "seconds": seconds, "rows": rows})
        print(f"wrote {DOC} and {RESULTS}")
    return rows


if __name__ == "__main__":
    main()
