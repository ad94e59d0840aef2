"""What the attention output gate costs: gated vs unpatched models, measured in one process with interleaved runs.

Workloads (each: several repetitions, every variant once per repetition, the variant order rotated between
repetitions, medians reported):
  prefill   forward over ``batch x prefill_len`` tokens, logits for every token (batch sizes from --prefill-batches)
  decode    greedy decoding with the KV cache: --decode-tokens single-token steps after a --decode-prompt prefill
            (the prefill is not timed), interleaved token by token across the variants; reported as tokens/s and as
            the paired-step ratio (median over rounds of gated step / unpatched step of the same round)
  decode_compiled  (--compile-decode) the same with a static KV cache and torch.compile (inductor)
  train     forward + backward with a LM loss, ``train_batch x train_len`` tokens; full training (every parameter
            trainable) and, for gated variants, gate-only training (only the gate parameters trainable)
  memory    peak CPU memory allocated by one prefill (largest batch) and one training step, above what was allocated
            before the step (torch profiler's CPU allocator accounting), plus the parameter bytes

Variants: unpatched; elementwise / headwise gates reading the hidden states (the paper's G1), unfused and fused
(`gated_patch.fuse_gates`: query and gate from one GEMM); elementwise / headwise gates reading the attention output.
Fused variants are inference-only (training runs unfused by design), so they are not timed in ``train``. Each
variant is its own model sharing the base model's weight tensors (`Siblings`).

Beside each measured ratio the script prints the ratio of matmul FLOPs counted from the shapes (projections, the
gate, attention scores and values with a causal mask, the LM head; x3 for forward + backward; gate-only backward
without the non-gate weight gradients).

Times: wall clock (``time.perf_counter``) and process CPU time (``time.process_time``). On a machine shared with
other jobs, wall time also counts the time the process waited for a core; with one intra-op thread
(``--threads 1``, the default) CPU time is the work done and is the steadier of the two, so ratios are reported
for both and the CPU-time ratio is the headline.

Quick run:   python benchmarks/gate_cost.py --quick
README runs: see benchmarks/README.md for the commands, the settings and the results; --breakdown and --profile
             replace the timing by an in-situ per-layer breakdown and a torch.profiler table of decode steps.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from typing import Callable, Optional

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler's start/stop lines out of the output

import torch  # noqa: E402
from tqdm import tqdm
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, StaticCache

import gated_patch as gp
from gated_patch.core.attention import GatedAttentionMixin

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "gate_cost.json")

TINY_CONFIG = dict(  # "tiny": a small Llama where per-op overhead, not arithmetic, dominates
    vocab_size=1024,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


@dataclass(frozen=True)
class Variant:
    name: str
    gate: Optional[gp.GateConfig] = None
    fused: bool = False

    @property
    def trainable(self) -> bool:
        return not self.fused


VARIANTS = (
    Variant("unpatched"),
    Variant("elementwise/hidden", gp.GateConfig(granularity="elementwise", gate_input="hidden_states")),
    Variant("elementwise/hidden+fused", gp.GateConfig(granularity="elementwise", gate_input="hidden_states"), True),
    Variant("headwise/hidden", gp.GateConfig(granularity="headwise", gate_input="hidden_states")),
    Variant("headwise/hidden+fused", gp.GateConfig(granularity="headwise", gate_input="hidden_states"), True),
    Variant("elementwise/attn_out", gp.GateConfig(granularity="elementwise", gate_input="attn_output")),
    Variant("headwise/attn_out", gp.GateConfig(granularity="headwise", gate_input="attn_output")),
)


# --- FLOPs counted from the shapes ------------------------------------------------------------------------------


def _shape(config):
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.hidden_size, heads, config.num_key_value_heads, head_dim, config.intermediate_size


def gate_flops_per_token(config, gate: Optional[gp.GateConfig]) -> float:
    """Matmul FLOPs of the gate projection, per token, summed over the gated layers."""
    if gate is None:
        return 0.0
    hidden, heads, _, head_dim, _ = _shape(config)
    fan_in = hidden if gate.gate_input == "hidden_states" else heads * head_dim
    fan_out = heads * head_dim if gate.granularity == "elementwise" else heads
    return 2.0 * fan_in * fan_out * len(gate.layer_indices(config.num_hidden_layers))


def base_flops(config, tokens_per_sequence: int, batch: int, context_before: int = 0, logits: bool = True) -> float:
    """Matmul FLOPs of one unpatched forward over `batch` sequences of `tokens_per_sequence` new tokens that attend
    to `context_before` cached tokens plus themselves (causal)."""
    hidden, heads, kv_heads, head_dim, intermediate = _shape(config)
    per_token_layer = 2.0 * hidden * (2 * heads * head_dim + 2 * kv_heads * head_dim) + 2.0 * 3 * hidden * intermediate
    # attention: q.k and p.v over the keys each token sees (causal)
    keys_seen = sum(context_before + i + 1 for i in range(tokens_per_sequence))
    attention_layer = 2.0 * 2 * heads * head_dim * keys_seen
    layers = config.num_hidden_layers
    total = batch * (tokens_per_sequence * per_token_layer * layers + attention_layer * layers)
    if logits:
        total += batch * tokens_per_sequence * 2.0 * hidden * config.vocab_size
    return total


def flop_ratio(config, gate, workload: str, *, tokens: int, batch: int = 1, context: int = 0, gate_only=False):
    base = base_flops(config, tokens, batch, context)
    extra = gate_flops_per_token(config, gate) * tokens * batch
    if workload != "train":
        return (base + extra) / base
    full_base = 3 * base
    if not gate_only:
        return 3 * (base + extra) / full_base
    # gate-only: forward, input gradients everywhere (~ one more forward), weight gradients of the gates only
    return (2 * (base + extra) + extra) / full_base


# --- measurement ----------------------------------------------------------------------------------------------------


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _prefill(model, input_ids):
    with torch.inference_mode():
        model(input_ids).logits


class _Decoder:
    """Greedy decoding with the KV cache, one token per `step()`; `start()` runs the (untimed) prompt prefill."""

    def __init__(self, model, prompt):
        self.model, self.prompt = model, prompt

    def start(self):
        with torch.inference_mode():
            self.cache = DynamicCache(config=self.model.config)
            logits = self.model(self.prompt, past_key_values=self.cache, use_cache=True).logits
            self.token = logits[:, -1:].argmax(-1)

    def step(self):
        with torch.inference_mode():
            logits = self.model(self.token, past_key_values=self.cache, use_cache=True).logits
            self.token = logits[:, -1:].argmax(-1)


class _CompiledDecoder(_Decoder):
    """Greedy decoding with a static KV cache and the model's forward compiled by ``torch.compile`` (inductor). The
    constructor compiles (one prompt prefill and one step); the cache is created once and reset by `start()`, so
    later runs reuse the compiled graph."""

    def __init__(self, model, prompt, max_len: int):
        super().__init__(model, prompt)
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.forward = torch.compile(model.forward, dynamic=False)
        self.start()
        self.step()

    def start(self):
        with torch.inference_mode():
            self.cache.reset()
            length = self.prompt.shape[1]
            positions = torch.arange(length)
            logits = self.model(self.prompt, past_key_values=self.cache, use_cache=True, cache_position=positions).logits
            self.token, self.position = logits[:, -1:].argmax(-1), length

    def step(self):
        with torch.inference_mode():
            positions = torch.tensor([self.position])
            logits = self.forward(self.token, past_key_values=self.cache, use_cache=True, cache_position=positions).logits
            self.token, self.position = logits[:, -1:].argmax(-1), self.position + 1


def _decode_samples(decoders, args, progress) -> dict:
    """Interleaved token by token: in every round each variant decodes its next token (the order rotates between
    rounds), so all variants see the same machine load. Samples are single decode steps; a run's time is the sum of
    its `args.decode_tokens` steps."""
    samples = {v.name: {"wall": [], "cpu": [], "run_wall": [], "run_cpu": []} for v, _ in decoders}
    for rep in range(args.warmup + args.decode_reps):
        for _, decoder in decoders:
            decoder.start()
        totals = {v.name: [0.0, 0.0] for v, _ in decoders}
        for index in range(args.decode_tokens):
            shift = (rep * args.decode_tokens + index) % len(decoders)
            for v, decoder in decoders[shift:] + decoders[:shift]:
                wall, cpu = _timed(decoder.step)
                totals[v.name][0] += wall
                totals[v.name][1] += cpu
                if rep >= args.warmup:
                    samples[v.name]["wall"].append(wall)
                    samples[v.name]["cpu"].append(cpu)
        for v, _ in decoders:
            if rep >= args.warmup:
                samples[v.name]["run_wall"].append(totals[v.name][0])
                samples[v.name]["run_cpu"].append(totals[v.name][1])
            progress.update(1)
    return samples


def _timed_prefill(model, input_ids):
    return _timed(lambda: _prefill(model, input_ids))


def _set_trainable(model, variant: Variant, gate_only: bool) -> None:
    for name, parameter in model.named_parameters():
        parameter.requires_grad_((not gate_only) or (".attn_gate." in f".{name}"))


def _train_step(model, input_ids):
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()


def _zero_grad(model):
    for parameter in model.parameters():
        parameter.grad = None


def _peak_allocated(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by the CPU allocator while `fn` runs, above the allocation level at its start."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    events = [e["args"] for e in events if e["args"].get("Device Type", 0) == 0]
    if not events:
        return 0
    first = events[0]
    start = first["Total Allocated"] - first["Bytes"]
    return int(max(e["Total Allocated"] for e in events) - start)


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


class Siblings:
    """One model per variant, all sharing the base model's parameter and buffer tensors (``copy.deepcopy`` with a memo
    that maps every tensor to itself), then patched (and fused) per variant with a trained-looking gate (identity init
    plus small noise, the same values for every variant of one granularity and gate input). Every variant therefore
    reads the same weight tensors at the same addresses: separate copies of a model were up to 13% apart in decode
    speed on the test machine (memory placement), far more than the gate costs. Fused variants get their own copy of
    the query projection weights, since fusing moves them into the fused matrix."""

    def __init__(self, model, variants, seed: int):
        model.eval()
        shared = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
        self.models = {}
        for variant in variants:
            if variant.gate is None:
                self.models[variant.name] = model
                continue
            sibling = copy.deepcopy(model, dict(shared))
            gp.patch_model(sibling, variant.gate)
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():  # a trained-looking gate (identity init + small noise), not an all-zero matrix
                for _, parameter in gp.gate_parameters(sibling):
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
            if variant.fused:
                query_name = gp.get_model_family(sibling.config.model_type).query_projection
                for module in sibling.modules():
                    if isinstance(module, GatedAttentionMixin):
                        query = module._modules[query_name]
                        query.weight = torch.nn.Parameter(query.weight.detach().clone(), requires_grad=False)
                gp.fuse_gates(sibling)
            self.models[variant.name] = sibling.eval()

    def activate(self, variant: Variant):
        return self.models[variant.name]


def run_model(label, base, variants, args, progress) -> dict:
    config = base.config
    generator = torch.Generator().manual_seed(args.seed)
    vocab = config.vocab_size
    siblings = Siblings(base, variants, args.seed)
    workloads = []  # (key, variant, fn -> (wall, cpu))
    for batch in args.prefill_batches:
        ids = torch.randint(3, vocab, (batch, args.prefill_len), generator=generator)
        for v in variants:
            workloads.append((f"prefill_b{batch}", v, lambda v=v, ids=ids: _timed_prefill(siblings.activate(v), ids)))
    if args.train_batch:
        ids = torch.randint(3, vocab, (args.train_batch, args.train_len), generator=generator)
        for v in variants:
            if not v.trainable:
                continue
            modes = (False,) if v.gate is None else (False, True)
            for gate_only in modes:
                key = "train_gate_only" if gate_only else "train_full"

                def step(v=v, gate_only=gate_only, ids=ids):
                    m = siblings.activate(v)
                    m.train()
                    _set_trainable(m, v, gate_only)
                    try:
                        return _timed(lambda: _train_step(m, ids))
                    finally:
                        _zero_grad(m)
                        _set_trainable(m, v, False)
                        m.eval()

                workloads.append((key, v, step))

    # Peak memory first: these runs also warm up the allocator and caches for the timed runs below.
    memory_result = None
    if args.memory:
        memory = {}
        biggest = max(args.prefill_batches) if args.prefill_batches else None
        for v in variants:
            m = siblings.activate(v)
            row = {"param_bytes": _param_bytes(m)}
            if biggest:
                ids = torch.randint(3, vocab, (biggest, args.prefill_len), generator=generator)
                row[f"prefill_b{biggest}_peak_bytes"] = _peak_allocated(lambda: _prefill(m, ids))
            if args.train_batch and v.trainable:
                ids = torch.randint(3, vocab, (args.train_batch, args.train_len), generator=generator)
                for gate_only in ((False,) if v.gate is None else (False, True)):
                    m.train()
                    _set_trainable(m, v, gate_only)
                    peak = _peak_allocated(lambda: _train_step(m, ids))
                    _zero_grad(m)
                    _set_trainable(m, v, False)
                    m.eval()
                    row["train_gate_only_peak_bytes" if gate_only else "train_full_peak_bytes"] = peak
            memory[v.name] = row
            progress.update(1)
        memory_result = memory
    keys = list(dict.fromkeys(k for k, _, _ in workloads))
    samples: dict = {k: {} for k in keys}
    if args.decode_tokens:
        prompt = torch.randint(3, vocab, (1, args.decode_prompt), generator=generator)
        decoders = [(v, _Decoder(siblings.activate(v), prompt)) for v in variants]
        samples["decode"] = _decode_samples(decoders, args, progress)
        if args.compile_decode:
            torch._dynamo.config.fail_on_recompile_limit_hit = True  # never time a silent fallback to eager
            compiled = [v for v in variants if v.name in args.compile_variants]
            max_len = args.decode_prompt + args.decode_tokens + 1
            decoders = [(v, _CompiledDecoder(siblings.activate(v), prompt, max_len)) for v in tqdm(compiled, desc="compiling")]
            samples["decode_compiled"] = _decode_samples(decoders, args, progress)
    for key in keys:
        group = [(v, fn) for k, v, fn in workloads if k == key]
        for _ in range(args.warmup):  # warm-up (allocator, caches), not recorded
            for v, fn in group:
                fn()
                progress.update(1)
        heavy = key.startswith("train") or (key.startswith("prefill_b") and int(key[len("prefill_b"):]) > 1)
        for rep in range(args.heavy_reps if heavy else args.reps):
            shift = rep % len(group)
            for v, fn in group[shift:] + group[:shift]:
                wall, cpu = fn()
                samples[key].setdefault(v.name, {"wall": [], "cpu": []})
                samples[key][v.name]["wall"].append(wall)
                samples[key][v.name]["cpu"].append(cpu)
                progress.update(1)

    results = {"label": label, "params": {}, "workloads": {}}
    if memory_result is not None:
        results["memory"] = memory_result
    for v in variants:
        results["params"][v.name] = _param_bytes(siblings.activate(v))
    base_name = "unpatched"
    order = [k for k in samples if k.startswith("prefill")] + [
        k for k in ("decode", "decode_compiled", "train_full", "train_gate_only") if k in samples
    ]
    for key in order:
        entry = {}
        for name, s in samples[key].items():
            med_wall, med_cpu = statistics.median(s["wall"]), statistics.median(s["cpu"])
            if key.startswith("decode"):  # per-step medians, scaled to a run of decode_tokens steps
                med_wall, med_cpu = med_wall * args.decode_tokens, med_cpu * args.decode_tokens
            variant = next(v for v in variants if v.name == name)
            entry[name] = {
                "wall_s": s.get("run_wall", s["wall"]),
                "cpu_s": s.get("run_cpu", s["cpu"]),
                "min_cpu_s": min(s.get("run_cpu", s["cpu"])),
                "median_wall_s": med_wall,
                "median_cpu_s": med_cpu,
                "flop_ratio": _flop_ratio_for(config, variant, key, args),
            }
        # gate-only training is compared with unpatched full training (and with the same variant's full training)
        ref = entry[base_name] if base_name in entry else results["workloads"]["train_full"][base_name]
        for name, e in entry.items():
            e["ratio_wall"] = e["median_wall_s"] / ref["median_wall_s"]
            e["ratio_cpu"] = e["median_cpu_s"] / ref["median_cpu_s"]
            e["ratio_min_cpu"] = e["min_cpu_s"] / ref["min_cpu_s"]
            if key == "train_gate_only":
                full = results["workloads"]["train_full"][name]
                e["vs_full_training_cpu"] = e["median_cpu_s"] / full["median_cpu_s"]
                e["vs_full_training_wall"] = e["median_wall_s"] / full["median_wall_s"]
            if key.startswith("decode"):
                # median over rounds of (this variant's step time / the unpatched step time in the same round)
                steps, ref_steps = samples[key][name]["cpu"], samples[key][base_name]["cpu"]
                e["paired_ratio_cpu"] = statistics.median(a / b for a, b in zip(steps, ref_steps))
                e["tokens_per_s_wall"] = args.decode_tokens / e["median_wall_s"]
                e["tokens_per_s_cpu"] = args.decode_tokens / e["median_cpu_s"]
        results["workloads"][key] = entry

    return results


def _flop_ratio_for(config, variant: Variant, key: str, args) -> float:
    if key.startswith("prefill_b"):
        return flop_ratio(config, variant.gate, "prefill", tokens=args.prefill_len, batch=int(key[len("prefill_b"):]))
    if key.startswith("decode"):
        # average over the decode steps: each step is one token attending to the prompt and what came before
        base = sum(base_flops(config, 1, 1, args.decode_prompt + i) for i in range(args.decode_tokens))
        extra = gate_flops_per_token(config, variant.gate) * args.decode_tokens
        return (base + extra) / base
    return flop_ratio(
        config, variant.gate, "train", tokens=args.train_len, batch=args.train_batch, gate_only=key == "train_gate_only"
    )


# --- profile ------------------------------------------------------------------------------------------------------


def profile_decode(label, base, variants, args) -> dict:
    """torch.profiler over `args.profile_steps` decode steps per variant: where the gated variants spend their extra
    time, by operator (self CPU time per step, calls per step)."""
    from torch.profiler import ProfilerActivity, profile

    siblings = Siblings(base, variants, args.seed)
    prompt = torch.randint(3, base.config.vocab_size, (1, args.decode_prompt), generator=torch.Generator().manual_seed(1))
    out = {}
    for v in variants:
        decoder = _Decoder(siblings.activate(v), prompt)
        decoder.start()
        for _ in range(3):
            decoder.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.profile_steps):
                decoder.step()
        ops = {}
        for event in prof.key_averages():
            ops[event.key] = {
                "calls_per_step": event.count / args.profile_steps,
                "self_cpu_us_per_step": event.self_cpu_time_total / args.profile_steps,
            }
        out[v.name] = {"ops": ops, "self_cpu_us_per_step": sum(o["self_cpu_us_per_step"] for o in ops.values())}
    return {"label": label, "steps": args.profile_steps, "variants": out}


def format_profile(profile_result: dict, top: int = 8) -> str:
    variants = profile_result["variants"]
    ref = variants["unpatched"]
    lines = [f"\n### decode-step profile: {profile_result['label']} ({profile_result['steps']} steps per variant)\n"]
    lines.append("| variant | self CPU / step | vs unpatched | operators with the largest extra self CPU / step (extra calls / step) |")
    lines.append("|---|---:|---:|---|")
    for name, v in variants.items():
        diffs = []
        for op, o in v["ops"].items():
            base = ref["ops"].get(op, {"calls_per_step": 0.0, "self_cpu_us_per_step": 0.0})
            diffs.append((o["self_cpu_us_per_step"] - base["self_cpu_us_per_step"], o["calls_per_step"] - base["calls_per_step"], op))
        diffs.sort(reverse=True)
        text = ", ".join(f"{op} {d:+.0f} us ({c:+.0f})" for d, c, op in diffs[:top] if d > 0) if name != "unpatched" else ""
        lines.append(
            f"| {name} | {v['self_cpu_us_per_step'] / 1e3:.2f} ms | {v['self_cpu_us_per_step'] / ref['self_cpu_us_per_step']:.3f} | {text} |"
        )
    return "\n".join(lines)


# --- per-layer breakdown ------------------------------------------------------------------------------------------


def _stage(upto: int):
    """A truncated copy of the gate for the breakdown: the projection (1), + the activation (2), + the scale (3); the
    attention output is returned ungated. 0: the patch mechanism alone."""
    from gated_patch.core.gate import _constant, _project

    def gate_attention_output(attention, attn_output, hidden_states):
        config = attention.gate_config
        if upto >= 1:
            source = hidden_states if config.gate_input == "hidden_states" else attn_output
            scores = _project(attention._modules["attn_gate"], source)
            if upto >= 2:
                scores = torch.sigmoid(scores)
            if upto >= 3:
                scores = scores * _constant(config.output_scale, scores)
        return attn_output

    return gate_attention_output


def _previous_gate(attention, attn_output, hidden_states):
    """The full gate as gated_patch computed it before the decode-time changes (commit e4a34a1): the gate projection
    through the module call and the scale as a Python float. For the breakdown's before/after row only."""
    config = attention.gate_config
    source = hidden_states if config.gate_input == "hidden_states" else attn_output
    scores = torch.sigmoid(attention._modules["attn_gate"](source)) * config.output_scale
    if config.granularity == "elementwise":
        return attn_output * scores
    shape = attn_output.shape
    return (attn_output.view(*shape[:-1], attention.gate_num_heads, -1) * scores.unsqueeze(-1)).view(shape)


class _ModuleTimer:
    """Thread CPU time spent inside modules, summed per part, from a forward pre-hook placed before every other
    pre-hook and a forward hook. The output projection's time therefore includes the gating pre-hook."""

    def __init__(self):
        self.totals, self.handles = {}, []

    def add(self, part: str, module) -> None:
        self.totals.setdefault(part, 0.0)
        slot = f"_gate_cost_t0_{part}"

        def before(module, *args):
            module.__dict__[slot] = time.thread_time()

        def after(module, *args):
            self.totals[part] += time.thread_time() - module.__dict__[slot]

        self.handles.append(module.register_forward_pre_hook(before, prepend=True))
        self.handles.append(module.register_forward_hook(after))


def layer_breakdown(label, base, args) -> dict:
    """Where a gated layer's extra decode time goes, measured in situ: real decode steps, interleaved round-robin
    over the variants as in the timed run, with thread-CPU timers on every attention block, its query projection and
    its output projection (the gate runs in a pre-hook of the output projection, so its time lands there). Stages
    (mechanism only, + projection, + activation, + scale; then the full gate as shipped) are made by replacing the
    attention modules' `gate_attention_output` with a truncated gate (`_stage`): an experiment, not a mode. Measured
    in situ because the gate's small operations run between memory-bound GEMMs that evict the caches; the same
    operations timed in a loop on warm caches cost several times less (benchmarks/op_cost.py)."""
    setups = [("unpatched", Variant("unpatched"), None)]
    for granularity in ("headwise", "elementwise"):
        gate = gp.GateConfig(granularity=granularity)
        for upto, name in enumerate(("mechanism only", "+ gate projection", "+ sigmoid", "+ scale")):
            setups.append((f"{granularity}: {name}", Variant(f"{granularity}: {name}", gate), _stage(upto)))
        setups.append((f"{granularity}: full gate (as shipped)", Variant(f"{granularity}/hidden", gate), None))
        setups.append(
            (f"{granularity}: full gate, previous implementation", Variant(f"{granularity}: previous", gate), _previous_gate)
        )
        setups.append((f"{granularity}: fused", Variant(f"{granularity}/hidden+fused", gate, True), None))
    siblings = Siblings(base, [v for _, v, _ in setups], args.seed)
    timers = {}
    for name, variant, stage in setups:
        model = siblings.activate(variant)
        timer = timers[name] = _ModuleTimer()
        query_name = gp.get_model_family(model.config.model_type).query_projection
        for layer in model.model.layers:
            attention = layer.self_attn
            if stage is not None:
                attention.gate_attention_output = types.MethodType(stage, attention)
            timer.add("attention block", attention)
            timer.add("query projection", attention._modules[query_name])
            timer.add("output projection + gate", attention.o_proj)
    prompt = torch.randint(3, base.config.vocab_size, (1, args.decode_prompt), generator=torch.Generator().manual_seed(1))
    decoders = [(name, _Decoder(siblings.activate(variant), prompt)) for name, variant, _ in setups]
    steps = {name: [] for name, _, _ in setups}
    for rep in tqdm(range(args.warmup + args.reps), desc="layer breakdown"):
        for name, decoder in decoders:
            before = dict(timers[name].totals)
            decoder.start()  # the prompt prefill is not part of the breakdown
            timers[name].totals = before
        if rep == args.warmup:
            for timer in timers.values():
                timer.totals = dict.fromkeys(timer.totals, 0.0)
        for index in range(args.decode_tokens):
            shift = (rep * args.decode_tokens + index) % len(decoders)
            for name, decoder in decoders[shift:] + decoders[:shift]:
                start = time.thread_time()
                decoder.step()
                if rep >= args.warmup:
                    steps[name].append(time.thread_time() - start)
    for timer in timers.values():
        for handle in timer.handles:
            handle.remove()
    layers = base.config.num_hidden_layers
    count = len(steps["unpatched"])
    ref = timers["unpatched"].totals
    ref_steps = steps["unpatched"]
    rows = {}
    for name, _, _ in setups:
        totals = timers[name].totals
        rows[name] = {
            "step_ms": statistics.median(steps[name]) * 1e3,
            "paired_step_ratio": statistics.median(a / b for a, b in zip(steps[name], ref_steps)),
            **{f"{part} us/layer": totals[part] / count / layers * 1e6 for part in totals},
            **{f"{part} extra us/layer": (totals[part] - ref[part]) / count / layers * 1e6 for part in totals},
        }
    return {"label": label, "decode_steps": count, "layers": layers, "stages": rows}


def format_breakdown(result: dict) -> str:
    parts = ("attention block", "output projection + gate", "query projection")
    lines = [
        f"\n### in-situ per-layer breakdown: {result['label']} ({result['decode_steps']} interleaved decode steps per "
        f"row, thread CPU time, extra per layer and step vs unpatched)\n",
        "| stage | " + " | ".join(parts) + " | decode step (median) | step ratio (paired median) |",
        "|---|" + "---:|" * (len(parts) + 2),
    ]
    for name, row in result["stages"].items():
        cells = [f"{row[f'{part} extra us/layer']:+.1f} us" for part in parts]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['step_ms']:.1f} ms | {row['paired_step_ratio']:.3f} |")
    return "\n".join(lines)


# --- output ---------------------------------------------------------------------------------------------------------


def format_table(results: dict) -> str:
    lines = []
    for model in results["models"]:
        lines.append(f"\n### {model['label']}\n")
        lines.append("| workload | variant | median wall | median CPU | ratio (CPU) | ratio (wall) | FLOP ratio |")
        lines.append("|---|---|---:|---:|---:|---:|---:|")
        for key, entry in model["workloads"].items():
            for name, e in entry.items():
                extra = ""
                if key.startswith("decode"):
                    extra = f" ({e['tokens_per_s_cpu']:.1f} tok/s; paired-step ratio {e['paired_ratio_cpu']:.3f})"
                if key == "train_gate_only":
                    extra = f" ({e['vs_full_training_cpu']:.2f}x its full training)"
                lines.append(
                    f"| {key} | {name} | {e['median_wall_s'] * 1e3:.1f} ms | {e['median_cpu_s'] * 1e3:.1f} ms{extra} | "
                    f"{e['ratio_cpu']:.3f} | {e['ratio_wall']:.3f} | {e['flop_ratio']:.3f} |"
                )
        if "memory" in model:
            lines.append("")
            cols = sorted({c for row in model["memory"].values() for c in row})
            lines.append("| variant | " + " | ".join(c.replace("_bytes", " (MiB)") for c in cols) + " |")
            lines.append("|---|" + "---:|" * len(cols))
            for name, row in model["memory"].items():
                cells = [f"{row[c] / 2**20:.1f}" if c in row else "-" for c in cols]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        keys = list(model["workloads"])
        names = [n for n in model["workloads"][keys[0]] if n != "unpatched"]
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            xs, ys, fl = [], [], []
            for j, key in enumerate(keys):
                e = model["workloads"][key].get(name)
                if e is None:
                    continue
                xs.append(j + i * width)
                ys.append(e["ratio_cpu"])
                fl.append(e["flop_ratio"])
            ax.bar(xs, ys, width, label=name)
            ax.scatter(xs, fl, marker="_", color="black", s=120, zorder=3)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
        ax.set_xticklabels(keys, rotation=20)
        ax.set_ylabel("median CPU time, gated / unpatched")
        ax.set_title(f"{model['label'].split(' (')[0]} (black ticks: FLOP ratio)")
        low = min(min(e["ratio_cpu"] for e in w.values()) for w in model["workloads"].values())
        ax.set_ylim(max(0.0, low - 0.1), None)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _write_json(data, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,tiny", help="comma list of: smollm2, tiny")
    parser.add_argument("--variants", default=None, help="comma list of variant names (default: all)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per variant (prefill at batch 1)")
    parser.add_argument(
        "--heavy-reps", type=int, default=None, help="repetitions of prefill at batch > 1 and of training (default: --reps)"
    )
    parser.add_argument(
        "--decode-reps", type=int, default=None, help="decode runs per variant, each --decode-tokens interleaved steps "
        "(default: --reps); the median is over all steps"
    )
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--prefill-batches", default="1,8", help="comma list of batch sizes ('' to skip prefill)")
    parser.add_argument("--decode-tokens", type=int, default=128, help="0 to skip decode")
    parser.add_argument("--decode-prompt", type=int, default=32)
    parser.add_argument(
        "--compile-decode",
        action="store_true",
        help="also time decode with torch.compile (inductor, static KV cache; needs a C++ compiler; ~1 min of "
        "compilation per variant)",
    )
    parser.add_argument(
        "--compile-variants",
        default="unpatched,headwise/hidden,elementwise/hidden",
        help="comma list of the variants timed with --compile-decode",
    )
    parser.add_argument("--train-batch", type=int, default=8, help="0 to skip training")
    parser.add_argument("--train-len", type=int, default=256)
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory pass")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per variant and workload first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile", action="store_true", help="instead of timing: torch.profiler over decode steps, extra time by operator"
    )
    parser.add_argument("--profile-steps", type=int, default=20)
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="instead of timing: where a gated layer's extra decode time goes, in situ, by stage (--reps runs of "
        "--decode-tokens interleaved steps)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and 3 repetitions (a smoke run)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON path (a PNG plot is written beside it)")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.prefill_len, args.prefill_batches = 3, 64, "1,2"
        args.decode_tokens, args.decode_prompt, args.train_batch, args.train_len = 16, 8, 2, 32
    args.prefill_batches = [int(b) for b in args.prefill_batches.split(",") if b.strip()]
    args.heavy_reps = args.reps if args.heavy_reps is None else args.heavy_reps
    args.decode_reps = args.reps if args.decode_reps is None else args.decode_reps
    args.compile_variants = [n.strip() for n in args.compile_variants.split(",") if n.strip()]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    variants = VARIANTS
    if args.variants:
        wanted = [n.strip() for n in args.variants.split(",")]
        unknown = sorted(set(wanted) - {v.name for v in VARIANTS})
        if unknown:
            sys.exit(f"Unknown variants {unknown}; choose from {[v.name for v in VARIANTS]}.")
        variants = tuple(v for v in VARIANTS if v.name == "unpatched" or v.name in wanted)

    bases = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name == "smollm2":
            from gated_patch.default_model import default_model_dir

            model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
            bases.append(("SmolLM2-135M-Instruct", model))
        elif name == "tiny":
            model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY_CONFIG), dtype=torch.float32)
            bases.append(("tiny Llama (hidden 128, 4 layers, 4 heads / 2 KV heads, vocab 1024)", model))
        else:
            sys.exit(f"Unknown model {name!r}; choose from smollm2, tiny.")
    for _, model in bases:
        model.eval()

    n_train = sum((1 if v.gate is None else 2) for v in variants if v.trainable) if args.train_batch else 0
    light = sum(b <= 1 for b in args.prefill_batches)
    heavy = len(args.prefill_batches) - light
    per_model = (
        len(variants) * light * (args.reps + args.warmup)
        + (len(variants) * heavy + n_train) * (args.heavy_reps + args.warmup)
        + (len(variants) * (args.decode_reps + args.warmup) if args.decode_tokens else 0)
        + (len(args.compile_variants) * (args.decode_reps + args.warmup) if args.decode_tokens and args.compile_decode else 0)
        + (len(variants) if args.memory else 0)
    )
    total = len(bases) * per_model
    results = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "load_average_start": os.getloadavg(),
        },
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "models": [],
    }
    if args.breakdown:
        results["breakdowns"] = [layer_breakdown(label, base, args) for label, base in bases]
        _write_json(results, args.out)
        for b in results["breakdowns"]:
            print(format_breakdown(b))
        print(f"\nwrote {args.out}")
        return results
    if args.profile:
        results["profiles"] = [profile_decode(label, base, variants, args) for label, base in bases]
        _write_json(results, args.out)
        for p in results["profiles"]:
            print(format_profile(p))
        print(f"\nwrote {args.out}")
        return results
    with tqdm(total=total, desc="gate cost", unit="run") as progress:
        for label, base in bases:
            results["models"].append(run_model(label, base, variants, args, progress))
    results["machine"]["load_average_end"] = os.getloadavg()
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    _write_json(results, args.out)
    plot(results, os.path.splitext(args.out)[0] + ".png")
    print(format_table(results))
    print(f"\nwrote {args.out} and {os.path.splitext(args.out)[0] + '.png'}")
    return results


if __name__ == "__main__":
    main()
