"""The core checks on a real pretrained model: SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads, 3 KV heads)."""


import pytest
import torch

import gated_patch as gp

PROMPT = "The Python language reference describes the syntax and"

pytestmark = pytest.mark.slow


GATES = [
    gp.GateConfig(),
    gp.GateConfig(granularity="headwise"),
    gp.GateConfig(gate_input="attn_output"),
    gp.GateConfig(granularity="headwise", gate_input="attn_output", bias=False),
]


@torch.no_grad()
def test_smollm2_identity_and_generation_for_each_variant(load_smollm2, smollm2_tokenizer):
    """One load (CI time); each variant is patched, checked and unpatched in turn."""
    model = load_smollm2()
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    inputs = smollm2_tokenizer(PROMPT, return_tensors="pt")
    reference_logits = model(**inputs).logits
    reference_tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)

    for gate in GATES:
        gp.patch_model(model, gate)
        assert len(list(gp.gate_parameters(model))) == 30 * (2 if gate.bias else 1), gate
        assert (model(**inputs).logits - reference_logits).abs().max().item() <= 1e-5, gate
        assert torch.equal(model.generate(**inputs, max_new_tokens=8, do_sample=False), reference_tokens), gate
        gp.unpatch_model(model)
    assert torch.equal(model(**inputs).logits, reference_logits)


@torch.no_grad()
def test_smollm2_gated_cache_and_batched_left_padding(load_smollm2, smollm2_tokenizer):
    model = load_smollm2()
    gp.patch_model(model, gp.GateConfig(granularity="headwise"))
    generator = torch.Generator().manual_seed(0)
    for _, parameter in gp.gate_parameters(model):
        parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    smollm2_tokenizer.padding_side = "left"
    prompts = [PROMPT, "Lists are"]
    batch = smollm2_tokenizer(prompts, return_tensors="pt", padding=True)
    batched = model.generate(**batch, max_new_tokens=6, do_sample=False)
    for row, prompt in enumerate(prompts):
        single = smollm2_tokenizer(prompt, return_tensors="pt")
        cached = model.generate(**single, max_new_tokens=6, do_sample=False)
        uncached = model.generate(**single, max_new_tokens=6, do_sample=False, use_cache=False)
        assert torch.equal(cached, uncached)
        assert batched[row, -6:].tolist() == cached[0, -6:].tolist()


def test_demo_command_end_to_end(smollm2_dir, capsys):
    """The README's main job (`gated-patch demo`) on the default model, in-process."""
    from gated_patch.cli import main

    assert main(["demo", "--max-new-tokens", "6", "--granularity", "headwise"]) == 0
    out = capsys.readouterr().out
    assert "gate parameters added: 155,790 " in out  # 30 layers x (9 x 576 weight + 9 bias)
    assert "layers 0-29 (30 layers): weight [9, 576], bias [9] each" in out
    identity = float(out.split("max |logits(patched) - logits(original)| = ")[1].split()[0])
    assert identity <= 1e-5
    assert "greedy generation identical to the original: True" in out


def test_readme_quick_start_runs():
    """The README's Python quick start is executed as written (it asserts identity itself)."""
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("## Quick start") :]
    code = section[section.index("```python") + len("```python") : section.index("```", section.index("```python") + 9)]
    namespace: dict = {}
    exec(compile(code, "README.md quick start", "exec"), namespace)
    assert "model.layers.29.self_attn.attn_gate.weight" in namespace["gates"]
    assert not namespace["gated_patch"].is_patched(namespace["model"])
