"""Fixtures of the vLLM tests (run in their own venv: `make test-vllm`): gated checkpoints and transformers' answers.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so an error raised while vLLM builds or loads
a model reaches the test as itself; the tensor-parallel and server tests start their own processes.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from gated_patch.default_model import default_model_dir

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Gated attention multiplies"]
MAX_TOKENS = 24
TINY = dict(initializer_range=0.2, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            num_hidden_layers=3, max_position_embeddings=512, vocab_size=49152, tie_word_embeddings=True)


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
    config = AutoConfig.for_model(model_type, **TINY)
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


def vllm_greedy(llm, prompts=PROMPTS, max_tokens=MAX_TOKENS):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, min_tokens=max_tokens, logprobs=1, ignore_eos=True)
    answers = []
    for result in llm.generate(prompts, params, use_tqdm=False):
        output = result.outputs[0]
        tokens = list(output.token_ids)
        answers.append((tokens, [step[t].logprob for step, t in zip(output.logprobs, tokens)]))
    return answers


def vllm_engine(path, **kwargs):
    from vllm import LLM

    return LLM(model=str(path), **{"dtype": "float32", "enforce_eager": True, "max_model_len": 256, "seed": 0, **kwargs})


@pytest.fixture(scope="session")
def smollm2_answers_ungated():
    return transformers_greedy(smollm2())
