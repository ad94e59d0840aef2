"""Fine-tune attention output gates (optionally with LoRA) on Python's reference prose, and measure it.

Trains SmolLM2-135M-Instruct (or any local checkpoint, ``--model DIR``) on ``pydoc_data.topics.topics`` (the text of
Python's language reference shipped with CPython), split by topic into train and held-out sets, with the
transformers `Trainer`. Prints held-out perplexity before and after, trainable parameters, the size of what it saves
(adapter, or the whole model for ``--mode full``), peak memory (RSS) and the median time per optimizer step.

Modes:
    gates       only the attention gates train (identity init: starts exactly at the base model's perplexity)
    gates+lora  gates plus LoRA on ``--lora-targets``
    gate-lora   LoRA on the gate projections (plus ``--lora-targets`` if given)
    lora        LoRA alone on the ungated model (baseline)
    full        every weight of the ungated model (baseline)

Examples::

    python examples/finetune_gates.py                              # gate-only, the README table's settings
    python examples/finetune_gates.py --mode gates+lora --granularity headwise --steps 60
    accelerate launch --num_processes 2 --cpu examples/finetune_gates.py --steps 20   # DDP over gloo
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

MODES = ("gates", "gates+lora", "gate-lora", "lora", "full")
GATED_MODES = ("gates", "gates+lora", "gate-lora")
DEFAULT_LR = {"gates": 1e-3, "gates+lora": 1e-3, "gate-lora": 1e-3, "lora": 1e-3, "full": 5e-5}
HELD_OUT_FRACTION = 0.1
SPLIT_SEED = 0  # fixed: every run evaluates on the same held-out topics, whatever --seed says


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="local checkpoint dir (default: the packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--mode", choices=MODES, default="gates")
    parser.add_argument("--granularity", choices=("elementwise", "headwise"), default="elementwise")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2, help="per process")
    parser.add_argument("--lr", type=float, default=None, help=f"learning rate (default per mode: {DEFAULT_LR})")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=int, default=None, help="default: 2 * r")
    parser.add_argument(
        "--lora-targets",
        default=None,
        help="comma-separated projections, or all-linear (default: q_proj,v_proj; none for gate-lora)",
    )
    parser.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks of --seq-len tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="keep the trained adapter (or model) here")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser.parse_args(argv)


class Blocks(Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict:
        ids = self.blocks[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def corpus_blocks(tokenizer, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Train and held-out token blocks from pydoc_data.topics, split by topic (fixed split)."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    random.Random(SPLIT_SEED).shuffle(names)
    held_out = sorted(names[: max(1, round(len(names) * HELD_OUT_FRACTION))])
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def stream(keys):
        ids = []
        for key in keys:
            ids.extend(tokenizer(topics[key])["input_ids"] + eos)
        usable = len(ids) // seq_len * seq_len
        return torch.tensor(ids[:usable], dtype=torch.long).view(-1, seq_len)

    train = stream(sorted(set(names) - set(held_out)))
    return train, stream(held_out), held_out


def build_model(args):
    """``(model, description)`` ready for training in `args.mode`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import gated_patch
    from gated_patch.adapters import gate_lora_config, gate_only_config, gates_and_lora_config, get_gated_peft_model

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    alpha = args.lora_alpha or 2 * args.lora_r
    targets = args.lora_targets
    if targets is None:
        targets = "" if args.mode == "gate-lora" else "q_proj,v_proj"
    targets = targets if targets == "all-linear" else [t for t in targets.split(",") if t]
    if args.mode in GATED_MODES:
        gated_patch.patch_model(model, gated_patch.GateConfig(granularity=args.granularity))
        if args.mode == "gates":
            config = gate_only_config()
        elif args.mode == "gates+lora":
            config = gates_and_lora_config(r=args.lora_r, lora_alpha=alpha, target_modules=targets)
        else:
            config = gate_lora_config(model, r=args.lora_r, lora_alpha=alpha, target_modules=targets or ())
        return get_gated_peft_model(model, config)
    if args.mode == "lora":
        return get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=alpha, target_modules=targets, task_type="CAUSAL_LM"))
    return model


def weights_size_bytes(directory: Path) -> int:
    """Bytes of the saved weights (adapter or model files; not the Trainer's training_args.bin)."""
    return sum(
        p.stat().st_size
        for p in directory.rglob("*")
        if p.suffix == ".safetensors" or (p.suffix == ".bin" and p.name != "training_args.bin")
    )


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def requested_cpu_processes() -> int:
    """How many processes ``accelerate launch --cpu --num_processes N`` asked for, when it started only one.

    accelerate 1.x sends ``--cpu`` runs without an MPI hostfile to its "simple" launcher, which starts ONE process
    (setting only MASTER_ADDR/MASTER_PORT), so ``--num_processes 2 --cpu`` would silently train single-process.
    That case is recognised here and N is read from the launcher's command line (Linux /proc); 1 otherwise.
    """
    env = os.environ
    if env.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1") or "MASTER_PORT" not in env or "WORLD_SIZE" in env:
        return 1
    try:
        launcher = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        launcher = []
    for index, arg in enumerate(launcher):
        for flag in ("--num_processes", "--num-processes"):
            if arg == flag and index + 1 < len(launcher):
                return int(launcher[index + 1])
            if arg.startswith(flag + "="):
                return int(arg.split("=", 1)[1])
    print(
        "WARNING: accelerate launched this --cpu run as a single process and the requested --num_processes could "
        "not be read; training single-process. For DDP on CPU use: torchrun --nproc_per_node N "
        "examples/finetune_gates.py ...",
        file=sys.stderr,
    )
    return 1


def relaunch_as_ddp(processes: int, argv) -> None:
    """Replace this process by ``torch.distributed.run`` with `processes` workers (DDP; gloo on CPU)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
        f"--master_addr={os.environ.get('MASTER_ADDR', '127.0.0.1')}", f"--master_port={os.environ['MASTER_PORT']}",
        os.path.abspath(__file__), *argv,
    ]  # fmt: skip
    print(f"accelerate --cpu started one process; relaunching as {processes} DDP processes: {' '.join(command)}", flush=True)
    sys.stdout.flush()
    os.execv(sys.executable, command)


def check_processes_in_sync(model) -> None:
    """Under DDP every process must hold the same trained weights; raise if they diverged."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters() if p.requires_grad]).sum()
    low, high = checksum.clone().view(1), checksum.clone().view(1)
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    if low.item() != high.item():
        raise RuntimeError(
            f"DDP processes hold different trained weights (checksums {low.item()} .. {high.item()}): gradients "
            "were not synchronised. Check that the model was wrapped in DistributedDataParallel."
        )


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments, set_seed

    if args.model is None:
        from gated_patch.default_model import default_model_dir

        args.model = str(default_model_dir())
    args.lr = args.lr if args.lr is not None else DEFAULT_LR[args.mode]
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train_blocks, held_out_blocks, held_out_topics = corpus_blocks(tokenizer, args.seq_len)
    eval_blocks = held_out_blocks[: args.eval_blocks]
    model = build_model(args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            step_times.append(time.perf_counter() - self.start)

    work = Path(tempfile.mkdtemp(prefix="finetune_gates-"))
    training_args = TrainingArguments(
        output_dir=str(work / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=max(1, args.steps // 10),
        weight_decay=0.0,
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        data_seed=args.seed,
        dataloader_drop_last=True,
        label_names=["labels"],
        ddp_find_unused_parameters=False,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=Blocks(train_blocks),
        eval_dataset=Blocks(eval_blocks),
        callbacks=[StepTimer()],
    )
    main_process = trainer.is_world_process_zero()
    if main_process:
        print(
            f"mode={args.mode} granularity={args.granularity if args.mode in GATED_MODES else '-'} "
            f"model={args.model}\ntrain: {len(train_blocks)} blocks x {args.seq_len} tokens; held-out: "
            f"{len(eval_blocks)} blocks from {len(held_out_topics)} topics; processes: {training_args.world_size}\n"
            f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)",
            flush=True,
        )
    ppl_before = float(torch.exp(torch.tensor(trainer.evaluate()["eval_loss"])))
    # transformers 5.23 / accelerate 1.15: evaluate() marks the model "accelerate-prepared" (for evaluation only),
    # and the train() that follows then skips the DDP wrap: every process would silently train its own copy.
    model.__dict__.pop("_is_accelerate_prepared", None)
    trainer.train()
    check_processes_in_sync(model)
    ppl_after = float(torch.exp(torch.tensor(trainer.evaluate()["eval_loss"])))

    save_dir = Path(args.output_dir) if args.output_dir else work / "saved"
    trainer.save_model(str(save_dir))
    trainer.accelerator.wait_for_everyone()
    results = {
        "mode": args.mode,
        "granularity": args.granularity if args.mode in GATED_MODES else None,
        "model": args.model,
        "steps": args.steps,
        "seq_len": args.seq_len,
        "batch_size_per_process": args.batch_size,
        "processes": training_args.world_size,
        "distributed": str(trainer.accelerator.distributed_type.value),
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "lr": args.lr,
        "lora_r": args.lora_r if args.mode in ("gates+lora", "gate-lora", "lora") else None,
        "lora_targets": args.lora_targets,
        "seed": args.seed,
        "trainable_params": trainable,
        "total_params": total,
        "saved_mb": weights_size_bytes(save_dir) / 1e6 if main_process else None,
        "saved_files": sorted(p.name for p in save_dir.iterdir()) if main_process else None,
        "peak_rss_mib": peak_rss_mib(),
        "s_per_step_median": statistics.median(step_times[1:] or step_times),
        "ppl_before": ppl_before,
        "ppl_after": ppl_after,
        "eval_tokens": int(eval_blocks.numel()),
    }
    if main_process:
        what = "model" if args.mode == "full" else "adapter"
        print(
            f"\nheld-out perplexity: {ppl_before:.3f} -> {ppl_after:.3f}\n"
            f"trainable parameters: {trainable:,}\n"
            f"{what} size on disk: {results['saved_mb']:.2f} MB ({save_dir if args.output_dir else 'temporary'})\n"
            f"peak memory (RSS, this process): {results['peak_rss_mib']:.0f} MiB\n"
            f"step time (median of {max(1, len(step_times) - 1)} steps): {results['s_per_step_median']:.3f} s",
            flush=True,
        )
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    _processes = requested_cpu_processes()
    if _processes > 1:
        relaunch_as_ddp(_processes, sys.argv[1:])
    main(sys.argv[1:])
