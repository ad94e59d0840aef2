"""Fixtures of the tests of other engines on the native Qwen3.5 export (run in their own venv: `make test-engines`):
gated Qwen3 models, transformers' answers and the export."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import gated_patch as gp
from conversion.convert import convert
from gated_patch.default_model import default_model_dir

#: head_dim 64: llama.cpp's qwen35 applies Qwen3.5's rotary sections (11 + 11 + 10 pairs) over 32 pairs per head
TINY = dict(initializer_range=0.2, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
            head_dim=64, num_hidden_layers=3, max_position_embeddings=512, vocab_size=49152, tie_word_embeddings=True)
PROMPTS = [[1, 504, 3575, 282, 4649, 314], [1, 563, 28265, 30, 96, 2325, 42, 1059], [1, 29470, 2988, 29212]]
NEW_TOKENS = 16


def gated_qwen3(gate: gp.GateConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3", **TINY), dtype=torch.float32).eval()
    model = gp.patch_model(model, gate)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, parameter in gp.gate_parameters(model):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model


def transformers_greedy(model):
    """Greedy tokens after each prompt and the log-probability of each, as transformers computes them."""
    answers = []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            logprobs = torch.log_softmax(model(out).logits[0, len(prompt) - 1:-1].double(), dim=-1)
        tokens = out[0, len(prompt):].tolist()
        answers.append((tokens, [logprobs[i, t].item() for i, t in enumerate(tokens)]))
    return answers


def export(model, directory: Path) -> Path:
    """`model` saved as a gated checkpoint with SmolLM2's tokenizer, then exported to Qwen3.5 (returned)."""
    model.save_pretrained(directory / "gated")
    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(directory / "gated")
    convert(str(directory / "gated"), directory / "native", target_layout="qwen3_5", progress=False,
            log=lambda _: None)
    return directory / "native"
