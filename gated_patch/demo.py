"""The main job: patch a model, verify it still computes what the original did, generate, and report."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .core.config import GateConfig
from .patching import gate_parameters, patch_model


@dataclass
class PatchReport:
    gate_config: GateConfig
    parameters_added: int
    base_parameters: int
    layer_shapes: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)  # (parameter name, shape)
    identity_max_abs_diff: float = float("nan")
    same_generation: bool = False
    generated_text: str = ""

    def format(self) -> str:
        lines = [
            f"gate config: {self.gate_config.to_dict()}",
            f"gate parameters added: {self.parameters_added:,} "
            f"({100 * self.parameters_added / self.base_parameters:.2f}% of {self.base_parameters:,})",
            "per-layer gate tensors:",
            *_group_layer_shapes(self.layer_shapes),
            f"identity check: max |logits(patched) - logits(original)| = {self.identity_max_abs_diff:.3g}",
            f"greedy generation identical to the original: {self.same_generation}",
            f"generated: {self.generated_text!r}",
        ]
        return "\n".join(lines)


def _group_layer_shapes(shapes: list[tuple[str, tuple[int, ...]]]) -> list[str]:
    """One line per run of consecutive layers whose gate tensors have the same shapes."""
    per_layer: dict[int, list[str]] = {}
    for name, shape in shapes:
        parts = name.split(".")
        layer = next(int(p) for p in parts if p.isdigit())
        per_layer.setdefault(layer, []).append(f"{parts[-1]} {list(shape)}")
    lines, run = [], []
    for layer in sorted(per_layer):
        if run and (per_layer[layer] != per_layer[run[-1]] or layer != run[-1] + 1):
            lines.append(_layer_run_line(run, per_layer[run[-1]]))
            run = []
        run.append(layer)
    if run:
        lines.append(_layer_run_line(run, per_layer[run[-1]]))
    return lines


def _layer_run_line(run: list[int], tensors: list[str]) -> str:
    layers = f"layer {run[0]}" if len(run) == 1 else f"layers {run[0]}-{run[-1]} ({len(run)} layers)"
    return f"  {layers}: {', '.join(tensors)} each"


@torch.no_grad()
def patch_and_verify(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    gate: GateConfig,
    prompt: str,
    max_new_tokens: int = 16,
) -> tuple[PreTrainedModel, PatchReport]:
    """Patch a copy of `model` with `gate`, compare it with the original on `prompt`, return it and a report."""
    model.eval()
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    reference_logits = model(**inputs).logits
    reference_tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    base_parameters = sum(p.numel() for p in model.parameters())

    patched = patch_model(copy.deepcopy(model), gate)
    logits = patched(**inputs).logits
    tokens = patched.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    gates = list(gate_parameters(patched))
    report = PatchReport(
        gate_config=gate,
        parameters_added=sum(p.numel() for _, p in gates),
        base_parameters=base_parameters,
        layer_shapes=[(name, tuple(p.shape)) for name, p in gates],
        identity_max_abs_diff=(logits - reference_logits).abs().max().item(),
        same_generation=torch.equal(tokens, reference_tokens),
        generated_text=tokenizer.decode(tokens[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True),
    )
    return patched, report
