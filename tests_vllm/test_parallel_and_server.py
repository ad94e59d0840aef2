"""Tensor parallelism 2 shards the gate by heads as the query is; the OpenAI server returns the plugin's tokens."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import PROMPTS, randomize_gates, save_with_tokenizer, tiny_model, transformers_greedy
from test_serving import assert_same_answers

import gated_patch as gp

HERE = Path(__file__).parent
TWO_CORES = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


@pytest.mark.parametrize("model_type, config", [
    ("llama", gp.GateConfig(gate_input="attn_output", bias=True)),
    ("llama", gp.GateConfig(granularity="headwise", activation="silu", init="paper")),
    ("phi", gp.GateConfig(granularity="headwise")),  # vLLM's Transformers backend: the gate split by the model's tp_plan
], ids=["elementwise/attn_output/bias", "headwise/hidden/silu/paper", "transformers-backend/headwise"])
def test_tensor_parallel_2_gives_the_single_process_tokens(model_type, config, tmp_path):
    model = gp.patch_model(tiny_model(model_type), config)
    randomize_gates(model)
    path = save_with_tokenizer(model, tmp_path / "gated")
    subprocess.run([sys.executable, str(HERE / "serve_in_processes.py"), path, "2", str(tmp_path / "answers.json")],
                   env={**os.environ, **TWO_CORES}, check=True, timeout=400, cwd=HERE)
    got = [tuple(answer) for answer in json.loads((tmp_path / "answers.json").read_text())]
    assert_same_answers(got, transformers_greedy(model))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_openai_server_returns_the_plugins_tokens(tmp_path):
    model = gp.patch_model(tiny_model("qwen3"), gp.GateConfig(granularity="headwise"))
    randomize_gates(model)
    path = save_with_tokenizer(model, tmp_path / "gated")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path,
                               "--dtype", "float32", "--enforce-eager", "--max-model-len", "256", "--port", str(port)],
                              env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}, cwd=tmp_path)
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, "the server exited"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "the server did not start"
                time.sleep(2)
        body = {"model": path, "prompt": PROMPTS, "max_tokens": 16, "min_tokens": 16, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        choices = sorted(json.load(urllib.request.urlopen(request, timeout=120))["choices"], key=lambda c: c["index"])
    finally:
        server.terminate()
        server.wait(timeout=60)
    want = transformers_greedy(model, max_tokens=16)
    assert [choice["token_ids"] for choice in choices] == [tokens for tokens, _ in want]
