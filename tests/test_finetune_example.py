"""examples/finetune_gates.py: every mode on a tiny llama (in process), a 2-process `accelerate launch --cpu` run
(DDP over gloo), and a few real steps on SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_example
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import gated_patch
from gated_patch.adapters import load_gated_adapter, read_record

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "finetune_gates.py"
HIDDEN, HEADS, KV_HEADS, LAYERS = 32, 4, 2, 2
HEAD_DIM = HIDDEN // HEADS


def _example():
    return load_example("finetune_gates")


@pytest.fixture(scope="module")
def example():
    return _example()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    """A tiny random llama checkpoint that uses SmolLM2's tokenizer."""
    directory = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def held_out_ppl(model_dir, blocks, model=None) -> float:
    """Perplexity computed here, independently of the Trainer: mean next-token NLL over the blocks."""
    model = model if model is not None else AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    losses = []
    with torch.no_grad():
        for block in blocks:
            logits = model(block[None]).logits[0, :-1]
            losses.append(torch.nn.functional.cross_entropy(logits.float(), block[1:]))
    return math.exp(torch.stack(losses).mean().item())


def eval_blocks(example, model_dir, seq_len, count):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    _, held_out, topics = example.corpus_blocks(tokenizer, seq_len)
    return held_out[:count], topics


COMMON = ["--steps", "2", "--seq-len", "32", "--batch-size", "2", "--eval-blocks", "4"]


@pytest.mark.slow  # SmolLM2's tokenizer: a fresh machine converts the real model first
@pytest.mark.parametrize(
    "mode, extra, expected_trainable",
    [
        ("gates", [], LAYERS * (HIDDEN * HEADS * HEAD_DIM + HEADS * HEAD_DIM)),
        ("gates", ["--granularity", "headwise"], LAYERS * (HIDDEN * HEADS + HEADS)),
        # gates + LoRA r=8 on q_proj (32 -> 32) and v_proj (32 -> 16)
        ("gates+lora", [], LAYERS * (HIDDEN * HIDDEN + HIDDEN + 8 * (HIDDEN + HIDDEN) + 8 * (HIDDEN + KV_HEADS * HEAD_DIM))),
        ("gate-lora", [], LAYERS * 8 * (HIDDEN + HIDDEN)),
        ("lora", [], LAYERS * (8 * (HIDDEN + HIDDEN) + 8 * (HIDDEN + KV_HEADS * HEAD_DIM))),
        ("full", [], None),
    ],
)
def test_modes_on_tiny_model(example, tiny_dir, tmp_path, mode, extra, expected_trainable):
    out = tmp_path / "out"
    results = example.main(["--model", str(tiny_dir), "--mode", mode, *extra, *COMMON, "--output-dir", str(out),
                            "--json", str(tmp_path / "r.json")])  # fmt: skip
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(results))
    if expected_trainable is None:  # full fine-tuning trains every weight of the ungated model
        expected_trainable = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_dir).parameters())
    assert results["trainable_params"] == expected_trainable
    # identity-init gates and zero-initialised LoRA B: every mode starts exactly at the base model's perplexity
    blocks, _ = eval_blocks(example, tiny_dir, 32, 4)
    assert results["ppl_before"] == pytest.approx(held_out_ppl(tiny_dir, blocks), rel=1e-4)
    assert results["ppl_after"] != results["ppl_before"]
    assert results["saved_mb"] == pytest.approx(
        sum(p.stat().st_size for p in out.rglob("*.safetensors")) / 1e6
    )
    assert results["peak_rss_mib"] > 0 and results["s_per_step_median"] > 0
    if mode in ("gates", "gates+lora", "gate-lora"):
        assert read_record(out)["gate_config"]["granularity"] == ("headwise" if extra else "elementwise")
        loaded = load_gated_adapter(AutoModelForCausalLM.from_pretrained(tiny_dir), out)
        assert held_out_ppl(tiny_dir, blocks, model=loaded) == pytest.approx(results["ppl_after"], rel=1e-4)


@pytest.mark.slow  # two processes under accelerate launch
def test_accelerate_launch_two_cpu_processes(example, tiny_dir, tmp_path):
    out, result_file = tmp_path / "adapter", tmp_path / "r.json"
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "MASTER_PORT": "29517"}
    env.pop("WORLD_SIZE", None)
    completed = subprocess.run(
        [str(accelerate), "launch", "--num_processes", "2", "--cpu", "--main_process_port", "29517", str(EXAMPLE),
         "--model", str(tiny_dir), "--mode", "gates+lora", *COMMON, "--output-dir", str(out), "--json", str(result_file)],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    results = json.loads(result_file.read_text())
    assert results["processes"] == 2 and results["backend"] == "gloo" and results["distributed"] == "MULTI_CPU"
    assert "held-out perplexity" in completed.stdout
    blocks, _ = eval_blocks(example, tiny_dir, 32, 4)
    assert results["ppl_before"] == pytest.approx(held_out_ppl(tiny_dir, blocks), rel=1e-4)
    loaded = load_gated_adapter(AutoModelForCausalLM.from_pretrained(tiny_dir), out)
    assert held_out_ppl(tiny_dir, blocks, model=loaded) == pytest.approx(results["ppl_after"], rel=1e-4)


@pytest.mark.slow
def test_gate_only_finetune_on_smollm2(example, smollm2_dir, tmp_path):
    out = tmp_path / "adapter"
    results = example.main(["--mode", "gates", "--steps", "2", "--seq-len", "32", "--batch-size", "1",
                            "--eval-blocks", "2", "--output-dir", str(out)])  # fmt: skip
    config = AutoModelForCausalLM.from_pretrained(smollm2_dir).config
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    gate_params = config.num_hidden_layers * (config.hidden_size * heads * head_dim + heads * head_dim)
    assert results["trainable_params"] == gate_params
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert all(".attn_gate." in key for key in saved) and sum(t.numel() for t in saved.values()) == gate_params
    assert results["saved_mb"] == pytest.approx(4 * gate_params / 1e6, rel=0.01)  # float32 gates, nothing else
    blocks, _ = eval_blocks(example, smollm2_dir, 32, 2)
    base_ppl = held_out_ppl(smollm2_dir, blocks)
    assert results["ppl_before"] == pytest.approx(base_ppl, rel=1e-4)  # identity init: starts at the base PPL
    assert results["ppl_after"] != pytest.approx(base_ppl, rel=1e-6)
    loaded = load_gated_adapter(AutoModelForCausalLM.from_pretrained(smollm2_dir), out)
    assert gated_patch.gate_config(loaded.get_base_model()).granularity == "elementwise"
    assert held_out_ppl(smollm2_dir, blocks, model=loaded) == pytest.approx(results["ppl_after"], rel=1e-4)
