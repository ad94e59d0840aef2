"""Interrupted conversion: ``gated-patch-convert`` killed with SIGKILL at random points of a run, and two converters
racing to the same OUT.

The converter runs in child processes forked from a forkserver that has imported it once (so each run costs
milliseconds, not an interpreter start). The child reports each file-level step of the conversion (each shard written
or copied, the final rename) over a pipe; the parent picks a step and a random delay from a seeded RNG and sends
SIGKILL. Afterwards: SRC is byte-identical, OUT is absent or exactly the complete result of an uninterrupted run
(same bytes, loads, same logits), and rerunning the same command succeeds. Counts are reported in README.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

import gated_patch  # noqa: F401  (registers the gated checkpoint classes)
from gated_patch import GateConfig, gate_config
from conversion.convert import convert

#: SIGKILL runs: fresh OUT, and OUT replaced with --overwrite (reported in README)
KILLS_FRESH = 16
KILLS_OVERWRITE = 6
RACES = 3
ARGS = ["--no-progress", "--granularity", "headwise"]
IDS = torch.tensor([[1, 5, 7, 9, 11, 13, 17, 3, 4, 5, 6, 7]])
RACE_OUTCOMES: list[str] = []


def _converter_child(argv: list[str], conn) -> None:
    """Run gated-patch-convert, reporting each step on `conn` (runs in a forked child)."""
    import shutil as shutil_module

    from conversion import convert as cli
    from conversion import write as module

    def reporting(name, function, pause=0.003):
        def wrapper(*args, **kwargs):
            conn.send(name)
            result = function(*args, **kwargs)
            time.sleep(pause)  # every step takes a few ms, so a kill's random delay spans only a few steps
            return result

        return wrapper

    module.write_safetensors = reporting("write", module.write_safetensors)
    shutil_module.copyfile = reporting("copy", shutil_module.copyfile)
    module._commit = reporting("commit", module._commit)
    os.replace = reporting("replace", os.replace, pause=0.05)  # wide window inside the --overwrite swap
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(argv)
    conn.send(f"exit {code} {err.getvalue().strip()}")


@pytest.fixture(scope="module")
def context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["conversion.convert", "gated_patch", "test_interrupted_conversion"])
    return ctx


def start(ctx, argv):
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_converter_child, args=(argv, child), daemon=True)
    process.start()
    child.close()
    return process, parent


def run_to_end(ctx, argv) -> tuple[int, list[str]]:
    process, conn = start(ctx, argv)
    steps = []
    while True:
        try:
            message = conn.recv()
        except EOFError:
            break
        steps.append(message)
        if message.startswith("exit"):
            break
    process.join(60)
    return int(steps[-1].split()[1]) if steps and steps[-1].startswith("exit") else process.exitcode, steps


def kill_at(ctx, argv, step: int, delay: float) -> str:
    """Start a conversion and SIGKILL it `delay` seconds after its `step`-th report (-1: after the start)."""
    process, conn = start(ctx, argv)
    seen = 0
    if step >= 0:
        while seen <= step:
            if not conn.poll(60):
                raise AssertionError("converter child stopped reporting")
            try:
                message = conn.recv()
            except EOFError:
                break
            if message.startswith("exit"):
                break
            seen += 1
    time.sleep(delay)
    outcome = "finished" if process.exitcode is not None else "killed"
    os.kill(process.pid, signal.SIGKILL)
    process.join(30)
    assert process.exitcode is not None
    return outcome


def digest(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupted")
    src = root / "src"
    tiny_model("llama").save_pretrained(src, max_shard_size="20KB")
    assert len(list(src.glob("model-*.safetensors"))) >= 10
    return src


@pytest.fixture(scope="module")
def reference(source, context):
    """The uninterrupted result (bytes and logits) and the number of steps a run reports."""
    out = source.parent / "reference"
    code, steps = run_to_end(context, [str(source), str(out), *ARGS])
    assert code == 0, steps
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert gate_config(model) == GateConfig(granularity="headwise")
    with torch.no_grad():
        logits = model(IDS).logits
    work = [s for s in steps if not s.startswith("exit")]
    assert work.count("commit") == 1 and len(work) >= 10
    return digest(out), logits, len(work)


def check_complete(out: Path, reference) -> None:
    expected_digest, expected_logits, _ = reference
    assert digest(out) == expected_digest  # complete: every file, byte for byte
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out).eval()(IDS).logits, expected_logits)


def leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_sigkill_at_random_points(tmp_path, source, reference, context):
    src_digest = digest(source)
    steps = reference[2]
    rng = random.Random(2026)
    outcomes = {"absent": 0, "complete": 0}
    for run in range(KILLS_FRESH):
        out = tmp_path / f"out{run}"
        # run 0: right after the start; runs 1-3: around the final rename; the rest: anywhere in the run
        step = -1 if run == 0 else steps - 1 if run <= 3 else rng.randrange(steps)
        delay = 0.0 if run == 0 else rng.uniform(0.0, 0.002 if run <= 3 else 0.02)
        kill_at(context, [str(source), str(out), *ARGS], step, delay)
        assert digest(source) == src_digest
        if out.exists():
            check_complete(out, reference)
            outcomes["complete"] += 1
        else:
            outcomes["absent"] += 1
            assert not out.exists()
        # rerunning the same command succeeds (an already complete OUT needs --overwrite, by design)
        convert(str(source), out, GateConfig(granularity="headwise"), overwrite=out.exists(), progress=False,
                log=lambda _: None)
        check_complete(out, reference)
        for stale in leftovers(tmp_path, out.name):  # a killed run's temporary directory: never OUT itself
            shutil.rmtree(stale)
    print(f"SIGKILL outcomes (fresh OUT): {outcomes}")
    assert outcomes["absent"] >= 1, outcomes  # run 0 is killed before it can finish


def test_sigkill_while_overwriting_loses_nothing(tmp_path, source, reference, context):
    """Replacing an existing OUT (--overwrite) and killed: OUT is the old or the new complete checkpoint; if the kill
    lands between the two renames of the swap, the old one is intact in the `.OUT.tmp-*` directory beside it."""
    rng = random.Random(7)
    old = tmp_path / "old"
    tiny_model("llama", seed=5).save_pretrained(old)
    old_digest = digest(old)
    seen = {"old": 0, "new": 0, "old kept beside": 0}
    probe = tmp_path / "probe"
    shutil.copytree(old, probe)
    code, sequence = run_to_end(context, [str(source), str(probe), *ARGS, "--overwrite"])
    assert code == 0
    swap = sequence.index("commit") + 1  # the first rename of the swap: old OUT moved aside
    assert sequence[swap] == "replace"
    for run in range(KILLS_OVERWRITE):
        out = tmp_path / f"out{run}"
        shutil.copytree(old, out)
        # runs 0-1: between the two renames of the swap; the rest: anywhere
        step, delay = (swap, 0.01) if run < 2 else (rng.randrange(len(sequence) - 1), rng.uniform(0.0, 0.02))
        kill_at(context, [str(source), str(out), *ARGS, "--overwrite"], step, delay)
        if out.exists() and digest(out) == old_digest:
            seen["old"] += 1  # killed before the swap: old OUT intact
        elif out.exists():
            check_complete(out, reference)
            seen["new"] += 1
        else:  # killed inside the swap: the old OUT is kept, whole, beside it
            kept = [p / "old" for p in leftovers(tmp_path, out.name) if (p / "old").is_dir()]
            assert len(kept) == 1 and digest(kept[0]) == old_digest
            seen["old kept beside"] += 1
            for stale in leftovers(tmp_path, out.name):
                shutil.rmtree(stale)
        convert(str(source), out, GateConfig(granularity="headwise"), overwrite=out.exists(), progress=False,
                log=lambda _: None)
        check_complete(out, reference)
    print(f"SIGKILL outcomes (--overwrite): {seen}")
    assert seen["old kept beside"] >= 1, seen


def test_two_converters_racing_to_the_same_out(tmp_path, source, reference, context):
    """Both start before either finishes: exactly one writes OUT (complete); the other refuses with a clear error
    and leaves no temporary directory."""
    for race in range(RACES):
        out = tmp_path / f"out{race}"
        argv = [str(source), str(out), *ARGS]
        first, first_conn = start(context, argv)
        second, second_conn = start(context, argv)
        codes, errors = [], []
        for process, conn in ((first, first_conn), (second, second_conn)):
            messages = []
            while True:
                try:
                    messages.append(conn.recv())
                except EOFError:
                    break
                if messages[-1].startswith("exit"):
                    break
            process.join(60)
            codes.append(int(messages[-1].split()[1]))
            errors.append(messages[-1].split(maxsplit=2)[2] if codes[-1] else "")
        assert sorted(codes) == [0, 2], (codes, errors)
        loser = next(e for e in errors if e)
        # refused at the final rename (both ran to the end) or, if the winner was already done, at the start
        assert f"OUT {out}: created by another process" in loser or f"OUT {out}: already exists" in loser, loser
        RACE_OUTCOMES.append("at-rename" if "another process" in loser else "at-start")
        check_complete(out, reference)
        assert leftovers(tmp_path, out.name) == []
    print(f"race losers refused: {RACE_OUTCOMES}")


def test_racing_loser_message(tmp_path, source, capsys, monkeypatch):
    """The refusal names OUT and says why: deterministic version of the race (OUT appears just before the rename)."""
    from conversion import convert as cli
    from conversion import write as module

    out = tmp_path / "out"
    original = module._commit

    def other_process_wins(tmp, target, overwrite=False):
        shutil.copytree(tmp, target)  # the other converter's complete result lands first
        return original(tmp, target, overwrite)

    monkeypatch.setattr(module, "_commit", other_process_wins)
    code = cli.main([str(source), str(out), *ARGS])
    err = capsys.readouterr().err
    assert code == 2 and f"OUT {out}: created by another process" in err and "Traceback" not in err
    assert leftovers(tmp_path, "out") == []
