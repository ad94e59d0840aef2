"""Fixtures of the vLLM tests (run in their own venv: `make test-vllm`): gated checkpoints and transformers' answers.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so an error raised while vLLM builds or loads
a model reaches the test as itself; the tensor-parallel and server tests start their own processes.
"""

from __future__ import annotations

from engine import MAX_TOKENS, PROMPTS, model_class_name, vllm_engine, vllm_greedy  # noqa: F401 (first: sets the env)

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from gated_patch.default_model import default_model_dir

TINY = dict(initializer_range=0.2, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            num_hidden_layers=3, max_position_embeddings=512, vocab_size=49152, tie_word_embeddings=True)

#: Tiny Gemma2 (embeddings scaled by sqrt(hidden), soft-capped logits) repeats one token at probability 1 unless small.
FAMILY_TINY = {"gemma2": {"initializer_range": 0.02}}


def randomize_gates(model, seed: int = 1, std: float = 0.5) -> None:
    """Non-identity gates, so that a gate that vanished or is applied wrongly changes the tokens."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".attn_gate." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def save_with_tokenizer(model, out) -> str:
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(out)
    return str(out)


def tiny_model(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**TINY, **FAMILY_TINY.get(model_type, {})})
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def smollm2():
    return AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()


def transformers_greedy(model, prompts=PROMPTS, max_tokens=MAX_TOKENS):
    """Greedy tokens and the log-probability of each, as transformers (and the plugin) compute them."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            logprobs = torch.log_softmax(model(out).logits[0, ids.shape[1] - 1:-1].double(), dim=-1)
        tokens = out[0, ids.shape[1]:].tolist()
        answers.append((tokens, [logprobs[i, t].item() for i, t in enumerate(tokens)]))
    return answers


@pytest.fixture(scope="session")
def smollm2_answers_ungated():
    return transformers_greedy(smollm2())
