"""mlx-lm and the native Qwen3.5 export: refused, never computed wrongly.

mlx-lm adds 1 to Qwen3.5's norm weights only when it sees unconverted linear-attention weights, which an export with
every layer full attention has none of; it would compute with unshifted norms, without an error. It knows the
multimodal ``qwen3_5`` model type, not the export's ``qwen3_5_text``, so it refuses the export."""

from __future__ import annotations

import json

import mlx_lm
import pytest
from conftest import PROMPTS, export, gated_qwen3, transformers_greedy

import gated_patch as gp


def mlx_greedy(model, prompt, new_tokens):
    import mlx.core as mx

    tokens = mx.array([prompt])
    for _ in range(new_tokens):
        tokens = mx.concatenate([tokens, mx.argmax(model(tokens)[:, -1, :], axis=-1)[:, None]], axis=1)
    return tokens[0, len(prompt):].tolist()


def test_mlx_lm_refuses_the_export_rather_than_compute_it_wrongly(tmp_path):
    model = gated_qwen3(gp.GateConfig(bias=False))
    native = export(model, tmp_path)
    with pytest.raises(ValueError, match="Model type qwen3_5_text not supported"):
        mlx_lm.load(str(native))
    # what the refusal prevents: relabelled as mlx-lm's qwen3_5, the export loads and computes something else
    config = json.loads((native / "config.json").read_text())
    (native / "config.json").write_text(json.dumps({**config, "model_type": "qwen3_5"}))
    relabelled, _ = mlx_lm.load(str(native))
    want = transformers_greedy(model)[0][0]
    assert mlx_greedy(relabelled, PROMPTS[0], len(want)) != want
