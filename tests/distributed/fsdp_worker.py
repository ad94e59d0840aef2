"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on a gated model; the test compares with `train` in one process.

Run under ``torchrun --nproc_per_node 2``: ``fsdp_worker.py OUT_DIR``. Each rank trains on its half of every global
batch; rank 0 writes what the test compares into OUT_DIR (``results.pt``, saved checkpoints and adapters).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import tiny_model  # noqa: E402

import gated_patch  # noqa: E402
from gated_patch import GateConfig  # noqa: E402
from gated_patch.adapters import GATE_ONLY_ROUTES  # noqa: E402
from gated_patch.adapters.record import base_gate_tensors, fingerprint  # noqa: E402

STEPS, GLOBAL_BATCH, SEQ = 4, 4, 16
GATE = GateConfig(granularity="headwise", init="paper")
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def gated_model(seed: int = 0):
    model = gated_patch.patch_model(tiny_model("llama", seed=seed), GATE)
    return model.train()


def batches(steps: int = STEPS) -> torch.Tensor:
    return torch.randint(3, 97, (steps, GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def freeze_all_but_gates(model) -> None:
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".attn_gate." in name)


def optimizer_for(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)


def train(model, optimizer, data: torch.Tensor, rank: int = 0, world: int = 1) -> list[float]:
    """One optimizer step per global batch on this rank's rows (FSDP averages the gradients over ranks); the losses,
    averaged over ranks."""
    losses = []
    for batch in data:
        rows = batch.chunk(world)[rank]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean, op=dist.ReduceOp.AVG)
        losses.append(mean.item())
    return losses


shard = gated_patch.fully_shard_gated  # each decoder layer, then the root: the gates shard with their layers


def full_state(model) -> dict[str, torch.Tensor]:
    return get_model_state_dict(model, options=FULL)  # a collective: every rank calls it


def gradients(model, data: torch.Tensor, rank: int, world: int) -> dict[str, torch.Tensor]:
    rows = data[0].chunk(world)[rank]
    model(input_ids=rows, labels=rows).loss.backward()
    grads = {name: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
             for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world, out = dist.get_rank(), dist.get_world_size(), Path(out)
    data, results = batches(), {}

    # full training and gate-only training
    for mode in ("full", "gates"):
        model = gated_model()
        if mode == "gates":
            freeze_all_but_gates(model)
        shard(model)
        results[f"{mode}_losses"] = train(model, optimizer_for(model), data, rank, world)
        results[f"{mode}_state"] = full_state(model)
        if mode == "full" and rank == 0:  # the full state dict as a gated checkpoint
            gated_model().save_pretrained(out / "checkpoint", state_dict=dict(results["full_state"]))  # it empties it

    # sharded checkpoint (torch.distributed.checkpoint) and exact resume
    model = shard(gated_model())
    optimizer = optimizer_for(model)
    train(model, optimizer, data[:2], rank, world)
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(out / "dcp"))
    train(model, optimizer, data[2:], rank, world)
    results["uninterrupted"] = full_state(model)
    model = shard(gated_model(seed=5))  # other weights: everything must come from the checkpoint
    optimizer = optimizer_for(model)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(out / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(model, optimizer, data[2:], rank, world)
    results["resumed"] = full_state(model)

    # PEFT gate-only recipes: the saved adapter holds the trained gates
    for route in GATE_ONLY_ROUTES:
        peft_model = shard(gated_patch.get_gated_peft_model(gated_model(), gated_patch.gate_only_config(route=route)))
        results[f"peft_{route}_losses"] = train(peft_model, optimizer_for(peft_model), data, rank, world)
        state = full_state(peft_model)
        if rank == 0:
            peft_model.save_pretrained(out / f"adapter_{route}", state_dict=state)

    # activation checkpointing gives the same gradients
    for checkpointing in (False, True):
        model = gated_model()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        results[f"grads_checkpointing_{checkpointing}"] = gradients(shard(model), data, rank, world)

    # the gate fingerprint of a sharded model (what a PEFT wrap of it records) gathers the shards: every rank
    results["sharded_gate_fingerprint"] = fingerprint(base_gate_tensors(shard(gated_model())))

    if rank == 0:
        torch.save(results, out / "results.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
