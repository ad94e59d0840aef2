"""Planning a conversion: read a source checkpoint's config and weight headers, and decide every output tensor.

The planner never loads a model (it builds one on the meta device, to learn which names the files hold). It
validates every source file first (so a truncated shard fails before anything is written), picks the layout planner
(add gates, import a fused layout, export to a fused or a native layout), and lays the output out shard by shard:
shards whose tensors do not change are copied byte for byte, new gate tensors go to one extra shard. `write.write_plan` writes the plan; ``--dry-run`` prints `ConversionPlan.describe`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME

from gated_patch.checkpoints.format import (config_object, family_of, gated_config_entries, is_gated_model_type,
                                            remove_gated_entries)
from gated_patch.checkpoints.names import CHECKPOINT_ATTENTION, checkpoint_attention, saved_name_function
from gated_patch.checkpoints.validate import check_gate_tensors, gate_config_from
from gated_patch.checkpoints.weights import DTYPES, SourceShard, find_weight_files, open_shards, tensor_nbytes
from gated_patch.core.config import GateConfig
from gated_patch.core.errors import GatedCheckpointError
from gated_patch.core.gate import GATE_MODULE_NAME, is_gate_name
from gated_patch.families import family_for
from gated_patch.files import read_json

from . import layouts, native
from .model_card import MODEL_CARD_FILE

SOURCE_LAYOUTS = ("auto", "plain", layouts.PAPER, layouts.QWEN3_NEXT)
TARGET_LAYOUTS = (*layouts.LAYOUTS, *native.NATIVE_LAYOUTS)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
QUERY_PROJECTION = "q_proj"  # the fused layouts put the gate into the query projection
Output = tuple[str, str, tuple, Callable[[], torch.Tensor]]  # (name, safetensors dtype, shape, producer)


@dataclass
class OutputShard:
    entries: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)
    producers: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)
    copy_from: Optional[SourceShard] = None
    name: str = ""

    @property
    def nbytes(self) -> int:
        return sum(tensor_nbytes(dtype, shape) for _, dtype, shape in self.entries)

    def add(self, name: str, dtype: str, shape: tuple, produce: Callable[[], torch.Tensor]) -> None:
        self.entries.append((name, dtype, shape))
        self.producers[name] = produce


@dataclass
class ConversionPlan:
    """What a conversion will write; `describe` is what ``--dry-run`` prints."""

    source: Path
    source_name: str
    base_model: Optional[str]
    family: str
    modules: dict  # where the gated modules are (attn_output_gate_modules)
    source_layout: str  # plain / paper / qwen3-next / plugin (a gated checkpoint)
    target_layout: str  # plugin / paper / qwen3-next / qwen3_5 (native)
    gate: GateConfig
    config: dict
    shards: list[OutputShard]
    extra_files: list[Path]
    sources: list[SourceShard]
    notes: list[str] = field(default_factory=list)

    @property
    def gate_tensors(self) -> list[str]:
        return [name for shard in self.shards for name, _, _ in shard.entries if is_gate_name(name)]

    def describe(self) -> str:
        lines = [
            f"source: {self.source_name} ({self.source}); model_type {self.config.get('model_type')!r} "
            f"family {self.family!r}; layout {self.source_layout} -> {self.target_layout}",
            f"gate: {self.gate.to_dict()}",
            f"source weight files: {', '.join(s.path.name for s in self.sources)}",
        ]
        for shard in self.shards:
            how = f"copy of {shard.copy_from.path.name}" if shard.copy_from else "written"
            lines.append(f"  {shard.name}: {len(shard.entries)} tensors, {shard.nbytes / 2**20:.2f} MiB ({how})")
        lines.append(f"gate tensors in output: {len(self.gate_tensors)}")
        lines.append(f"other files: {', '.join(p.name for p in self.extra_files) or '-'}")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


@dataclass
class Source:
    """A source checkpoint as the layout planners read it: config, attention sizes, module paths and tensors."""

    path: Path
    config: dict
    family: str
    modules: dict
    shape: layouts.AttentionShape
    num_layers: int
    shards: list[SourceShard]
    by_name: dict[str, SourceShard]

    saved_name: Callable[[str], str]  # a module path's tensor name -> the name the files hold it under

    def name(self, layer: int, module: str, kind: str) -> str:
        return self.saved_name(f"{self.modules['decoder_layers']}.{layer}.{self.modules['attention']}.{module}.{kind}")

    def entry(self, name: str) -> tuple[str, tuple]:
        if name not in self.by_name:
            raise GatedCheckpointError(f"{self.path}: the weights have no tensor {name!r}; is SRC a complete "
                                       f"{self.family} checkpoint?")
        return self.by_name[name].entries[name]

    def read(self, name: str) -> torch.Tensor:
        return self.by_name[name].get(name)


@dataclass
class TensorPlan:
    """What a layout planner decides: source tensor -> output tensors, dropped source tensors, new tensors."""

    gate: GateConfig
    config: dict
    replaced: dict[str, list[Output]] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)
    added: list[Output] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------- source


def resolve_source(src: str, *, revision: Optional[str] = None, token: Optional[str] = None,
                   allow_pickle: bool = False, download: Optional[Callable] = None) -> tuple[Path, Optional[str]]:
    """``(local directory, Hub repo id or None)``. Existing local paths never touch the network."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise GatedCheckpointError(f"SRC {src}: is a file; pass the checkpoint directory that holds config.json.")
        return path.resolve(), None
    if _REPO_ID.match(src) and not src.startswith((".", "~")):
        if download is None:
            from huggingface_hub import snapshot_download as download
        patterns = _HUB_PATTERNS + (["*.bin"] if allow_pickle else [])
        try:
            local = download(repo_id=src, revision=revision, token=token, allow_patterns=patterns)
        except Exception as exc:  # noqa: BLE001 - any download failure: say what and how to fix
            raise GatedCheckpointError(
                f"SRC {src}: not a local directory, and downloading it from the Hub failed "
                f"({type(exc).__name__}: {' '.join(str(exc).split())}). Check the path, or the repo id, network and "
                "token (HF_TOKEN or `hf auth login`).") from exc
        return Path(local), src
    raise GatedCheckpointError(f"SRC {src}: no such directory. Pass a local checkpoint directory or a Hub repo id "
                               "(owner/name).")


def source_shards(source: Path, allow_pickle: bool) -> tuple[list[SourceShard], dict[str, SourceShard]]:
    """The source weight files (validated) and a map tensor name -> shard."""
    weights = find_weight_files(source)
    if weights is None:
        raise GatedCheckpointError(f"{source}: no model.safetensors or model.safetensors.index.json; SRC must be a "
                                   "transformers checkpoint with safetensors weights.")
    if weights.pickled and not allow_pickle:
        raise GatedCheckpointError(f"{weights.listing}: pickled PyTorch weights are refused (loading them can run arbitrary "
                                   "code). Convert the checkpoint to safetensors, or pass --allow-pickle if you trust it.")
    return open_shards(weights, allow_pickle=allow_pickle)


def _extra_files(source: Path) -> list[Path]:
    """Top-level files carried along (tokenizer, generation config, chat template, license, ...)."""
    return [path for path in sorted(source.iterdir()) if path.is_file() and not path.name.startswith(".")
            and path.name not in (CONFIG_NAME, MODEL_CARD_FILE) and not path.name.endswith(_WEIGHT_SUFFIXES)
            and not path.name.endswith((".index.json", ".py"))]


def causal_lm_class(family: str) -> type:
    """transformers' causal-LM class of `family` (a converted checkpoint holds one)."""
    return MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING[family]]


# ------------------------------------------------------------------------------------------------- layout planners


def _detect_layout(config: dict, source: Path, source_layout: str, target_layout: str) -> str:
    """The layout of a plain (not gated) source: plain, or a fused layout its config flags or the user names."""
    if target_layout != layouts.PLUGIN:
        raise GatedCheckpointError(
            f"{source}: exporting to the {target_layout} layout needs a gated checkpoint. Convert SRC first "
            "(gated-patch-convert SRC GATED --init paper --no-bias), train it, then export GATED.")
    flagged = layouts.paper_granularity(config)
    detected = (layouts.PAPER if flagged else "plain") if source_layout == "auto" else source_layout
    if detected == layouts.PAPER and not flagged:
        raise GatedCheckpointError(
            f"{source / 'config.json'}: --source-layout paper, but neither elementwise_attn_output_gate nor "
            "headwise_attn_output_gate is true; set the flag the checkpoint was trained with.")
    if detected != layouts.PAPER and flagged:
        raise GatedCheckpointError(
            f"{source / 'config.json'}: sets {layouts.PAPER_FLAGS[flagged]}, i.e. the paper layout, not "
            f"{detected}; drop --source-layout or pass --source-layout paper.")
    return detected


def _import_fused(src: Source, layout: str, config: dict) -> TensorPlan:
    """A fused layout's ``q_proj`` split into the query and a plugin gate (bit-exact row permutations)."""
    shape = src.shape
    granularity = layouts.paper_granularity(src.config) if layout == layouts.PAPER else "elementwise"
    has_bias = src.name(0, QUERY_PROJECTION, "bias") in src.by_name
    plan = TensorPlan(layouts.imported_gate_config(granularity, has_bias), config)
    for i in range(src.num_layers):
        for kind in ("weight", "bias") if has_bias else ("weight",):
            query = src.name(i, QUERY_PROJECTION, kind)
            dtype, fused_shape = src.entry(query)
            if fused_shape[0] != shape.fused_rows(granularity):
                raise GatedCheckpointError(
                    f"{src.by_name[query].path}: {query} has {fused_shape[0]} rows; the {layout} layout "
                    f"({granularity}) needs {shape.fused_rows(granularity)}. Check --source-layout.")
            rest = tuple(fused_shape[1:])

            def part(index, name=query):
                return lambda: layouts.split_fused(src.read(name), layout, granularity, shape)[index]

            plan.replaced[query] = [(query, dtype, (shape.num_heads * shape.head_dim, *rest), part(0)),
                                    (src.name(i, GATE_MODULE_NAME, kind), dtype, (shape.gate_rows(granularity), *rest),
                                     part(1))]
    plan.notes.append(f"imported {layout} layout: GateConfig(granularity={granularity!r}, init='paper', bias={has_bias})")
    return plan


def _add_gates(src: Source, gate: GateConfig, seed: int, config: dict) -> TensorPlan:
    """New gate tensors for a plain checkpoint: identity (zeros) or the paper's normal init, seeded per layer."""
    shape, plan = src.shape, TensorPlan(gate, config)
    if any(is_gate_name(name) for name in src.by_name):
        raise GatedCheckpointError(f"{src.path}: has gate tensors but model_type {src.config.get('model_type')!r}; it is "
                                   "not a plain checkpoint.")
    query = src.name(0, QUERY_PROJECTION, "weight")  # a family with a separate query projection: a fused gate in it?
    if query in src.by_name and src.entry(query)[1][0] != shape.num_heads * shape.head_dim:
        raise GatedCheckpointError(
            f"{src.by_name[query].path}: q_proj has {src.entry(query)[1][0]} rows, not heads*head_dim="
            f"{shape.num_heads * shape.head_dim}: a fused gate layout? Pass --source-layout qwen3-next (per head "
            "[query | gate]) or set the paper flag in config.json.")
    std = src.config.get("initializer_range") or 0.02
    in_features = shape.hidden_size if gate.gate_input == "hidden_states" else shape.num_heads * shape.head_dim
    rows = shape.gate_rows(gate.granularity)
    for i in gate.layer_indices(src.num_layers, src.modules.get("attention_layers")):
        dtype = src.entry(src.name(i, src.modules["output_projection"], "weight"))[0]

        def weight(layer=i, torch_dtype=DTYPES[dtype]):
            if gate.init == "identity":
                return torch.zeros(rows, in_features, dtype=torch_dtype)
            generator = torch.Generator().manual_seed(seed * 1_000_003 + layer)
            return torch.empty(rows, in_features).normal_(0.0, std, generator=generator).to(torch_dtype)

        plan.added.append((src.name(i, GATE_MODULE_NAME, "weight"), dtype, (rows, in_features), weight))
        if gate.bias:
            plan.added.append((src.name(i, GATE_MODULE_NAME, "bias"), dtype, (rows,),
                               lambda d=DTYPES[dtype]: torch.zeros(rows, dtype=d)))
    return plan


def _export_fused(src: Source, gate: GateConfig, layout: str, config: dict) -> TensorPlan:
    """A plugin gate fused into ``q_proj`` (the paper's or Qwen3-Next's layout): a plain, ungated config."""
    shape, granularity, plan = src.shape, gate.granularity, TensorPlan(gate, config)
    for i in range(src.num_layers):
        gate_bias, has_q_bias = src.name(i, GATE_MODULE_NAME, "bias"), src.name(i, QUERY_PROJECTION, "bias") in src.by_name
        if gate.bias:
            if not has_q_bias and torch.count_nonzero(src.read(gate_bias)):
                raise GatedCheckpointError(
                    f"{src.by_name[gate_bias].path}: {gate_bias} is non-zero, but q_proj has no bias, so the {layout} "
                    "layout cannot hold it. Only gates without bias (or with an all-zero bias) are exportable when "
                    "q_proj has no bias.")
            plan.dropped.add(gate_bias)
        plan.dropped.add(src.name(i, GATE_MODULE_NAME, "weight"))
        for kind in ("weight", "bias") if has_q_bias else ("weight",):
            query = src.name(i, QUERY_PROJECTION, kind)
            dtype, q_shape = src.entry(query)

            def fused(layer=i, kind=kind, query=query):
                tensor = src.read(query)
                if kind == "bias" and not gate.bias:
                    gate_part = torch.zeros(shape.gate_rows(granularity), dtype=tensor.dtype)
                else:
                    gate_part = src.read(src.name(layer, GATE_MODULE_NAME, kind)).to(tensor.dtype)
                return layouts.fuse(tensor, gate_part, layout, granularity, shape)

            plan.replaced[query] = [(query, dtype, (shape.fused_rows(granularity), *q_shape[1:]), fused)]
    model_name = causal_lm_class(src.family).__name__
    remove_gated_entries(config, model_name)
    config.update(model_type=src.family, architectures=[model_name])
    if layout == layouts.PAPER:
        config.update({flag: name == granularity for name, flag in layouts.PAPER_FLAGS.items()})
    return plan


def _export_native(src: Source, gate: GateConfig) -> TensorPlan:
    """A gated Qwen3 as transformers' own Qwen3.5 (`native`)."""
    prefix = f"{src.modules['decoder_layers']}.{{}}.{src.modules['attention']}"
    replaced, dropped, added = native.native_tensor_plan(gate, src.shape, src.num_layers, prefix.format,
                                                         {name: src.entry(name) for name in src.by_name}, src.read)
    notes = [f"exported to {native.NATIVE_ARCHITECTURE} ({native.NATIVE_MODEL_TYPE}): loads in plain transformers"]
    return TensorPlan(gate, native.native_config(src.config, gate), replaced, dropped, added, notes)


# ------------------------------------------------------------------------------------------------------------ plan


def _read_source(source: Path, allow_pickle: bool) -> tuple[Source, Optional[GateConfig]]:
    """The source checkpoint and, for a gated one, its gate config (checked against its gate tensors)."""
    config_path = source / CONFIG_NAME
    config = read_json(config_path, "SRC must be a transformers checkpoint directory")
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise GatedCheckpointError(f"{config_path}: no model_type; SRC must be a transformers checkpoint.")
    gate = None
    if is_gated_model_type(model_type):
        gate, modules = gate_config_from(config, config_path)  # a malformed section: an error naming the file
    family = family_of(model_type)
    try:
        upstream_config = config_object(config_path)
        shape = layouts.AttentionShape.from_config(upstream_config)
        num_layers = upstream_config.get_text_config().num_hidden_layers
    except (KeyError, AttributeError) as exc:
        raise GatedCheckpointError(f"{config_path}: {exc}; SRC must be a complete transformers {family} config.") from None
    with torch.device("meta"):  # no weights: the model says which modules get gates, and which names its files hold
        model = AutoModelForCausalLM.from_config(upstream_config)
    if gate is None:
        modules = family_for(model).gate_modules  # an unsupported family: an error naming the reason
        saved_as = checkpoint_attention(model, modules["decoder_layers"], modules["attention"],
                                        GateConfig().layer_indices(num_layers, modules.get("attention_layers")))
        modules = {**modules, CHECKPOINT_ATTENTION: saved_as} if saved_as else modules
    shards, by_name = source_shards(source, allow_pickle)
    if gate is not None:  # wrong-shaped, non-float, missing or extra gate tensors: refused before writing
        listing = shards[0].path if len(shards) == 1 else source / SAFE_WEIGHTS_INDEX_NAME
        check_gate_tensors(gate, modules, config_path, {n: s.entries[n] for n, s in by_name.items()},
                           {n: s.path for n, s in by_name.items()}, listing)
    return Source(source, config, family, modules, shape, num_layers, shards, by_name, saved_name_function(model)), gate


def _tensor_plan(src: Source, gate: Optional[GateConfig], new_gate: GateConfig, source_layout: str,
                 target_layout: str, seed: int) -> tuple[str, TensorPlan]:
    """``(detected source layout, what its planner decides)``; `gate`: a gated source's, `new_gate`: for a plain one."""
    config = {k: v for k, v in src.config.items() if k not in layouts.PAPER_FLAGS.values()}
    if gate is None:
        detected = _detect_layout(src.config, src.path, source_layout, target_layout)
        if detected == "plain":
            return detected, _add_gates(src, new_gate, seed, config)
        return detected, _import_fused(src, detected, config)
    if target_layout == layouts.PLUGIN:
        raise GatedCheckpointError(
            f"{src.path}: already a gated checkpoint (model_type {src.config['model_type']!r}); nothing to convert. Pass "
            "--target-layout paper or qwen3-next to export it to a fused layout, or qwen3_5 to a native one.")
    if source_layout != "auto":
        raise GatedCheckpointError(f"{src.path}: a gated checkpoint has the plugin layout; drop --source-layout.")
    if target_layout in native.NATIVE_LAYOUTS:
        native.check_native_export(src.family, gate, src.config, target_layout)
        return layouts.PLUGIN, _export_native(src, gate)
    layouts.check_exportable(gate, src.num_layers, target_layout)
    return layouts.PLUGIN, _export_fused(src, gate, target_layout, config)


def _output_shards(shards: list[SourceShard], plan: TensorPlan) -> list[OutputShard]:
    """The output shards, in source order (unchanged ones are byte copies), new tensors in one more shard."""
    out_shards = []
    for shard in shards:
        out = OutputShard()
        for name, (dtype, shape) in shard.entries.items():
            for output in plan.replaced.get(name, [] if name in plan.dropped else
                                            [(name, dtype, shape, lambda s=shard, n=name: s.get(n))]):
                out.add(*output)
        changed = not shard.is_safetensors or any(name in plan.replaced or name in plan.dropped for name in shard.entries)
        out.copy_from = None if changed else shard
        if out.entries:
            out_shards.append(out)
    if plan.added:
        out_shards.append(OutputShard())
        for output in plan.added:
            out_shards[-1].add(*output)
    for index, shard in enumerate(out_shards, start=1):
        shard.name = f"model-{index:05d}-of-{len(out_shards):05d}.safetensors"
    return out_shards


def plan_conversion(source: Path, gate: Optional[GateConfig] = None, *, source_name: Optional[str] = None,
                    base_model: Optional[str] = None, source_layout: str = "auto", target_layout: str = layouts.PLUGIN,
                    allow_pickle: bool = False, seed: int = 0) -> ConversionPlan:
    """Read `source`'s config and weight headers and decide what to write (writes nothing). `gate`: the gates to add
    to a plain checkpoint (default `GateConfig()`); a gated or fused source brings its own."""
    source = Path(source)
    if source_layout not in SOURCE_LAYOUTS:
        raise GatedCheckpointError(f"Unknown source layout {source_layout!r}; choose one of {list(SOURCE_LAYOUTS)}.")
    if target_layout not in TARGET_LAYOUTS:
        raise GatedCheckpointError(f"Unknown target layout {target_layout!r}; choose one of {list(TARGET_LAYOUTS)}.")
    src, source_gate = _read_source(source, allow_pickle)
    detected, plan = _tensor_plan(src, source_gate, gate or GateConfig(), source_layout, target_layout, seed)
    if target_layout == layouts.PLUGIN:
        auto_map = src.config.get("auto_map") or {}
        if any(key == "AutoConfig" or key.startswith("AutoModel") for key in auto_map):
            plan.notes.append("dropped the source's own modeling code (auto_map) in favour of the gated remote code")
        plan.config.update(gated_config_entries(CONFIG_MAPPING[src.family], causal_lm_class(src.family), plan.gate,
                                                src.modules, auto_map))
    return ConversionPlan(source=source, source_name=source_name or str(source), base_model=base_model,
                          family=src.family, modules=src.modules, source_layout=detected, target_layout=target_layout,
                          gate=plan.gate, config=plan.config, shards=_output_shards(src.shards, plan),
                          extra_files=_extra_files(source), sources=src.shards, notes=plan.notes)
