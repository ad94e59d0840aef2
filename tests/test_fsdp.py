"""FSDP2 (torch's ``fully_shard``, what accelerate and Trainer use on GPU) on 2 CPU processes: full and gate-only
training equal one process, sharded checkpoints resume exactly, the full state dict is a gated checkpoint (with and
without the plugin), gate adapters saved under FSDP2 hold the trained gates, activation checkpointing changes nothing."""

from __future__ import annotations

import importlib.util
import json
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, torchrun
from safetensors.torch import load_file
from test_checkpoints_remote import BLOCK_GATED_PATCH, _run
from transformers import AutoModelForCausalLM

import gated_patch
from gated_patch.adapters import GATE_ONLY_ROUTES

WORKER = Path(__file__).parent / "distributed" / "fsdp_worker.py"
_spec = importlib.util.spec_from_file_location("fsdp_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)
pytestmark = pytest.mark.slow  # two processes
TOLERANCE = dict(atol=1e-5, rtol=1e-5)  # fp32; sharded reductions sum in another order, and Adam divides by sqrt(v)


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    completed = torchrun(str(WORKER), str(out))
    assert completed.returncode == 0, completed.stderr[-4000:]
    return out, torch.load(out / "results.pt")


def one_process(mode: str):
    """The same training in one process on the whole global batch."""
    model = worker.gated_model()
    if mode == "gates":
        worker.freeze_all_but_gates(model)
    losses = worker.train(model, worker.optimizer_for(model), worker.batches())
    return model, losses


def assert_states_close(sharded: dict, model) -> None:
    reference = model.state_dict()
    assert sorted(sharded) == sorted(reference)
    for name, tensor in reference.items():
        # A key bias shifts every score of a query equally, so softmax gives it a zero gradient in exact arithmetic;
        # what autograd computes is rounding noise, which Adam (dividing by sqrt(v) + eps) turns into updates of
        # up to ~0.1 lr that depend on the summation order. Observed: 1.1e-5 apart after 4 steps of lr 1e-2.
        tolerance = dict(atol=1e-4, rtol=0) if name.endswith("k_proj.bias") else TOLERANCE
        torch.testing.assert_close(sharded[name], tensor, **tolerance, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("mode", ["full", "gates"])
def test_training_equals_one_process(fsdp, mode):
    results = fsdp[1]
    model, losses = one_process(mode)
    assert results[f"{mode}_losses"] == pytest.approx(losses, rel=1e-5)  # the mean over ranks' halves of each batch
    assert_states_close(results[f"{mode}_state"], model)
    initial = worker.gated_model().state_dict()
    moved = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, initial[name])}
    if mode == "gates":
        assert moved and all(".attn_gate." in name for name in moved)
    else:
        assert any(".attn_gate." in name for name in moved) and any("mlp" in name for name in moved)


def test_the_gate_fingerprint_of_a_sharded_model_is_the_unsharded_one(fsdp):
    from gated_patch.adapters.record import base_gate_tensors, fingerprint

    assert fsdp[1]["sharded_gate_fingerprint"] == fingerprint(base_gate_tensors(worker.gated_model()))


def test_sharded_checkpoint_resumes_exactly(fsdp):
    resumed, uninterrupted = fsdp[1]["resumed"], fsdp[1]["uninterrupted"]
    assert sorted(resumed) == sorted(uninterrupted)
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in uninterrupted)
    assert any(".attn_gate." in name for name in resumed)


def test_full_state_dict_is_a_gated_checkpoint(fsdp, tmp_path):
    out = fsdp[0]
    model, _ = one_process("full")
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model.eval()(ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(out / "checkpoint").eval()
        torch.testing.assert_close(loaded(ids).logits, reference, **TOLERANCE)
    script = BLOCK_GATED_PATCH + textwrap.dedent("""
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
        with torch.no_grad():
            torch.save(model(torch.tensor(json.loads(sys.argv[2]))).logits, sys.argv[3])
        """)
    _run(tmp_path, script, str(out / "checkpoint"), json.dumps(ids.tolist()), str(tmp_path / "logits.pt"))
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), reference, **TOLERANCE)


@pytest.mark.parametrize("route", GATE_ONLY_ROUTES)
def test_gate_adapter_saved_under_fsdp_holds_the_trained_gates(fsdp, route):
    directory = fsdp[0] / f"adapter_{route}"
    peft_model = gated_patch.get_gated_peft_model(worker.gated_model(), gated_patch.gate_only_config(route=route))
    losses = worker.train(peft_model, worker.optimizer_for(peft_model), worker.batches())
    assert fsdp[1][f"peft_{route}_losses"] == pytest.approx(losses, rel=1e-5)
    trained = {name: p.detach() for name, p in peft_model.named_parameters() if p.requires_grad}
    saved = load_file(directory / "adapter_model.safetensors")
    assert len(saved) == len(trained) and all(".attn_gate." in name for name in saved)
    initial = gated_patch.get_gated_peft_model(worker.gated_model(), gated_patch.gate_only_config(route=route))
    for name, tensor in initial.named_parameters():
        if tensor.requires_grad:  # the saved tensors are the trained values, not the initial ones
            match = next(key for key in saved if key.replace(".weight", "").replace(".bias", "")
                         in name.replace(".default", "") and key.rsplit(".", 1)[1] == name.rsplit(".", 1)[1])
            assert not torch.equal(saved[match], tensor.detach()), match
            torch.testing.assert_close(saved[match], trained[name], **TOLERANCE)
    loaded = gated_patch.load_gated_adapter(tiny_model("llama"), directory)
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, peft_model.eval()(ids).logits, **TOLERANCE)


def test_activation_checkpointing_gives_the_same_gradients(fsdp):
    plain, checkpointed = fsdp[1]["grads_checkpointing_False"], fsdp[1]["grads_checkpointing_True"]
    assert sorted(plain) == sorted(checkpointed) and any(".attn_gate." in name for name in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=0, rtol=0, msg=name)
