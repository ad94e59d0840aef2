"""vLLM's engine and its greedy answers, as every vLLM test runs them; imports neither gated_patch nor the tests'
fixtures (`serve_without_plugin.py` runs it where gated_patch cannot be imported)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: its errors reach the test
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Gated attention multiplies"]
MAX_TOKENS = 24


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


def model_class_name(model) -> str:
    """For ``LLM.apply_model``: the class vLLM serves with (a module-level function: workers unpickle it by name)."""
    return type(model).__name__
