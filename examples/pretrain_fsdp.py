"""Pretrain a small gated Llama from scratch (paper init), in one process or sharded with FSDP2 under torchrun: the
same global batches, the same result.

    python examples/pretrain_fsdp.py --output-dir outputs/pretrain_fsdp/one
    torchrun --nproc_per_node 2 examples/pretrain_fsdp.py --output-dir outputs/pretrain_fsdp/fsdp

Under torchrun each rank trains on its share of every global batch (``--batch-size`` rows in all) and the model is
sharded with `gated_patch.fully_shard_gated` (gloo on CPU, nccl on GPU). Data: the bytes of the Python reference
prose in `pydoc_data.topics` (256 token ids, no tokenizer needed). Writes ``results.json`` (losses per step) and the
trained model as a gated checkpoint (``checkpoint/``, gathered from the shards on rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from pydoc_data.topics import topics
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm.auto import tqdm
from transformers import LlamaConfig

import gated_patch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8, help="global batch (rows), split over the processes")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--granularity", choices=["elementwise", "headwise"], default="elementwise")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="outputs/pretrain_fsdp")
    return p.parse_args(argv)


def corpus() -> torch.Tensor:
    text = "\n\n".join(topics[name] for name in sorted(topics))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def main(argv=None) -> int:
    args = parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must divide by the number of processes ({world}).")

    config = LlamaConfig(vocab_size=256, hidden_size=args.d_model, intermediate_size=4 * args.d_model,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         max_position_embeddings=args.seq_len, tie_word_embeddings=False)
    torch.manual_seed(args.seed)  # every rank builds the same initial model
    model = gated_patch.gated_model_from_config(config, {"granularity": args.granularity, "init": "paper"}).train()
    if distributed:
        gated_patch.fully_shard_gated(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)

    ids = corpus()
    starts = torch.randint(0, len(ids) - args.seq_len, (args.steps, args.batch_size),
                           generator=torch.Generator().manual_seed(args.seed))
    losses = []
    for step in tqdm(range(args.steps), disable=rank != 0, desc=f"pretraining ({world} process{'es' * (world > 1)})"):
        rows = torch.stack([ids[s:s + args.seq_len] for s in starts[step].chunk(world)[rank].tolist()])
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        if distributed:
            dist.all_reduce(mean, op=dist.ReduceOp.AVG)
        losses.append(mean.item())

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        out = Path(args.output_dir)
        model.save_pretrained(out / "checkpoint", state_dict=state)
        (out / "results.json").write_text(json.dumps({"processes": world, "losses": losses}, indent=1))
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; gated checkpoint in {out / 'checkpoint'}")
    if distributed:
        dist.barrier()  # both ranks leave together: no rank tears down while its peer is still saving
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
