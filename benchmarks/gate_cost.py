"""What the attention output gate costs: gated vs unpatched models, timed in one process with interleaved runs.

Workloads (several repetitions each; every repetition runs each variant once, the order rotated between repetitions,
after --warmup untimed repetitions; medians reported):
  prefill          one forward over ``batch x --prefill-len`` tokens, logits for every token (--prefill-batches)
  decode           greedy decoding with a DynamicCache: --decode-tokens single-token steps after a --decode-prompt
                   prefill (not timed), interleaved token by token across the variants; also reported as the
                   paired-step ratio (median over rounds of gated step / unpatched step of the same round)
  decode_compiled  (--compile-decode) the same with a StaticCache and torch.compile (inductor); every variant is
                   compiled before timing, and a recompilation while timing is an error
  train_full       forward + backward with the LM loss over ``--train-batch x --train-len`` tokens, every parameter
                   trainable; train_gate_only: the same with only the gate parameters trainable (gated variants)
  memory           peak CPU memory allocated during one prefill (largest batch) and one training step, above the
                   level at its start (torch profiler accounting), plus the parameter bytes

Variants: unpatched, and elementwise / headwise gates reading the hidden states (the paper's G1) or the attention
output. Each variant is its own model sharing the base model's weight tensors (`Siblings`), with gates set to
identity init plus N(0, 0.02) noise.

Beside each measured ratio the script gives the ratio of matmul FLOPs counted from the shapes. Times are process CPU
time (the headline: with one intra-op thread it is the work done, and steadier than wall time on a shared machine)
and wall time. Only gated_patch's public API is used, so the script measures any version of the library that has it
(benchmarks/gate_cost_compare.py runs it against two source trees).

    python benchmarks/gate_cost.py --quick                 # smoke run (small sizes)
    python benchmarks/gate_cost.py --compile-decode        # every variant and workload (see benchmarks/README.md)
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable, Optional

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler's start/stop lines out of the output

import torch  # noqa: E402
import transformers  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache  # noqa: E402

import gated_patch as gp  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "gate_cost.json")
QUICK_OUT = os.path.join(HERE, "results", "gate_cost_quick.json")

TINY_CONFIG = dict(  # "tiny": a small Llama where per-operation overhead, not arithmetic, dominates
    vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
)
TINY_LABEL = "tiny Llama (hidden 128, 4 layers, 4 heads / 2 KV heads, vocab 1024)"

VARIANTS: dict[str, Optional[gp.GateConfig]] = {
    "unpatched": None,
    "elementwise/hidden": gp.GateConfig(granularity="elementwise", gate_input="hidden_states"),
    "headwise/hidden": gp.GateConfig(granularity="headwise", gate_input="hidden_states"),
    "elementwise/attn_out": gp.GateConfig(granularity="elementwise", gate_input="attn_output"),
    "headwise/attn_out": gp.GateConfig(granularity="headwise", gate_input="attn_output"),
}
#: Ablations, only when asked for by name: the same gate, its projection `nn.Linear.forward` under torch.compile too
#: (without the one-token matrix-vector product that `AttentionGateLinear.forward` gives compiled decode).
LINEAR_ABLATIONS = {"elementwise/hidden+linear": "elementwise/hidden", "headwise/hidden+linear": "headwise/hidden"}
VARIANTS.update({name: VARIANTS[gate] for name, gate in LINEAR_ABLATIONS.items()})
BASE = "unpatched"


def as_plain_linear(model) -> None:
    """Make every gate projection of `model` run `nn.Linear.forward` (compiled or not): the `LINEAR_ABLATIONS`."""
    from gated_patch.core.gate import AttentionGateLinear

    plain = type("PlainLinearGate", (AttentionGateLinear,), {"forward": torch.nn.Linear.forward})
    for module in model.modules():
        if type(module) is AttentionGateLinear:
            module.__class__ = plain


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
    layers = config.num_hidden_layers if gate.layers is None else len(gate.layers)
    return 2.0 * fan_in * fan_out * layers


def base_flops(config, tokens_per_sequence: int, batch: int, context_before: int = 0, logits: bool = True) -> float:
    """Matmul FLOPs of one unpatched forward over `batch` sequences of `tokens_per_sequence` new tokens that attend
    to `context_before` cached tokens plus themselves (causal): q/k/v/o, MLP, attention scores and values, LM head."""
    hidden, heads, kv_heads, head_dim, intermediate = _shape(config)
    per_token_layer = 2.0 * hidden * (2 * heads * head_dim + 2 * kv_heads * head_dim) + 2.0 * 3 * hidden * intermediate
    keys_seen = sum(context_before + i + 1 for i in range(tokens_per_sequence))
    attention_layer = 2.0 * 2 * heads * head_dim * keys_seen
    total = batch * config.num_hidden_layers * (tokens_per_sequence * per_token_layer + attention_layer)
    if logits:
        total += batch * tokens_per_sequence * 2.0 * hidden * config.vocab_size
    return total


def flop_ratio(config, gate, workload: str, *, tokens: int, batch: int = 1, context: int = 0, gate_only=False):
    """Gated / unpatched FLOPs of a forward ("prefill") or a training step ("train": forward + backward = 3 forwards;
    gate-only: forward, input gradients (~ one more forward) and the gate's weight gradients only)."""
    base = base_flops(config, tokens, batch, context)
    extra = gate_flops_per_token(config, gate) * tokens * batch
    if workload != "train":
        return (base + extra) / base
    if not gate_only:
        return 3 * (base + extra) / (3 * base)
    return (2 * (base + extra) + extra) / (3 * base)


def decode_flop_ratio(config, gate, *, prompt: int, tokens: int) -> float:
    """Gated / unpatched FLOPs of `tokens` decode steps, each one token attending to the prompt and what came before."""
    base = sum(base_flops(config, 1, 1, prompt + i) for i in range(tokens))
    return (base + gate_flops_per_token(config, gate) * tokens) / base


def workload_flop_ratio(config, gate, key: str, args) -> float:
    if key.startswith("prefill_b"):
        return flop_ratio(config, gate, "prefill", tokens=args.prefill_len, batch=int(key[len("prefill_b"):]))
    if key.startswith("decode"):
        return decode_flop_ratio(config, gate, prompt=args.decode_prompt, tokens=args.decode_tokens)
    return flop_ratio(config, gate, "train", tokens=args.train_len, batch=args.train_batch,
                      gate_only=key == "train_gate_only")


# --- the models -----------------------------------------------------------------------------------------------------


class Siblings:
    """One model per variant, all sharing the base model's parameter and buffer tensors: ``copy.deepcopy`` with a
    memo that maps every tensor to itself, then `gated_patch.patch_model`, then a trained-looking gate (identity init
    plus N(0, 0.02) noise, the same values for every variant of one gate shape). Every variant therefore reads the same
    weights at the same addresses: separate copies of one model can differ in speed by more than the gate costs
    (memory placement)."""

    def __init__(self, model, names, seed: int):
        model.eval()
        shared = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
        self.models = {}
        for name in names:
            gate = VARIANTS[name]
            if gate is None:
                self.models[name] = model
                continue
            sibling = copy.deepcopy(model, dict(shared))
            gp.patch_model(sibling, gate)
            if name in LINEAR_ABLATIONS:
                as_plain_linear(sibling)
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for _, parameter in gp.gate_parameters(sibling):
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
            self.models[name] = sibling.eval()

    def __getitem__(self, name):
        return self.models[name]


def _set_trainable(model, gate_only: bool) -> None:
    gates = {id(p) for _, p in gp.gate_parameters(model)} if gate_only else set()
    for parameter in model.parameters():
        parameter.requires_grad_(not gate_only or id(parameter) in gates)


def _train_step(model, ids, gate_only: bool) -> None:
    """One forward + backward; the model is left in eval mode, all parameters trainable, no gradients."""
    model.train()
    _set_trainable(model, gate_only)
    try:
        model(ids, labels=ids).loss.backward()
    finally:
        for parameter in model.parameters():
            parameter.grad = None
        _set_trainable(model, False)
        model.eval()


def _prefill(model, ids) -> None:
    with torch.inference_mode():
        model(ids).logits


_FORWARD_ARGS = inspect.signature(LlamaForCausalLM.forward).parameters


def _cache_kwargs(cache, positions=None) -> dict:
    """The KV cache argument under this transformers version's name (``cache``, formerly ``past_key_values``), and
    the cache positions where the forward still takes them (newer versions read them from the cache)."""
    kwargs = {"cache" if "cache" in _FORWARD_ARGS else "past_key_values": cache, "use_cache": True}
    if positions is not None and "cache_position" in _FORWARD_ARGS:
        kwargs["cache_position"] = positions
    return kwargs


class _Decoder:
    """Greedy decoding with a DynamicCache, one token per `step()`; `start()` runs the (untimed) prompt prefill."""

    def __init__(self, model, prompt):
        self.model, self.prompt = model, prompt

    def start(self):
        with torch.inference_mode():
            self.cache = DynamicCache(config=self.model.config)
            self.token = self.model(self.prompt, **_cache_kwargs(self.cache)).logits[:, -1:].argmax(-1)

    def step(self):
        with torch.inference_mode():
            self.token = self.model(self.token, **_cache_kwargs(self.cache)).logits[:, -1:].argmax(-1)


class _CompiledDecoder(_Decoder):
    """Greedy decoding with a StaticCache and ``torch.compile(model.forward)`` (inductor). The constructor compiles
    (one prompt prefill, eager, and one compiled step); `start()` resets the cache, so later runs reuse the graph."""

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
            logits = self.model(self.prompt, **_cache_kwargs(self.cache, torch.arange(length))).logits
            self.token, self.position = logits[:, -1:].argmax(-1), length

    def step(self):
        with torch.inference_mode():
            logits = self.forward(self.token, **_cache_kwargs(self.cache, torch.tensor([self.position]))).logits
            self.token, self.position = logits[:, -1:].argmax(-1), self.position + 1


# --- measurement ----------------------------------------------------------------------------------------------------


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _rotated(items: list, shift: int) -> list:
    shift %= len(items)
    return items[shift:] + items[:shift]


def time_interleaved(fns: dict, reps: int, warmup: int, progress) -> dict:
    """{name: {"wall": [...], "cpu": [...]}}: `warmup` untimed, then `reps` timed repetitions of every fn, each
    repetition running every fn once in an order rotated between repetitions."""
    samples = {name: {"wall": [], "cpu": []} for name in fns}
    for rep in range(warmup + reps):
        for name in _rotated(list(fns), rep):
            wall, cpu = _timed(fns[name])
            if rep >= warmup:
                samples[name]["wall"].append(wall)
                samples[name]["cpu"].append(cpu)
            progress.update(1)
    return samples


def time_decode(decoders: dict, tokens: int, reps: int, warmup: int, progress) -> dict:
    """Decode interleaved token by token: in every round each variant decodes its next token, the order rotating
    between rounds, so all variants see the same machine state. "wall"/"cpu" are single steps (paired by round
    across the variants); "run_wall"/"run_cpu" the totals of each run of `tokens` steps."""
    samples = {name: {"wall": [], "cpu": [], "run_wall": [], "run_cpu": []} for name in decoders}
    for rep in range(warmup + reps):
        for decoder in decoders.values():
            decoder.start()
        totals = {name: [0.0, 0.0] for name in decoders}
        for index in range(tokens):
            for name in _rotated(list(decoders), rep * tokens + index):
                wall, cpu = _timed(decoders[name].step)
                totals[name][0] += wall
                totals[name][1] += cpu
                if rep >= warmup:
                    samples[name]["wall"].append(wall)
                    samples[name]["cpu"].append(cpu)
        for name in decoders:
            if rep >= warmup:
                samples[name]["run_wall"].append(totals[name][0])
                samples[name]["run_cpu"].append(totals[name][1])
            progress.update(1)
    return samples


def peak_allocated(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by the CPU allocator while `fn` runs, above the allocation level at its start."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e["args"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    events = [e for e in events if e.get("Device Type", 0) == 0]
    if not events:
        return 0
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return int(max(e["Total Allocated"] for e in events) - start)


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _train_modes(name: str) -> tuple[bool, ...]:
    return (False,) if VARIANTS[name] is None else (False, True)


def measure_memory(siblings, names, args, generator, progress) -> dict:
    memory = {}
    vocab = siblings[BASE].config.vocab_size
    for name in names:
        model = siblings[name]
        row = memory[name] = {"param_bytes": _param_bytes(model)}
        if args.prefill_batches:
            batch = max(args.prefill_batches)
            ids = torch.randint(3, vocab, (batch, args.prefill_len), generator=generator)
            row[f"prefill_b{batch}_peak_bytes"] = peak_allocated(lambda: _prefill(model, ids))
        if args.train_batch:
            ids = torch.randint(3, vocab, (args.train_batch, args.train_len), generator=generator)
            for gate_only in _train_modes(name):
                key = "train_gate_only_peak_bytes" if gate_only else "train_full_peak_bytes"
                row[key] = peak_allocated(lambda: _train_step(model, ids, gate_only))
        progress.update(1)
    return memory


def run_model(label: str, base, names: list, args, progress) -> dict:
    """Every workload for one base model; returns its summary (with every sample)."""
    config = base.config
    generator = torch.Generator().manual_seed(args.seed)
    siblings = Siblings(base, names, args.seed)
    result = {"label": label, "params": {n: _param_bytes(siblings[n]) for n in names}, "workloads": {}}
    samples = {}
    elapsed = result["elapsed_s"] = {}  # wall time of each workload, warm-up and compilation included
    clock = time.perf_counter()

    def lap(key):
        nonlocal clock
        elapsed[key], clock = time.perf_counter() - clock, time.perf_counter()

    if args.memory:  # first: these runs also warm up the allocator and caches
        result["memory"] = measure_memory(siblings, names, args, generator, progress)
        lap("memory")
    for batch in args.prefill_batches:
        ids = torch.randint(3, config.vocab_size, (batch, args.prefill_len), generator=generator)
        fns = {n: (lambda m=siblings[n], ids=ids: _prefill(m, ids)) for n in names}
        samples[f"prefill_b{batch}"] = time_interleaved(fns, args.reps if batch <= 1 else args.heavy_reps,
                                                        args.warmup, progress)
        lap(f"prefill_b{batch}")
    if args.decode_tokens:
        prompt = torch.randint(3, config.vocab_size, (1, args.decode_prompt), generator=generator)
        decoders = {n: _Decoder(siblings[n], prompt) for n in names}
        samples["decode"] = time_decode(decoders, args.decode_tokens, args.decode_reps, args.warmup, progress)
        lap("decode")
        compiled = [n for n in names if n in args.compile_variants] if args.compile_decode else []
        if compiled:
            torch._dynamo.config.fail_on_recompile_limit_hit = True
            max_len = args.decode_prompt + args.decode_tokens + 1
            decoders = {}
            for n in compiled:
                progress.set_postfix_str(f"compiling {n}")
                decoders[n] = _CompiledDecoder(siblings[n], prompt, max_len)
            progress.set_postfix_str("")
            lap("compile")
            torch._dynamo.config.error_on_recompile = True  # never time a recompilation or a fallback to eager
            try:
                samples["decode_compiled"] = time_decode(decoders, args.decode_tokens, args.decode_reps, args.warmup,
                                                         progress)
            finally:
                torch._dynamo.config.error_on_recompile = False
            lap("decode_compiled")
    if args.train_batch:
        ids = torch.randint(3, config.vocab_size, (args.train_batch, args.train_len), generator=generator)
        for gate_only, key in ((False, "train_full"), (True, "train_gate_only")):
            fns = {n: (lambda m=siblings[n], g=gate_only: _train_step(m, ids, g))
                   for n in names if gate_only in _train_modes(n)}
            if fns:
                samples[key] = time_interleaved(fns, args.heavy_reps, args.warmup, progress)
                lap(key)
    for key, entry in samples.items():
        result["workloads"][key] = summarise(key, entry, config, args, result["workloads"])
    return result


def summarise(key: str, samples: dict, config, args, done: dict) -> dict:
    """Medians, ratios to unpatched (gate-only training: to unpatched full training, and to the same variant's full
    training) and FLOP ratios of one workload."""
    decode = key.startswith("decode")
    steps = args.decode_tokens if decode else 1
    entry = {}
    for name, s in samples.items():
        entry[name] = {  # decode: median single step x steps per run
            "median_wall_s": statistics.median(s["wall"]) * steps,
            "median_cpu_s": statistics.median(s["cpu"]) * steps,
            "wall_s": s.get("run_wall", s["wall"]),
            "cpu_s": s.get("run_cpu", s["cpu"]),
            "flop_ratio": workload_flop_ratio(config, VARIANTS[name], key, args),
        }
        if decode and args.record_steps:  # every step's time: large; the medians and paired ratio summarise them
            entry[name]["step_wall_s"], entry[name]["step_cpu_s"] = s["wall"], s["cpu"]
    ref = entry[BASE] if BASE in entry else done["train_full"][BASE]
    for name, e in entry.items():
        e["ratio_cpu"] = e["median_cpu_s"] / ref["median_cpu_s"]
        e["ratio_wall"] = e["median_wall_s"] / ref["median_wall_s"]
        if key == "train_gate_only":
            e["vs_full_training_cpu"] = e["median_cpu_s"] / done["train_full"][name]["median_cpu_s"]
        if decode:
            pairs = zip(samples[name]["cpu"], samples[BASE]["cpu"])
            e["paired_ratio_cpu"] = statistics.median(a / b for a, b in pairs)
            e["tokens_per_s_cpu"] = args.decode_tokens / e["median_cpu_s"]
            e["tokens_per_s_wall"] = args.decode_tokens / e["median_wall_s"]
    return entry


# --- output ---------------------------------------------------------------------------------------------------------


def format_table(results: dict) -> str:
    lines = []
    for model in results["models"]:
        lines += [f"\n### {model['label']}\n",
                  "| workload | variant | median wall | median CPU | ratio (CPU) | ratio (wall) | FLOP ratio |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for key, entry in model["workloads"].items():
            for name, e in entry.items():
                extra = ""
                if key.startswith("decode"):
                    extra = f" ({e['tokens_per_s_cpu']:.1f} tok/s; paired-step ratio {e['paired_ratio_cpu']:.3f})"
                if key == "train_gate_only":
                    extra = f" ({e['vs_full_training_cpu']:.2f}x its full training)"
                lines.append(f"| {key} | {name} | {e['median_wall_s'] * 1e3:.1f} ms | {e['median_cpu_s'] * 1e3:.1f} ms"
                             f"{extra} | {e['ratio_cpu']:.3f} | {e['ratio_wall']:.3f} | {e['flop_ratio']:.3f} |")
        if "memory" in model:
            cols = list(dict.fromkeys(c for row in model["memory"].values() for c in row))
            lines += ["", "| variant | " + " | ".join(c.replace("_bytes", " (MiB)") for c in cols) + " |",
                      "|---|" + "---:|" * len(cols)]
            for name, row in model["memory"].items():
                cells = [f"{row[c] / 2**20:.1f}" if c in row else "-" for c in cols]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    """CPU-time ratios per workload and gated variant as bars, FLOP ratios as black ticks; one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        keys = list(model["workloads"])
        names = list(dict.fromkeys(n for w in model["workloads"].values() for n in w if n != BASE))
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            points = [(j + i * width, model["workloads"][k][name]) for j, k in enumerate(keys)
                      if name in model["workloads"][k]]
            xs = [x for x, _ in points]
            ax.bar(xs, [e["ratio_cpu"] for _, e in points], width, label=name)
            ax.scatter(xs, [e["flop_ratio"] for _, e in points], marker="_", color="black", s=120, zorder=3)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
        ax.set_xticklabels(keys, rotation=20)
        ax.set_ylabel("median CPU time, gated / unpatched")
        ax.set_title(f"{model['label'].split(' (')[0]} (black ticks: FLOP ratio)")
        low = min(e["ratio_cpu"] for w in model["workloads"].values() for e in w.values())
        ax.set_ylim(max(0.0, low - 0.1), None)
        if names:
            ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_json(data, path: str) -> None:
    """Atomically (a temporary file in the same folder, then a rename). Not gated_patch's `atomic_write`: this script
    also runs on the old code of `gate_cost_compare.py`, which may not have it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }


def check_gated_patch_location(directory: Optional[str]) -> str:
    """The file `gated_patch` was imported from; exits with an error if it does not lie under `directory`."""
    location = os.path.realpath(gp.__file__)
    if directory is not None:
        root = os.path.realpath(directory)
        if os.path.commonpath([location, root]) != root:
            sys.exit(f"gated_patch was imported from {location}, not from under {root}: wrong source tree "
                     "(check PYTHONPATH, the working directory and an editable install).")
    return location


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,tiny", help="comma list of: smollm2, tiny")
    p.add_argument("--variants", default=None, help="comma list of gated variants (default: all); unpatched always "
                   "runs")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions of prefill at batch 1")
    p.add_argument("--heavy-reps", type=int, default=None, help="repetitions of prefill at batch > 1 and of training "
                   "(default: --reps)")
    p.add_argument("--decode-reps", type=int, default=None, help="decode runs of --decode-tokens interleaved steps "
                   "(default: --reps); the medians are over all steps")
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--prefill-batches", default="1,8", help="comma list of batch sizes ('' to skip prefill)")
    p.add_argument("--decode-tokens", type=int, default=128, help="0 to skip decode")
    p.add_argument("--decode-prompt", type=int, default=32)
    p.add_argument("--compile-decode", action="store_true", help="also time decode with torch.compile (inductor, "
                   "static KV cache; needs a C++ compiler; about a minute of compilation per variant)")
    p.add_argument("--compile-variants", default="unpatched,elementwise/hidden,headwise/hidden",
                   help="comma list of the variants timed with --compile-decode")
    p.add_argument("--train-batch", type=int, default=8, help="0 to skip training")
    p.add_argument("--train-len", type=int, default=256)
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory pass")
    p.add_argument("--record-steps", action="store_true", help="also write every decode step's time to the JSON")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions of every workload first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small sizes and 3 repetitions (a smoke run); options given "
                   "explicitly still apply")
    p.add_argument("--expect-gated-patch-in", default=None, metavar="DIR",
                   help="exit with an error unless gated_patch is imported from under DIR")
    p.add_argument("--out", default=None, help="JSON path, a PNG plot is written beside it (default "
                   "benchmarks/results/gate_cost.json; --quick: gate_cost_quick.json)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if p.parse_known_args(argv)[0].quick:
        p.set_defaults(reps=3, prefill_len=64, prefill_batches="1,2", decode_tokens=16, decode_prompt=8, train_batch=2,
                       train_len=32)
    args = p.parse_args(argv)
    args.out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    args.prefill_batches = [int(b) for b in args.prefill_batches.split(",") if b.strip()]
    args.heavy_reps = args.reps if args.heavy_reps is None else args.heavy_reps
    args.decode_reps = args.reps if args.decode_reps is None else args.decode_reps
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.compile_variants = [n.strip() for n in args.compile_variants.split(",") if n.strip()]
    wanted = ([n for n in VARIANTS if n not in LINEAR_ABLATIONS] if args.variants is None
              else [n.strip() for n in args.variants.split(",") if n.strip()])
    unknown = sorted(set(wanted + args.compile_variants) - set(VARIANTS))
    if unknown:
        sys.exit(f"Unknown variants {unknown}; choose from {list(VARIANTS)}.")
    args.variants = [n for n in VARIANTS if n == BASE or n in wanted]
    unknown = sorted(set(args.models) - {"smollm2", "tiny"})
    if unknown:
        sys.exit(f"Unknown models {unknown}; choose from smollm2, tiny.")
    return args


def load_model(name: str):
    if name == "smollm2":
        from gated_patch.default_model import default_model_dir

        return "SmolLM2-135M-Instruct", AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
    torch.manual_seed(0)
    return TINY_LABEL, AutoModelForCausalLM.from_config(LlamaConfig(**TINY_CONFIG), dtype=torch.float32)


def main(argv=None) -> dict:
    started = time.perf_counter()
    args = parse_args(argv)
    location = check_gated_patch_location(args.expect_gated_patch_in)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    names = args.variants
    compiled = len([n for n in names if n in args.compile_variants]) if args.compile_decode else 0
    trained = sum(len(_train_modes(n)) for n in names) if args.train_batch else 0
    light = sum(b <= 1 for b in args.prefill_batches)
    per_model = (len(names) * light * (args.reps + args.warmup)
                 + (len(names) * (len(args.prefill_batches) - light) + trained) * (args.heavy_reps + args.warmup)
                 + (len(names) + compiled) * (args.decode_reps + args.warmup) * bool(args.decode_tokens)
                 + len(names) * args.memory)
    results = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": machine_info(),
        "gated_patch": {"file": location, "version": getattr(gp, "__version__", None)},
        "models": [],
    }
    with tqdm(total=len(args.models) * per_model, desc="gate cost", unit="run") as progress:
        for model_name in args.models:
            clock = time.perf_counter()
            label, base = load_model(model_name)
            loaded = time.perf_counter() - clock
            results["models"].append(run_model(label, base, names, args, progress))
            results["models"][-1]["elapsed_s"]["load"] = loaded
            del base
    results["machine"]["load_average_end"] = os.getloadavg()
    results["elapsed_s"] = time.perf_counter() - started
    write_json(results, args.out)
    png = os.path.splitext(args.out)[0] + ".png"
    plot(results, png)
    print(format_table(results))
    print(f"\nwrote {args.out} and {png}")
    return results


if __name__ == "__main__":
    main()
