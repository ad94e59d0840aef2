"""llama.cpp runs a gated Qwen3 exported to transformers' native Qwen3.5 (``--target-layout qwen3_5``) and converted
to GGUF with llama.cpp's own converter: transformers' greedy tokens and log-probabilities. The venv
(`make test-engines`) compiles llama-cpp-python from its source release and keeps that source, whose
``vendor/llama.cpp`` holds the converter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import NEW_TOKENS, PROMPTS, export, gated_qwen3, transformers_greedy
from safetensors.torch import load_file, save_file

import gated_patch as gp


def converter() -> Path:
    found = sorted(Path(sys.prefix, "src").glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if not found:
        raise RuntimeError(f"no llama.cpp converter under {sys.prefix}/src: run the tests with the venv "
                           "`make test-engines` builds.")
    return found[-1]


def llamacpp_greedy(gguf: Path, verbose: bool = False):
    from llama_cpp import GGML_TYPE_F32, Llama

    llm = Llama(model_path=str(gguf), n_ctx=128, n_threads=2, logits_all=True, verbose=verbose,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)  # float32 KV cache too (its default: float16)
    answers = []
    for prompt in PROMPTS:
        llm.reset()
        tokens, logprobs = list(prompt), []
        for _ in range(NEW_TOKENS):
            llm.eval(tokens[llm.n_tokens:])
            scores = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            token = int(np.argmax(scores))
            logprobs.append(float(scores[token] - np.log(np.exp(scores - scores.max()).sum()) - scores.max()))
            tokens.append(token)
        answers.append((tokens[len(prompt):], logprobs))
    llm.close()
    return answers


def edit_weights(directory: Path, edit) -> None:
    """Apply `edit` to the export's tensors (one or more safetensors files), in place."""
    for file in directory.glob("*.safetensors"):
        weights = load_file(file)
        edit(weights)
        save_file(weights, file, metadata={"format": "pt"})


def export_and_convert(model, tmp_path: Path, edit=None) -> subprocess.CompletedProcess:
    native = export(model, tmp_path)
    if edit is not None:
        edit_weights(native, edit)
    return subprocess.run([sys.executable, str(converter()), str(native), "--outfile",
                           str(tmp_path / "model.gguf"), "--outtype", "f32", "--no-mtp"],  # the export has no MTP head
                          capture_output=True, text=True)


@pytest.mark.parametrize("gate", [gp.GateConfig(bias=False, layers=[0, 2]),
                                  gp.GateConfig(granularity="headwise", init="paper", bias=False)],
                         ids=["elementwise/identity/layer-subset", "headwise/paper"])
def test_llamacpp_gives_transformers_tokens_for_the_native_export(gate, tmp_path):
    model = gated_qwen3(gate)
    want = transformers_greedy(model)
    ungated = transformers_greedy(gp.unpatch_model(gated_qwen3(gate)))
    assert [tokens for tokens, _ in want] != [tokens for tokens, _ in ungated]  # the gates act
    done = export_and_convert(model, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    got = llamacpp_greedy(tmp_path / "model.gguf")
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(got, want, strict=True):
        assert tokens == want_tokens
        assert max(abs(a - b) for a, b in zip(logprobs, want_logprobs, strict=True)) <= 1e-3


QUERY = "model.layers.1.self_attn.q_proj.weight"


def refusal(gguf: Path, capfd) -> str:
    """llama.cpp's reason for refusing to load `gguf` (its log, which names it; the exception does not)."""
    with pytest.raises(ValueError, match="Failed to load model"):
        llamacpp_greedy(gguf, verbose=True)
    return capfd.readouterr().err


def test_an_export_without_its_gate_rows_is_refused_by_llamacpp(tmp_path, capfd):
    """q_proj cut to the query rows (what an ungated Qwen3 has): the conversion passes, llama.cpp refuses the model."""
    def drop_gate_rows(weights):
        if QUERY in weights:
            weights[QUERY] = weights[QUERY][: weights[QUERY].shape[0] // 2].clone()

    done = export_and_convert(gated_qwen3(gp.GateConfig(bias=False)), tmp_path, drop_gate_rows)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tensor 'blk.1.attn_q.weight' has wrong shape" in refusal(tmp_path / "model.gguf", capfd)


def test_a_plugin_gate_tensor_left_in_an_export_is_refused_by_the_converter(tmp_path):
    def add_plugin_gate(weights):
        if QUERY in weights:
            weights["model.layers.1.self_attn.attn_gate.weight"] = torch.zeros(256, 256)

    done = export_and_convert(gated_qwen3(gp.GateConfig(bias=False)), tmp_path, add_plugin_gate)
    assert done.returncode != 0 and "model.layers.1.self_attn.attn_gate.weight" in done.stderr


def test_an_export_of_a_gate_with_bias_is_refused_by_llamacpp(tmp_path, capfd):
    """A gate bias needs Qwen3.5's attention_bias, which also gives o_proj a bias (zero) that llama.cpp's qwen35 has no
    place for: it refuses the file rather than drop a tensor."""
    done = export_and_convert(gated_qwen3(gp.GateConfig(bias=True)), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrong number of tensors" in refusal(tmp_path / "model.gguf", capfd)
