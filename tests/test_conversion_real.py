"""gated-patch-convert on the real default model (SmolLM2-135M-Instruct): identity gates reproduce it exactly."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conversion import convert as convert_cli
from gated_patch import GateConfig, gate_config


@pytest.mark.slow
def test_convert_smollm2_identity(tmp_path, capsys, smollm2_dir, smollm2_tokenizer):
    capsys.readouterr()
    assert convert_cli.main([str(smollm2_dir), str(tmp_path / "out"), "--no-progress"]) == 0  # (--verify: tiny tests)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (tmp_path / "out" / name).read_bytes() == (smollm2_dir / name).read_bytes()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "gated_llama" and config["tie_word_embeddings"] is True

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert gate_config(model) == GateConfig()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = smollm2_tokenizer("The Python language reference describes", return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)
        generated = model.generate(ids, max_new_tokens=8, do_sample=False)
        expected = base.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(generated, expected)
