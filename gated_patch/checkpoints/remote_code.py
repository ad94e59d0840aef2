"""The remote code of a gated checkpoint, ``modeling_gated_attention.py``, generated from the plugin's own core.

The generator takes from ``gated_patch/core`` exactly the definitions that the checkpoint classes need (the names
reachable from `ROOTS`), in source order, shortens their docstrings to their one-line summary, and checks the result: at most
`MAX_LINES` lines, imports of torch, transformers and a few standard-library modules only, no private names, no
`exec`/`eval`-like builtins, and a check at import that the running transformers is inside the range the file was
generated for. Every checkpoint written by one gated_patch version carries the same bytes. Print it with ``gated-patch remote-code``.
"""

from __future__ import annotations

import ast
import os
from functools import lru_cache
from pathlib import Path

from ..core.versions import MAX_TRANSFORMERS, MIN_TRANSFORMERS
from ..version import __version__
from ..files import atomic_write

REMOTE_CODE_FILE = "modeling_gated_attention.py"
REMOTE_MODULE = REMOTE_CODE_FILE[: -len(".py")]
CORE = Path(__file__).resolve().parent.parent / "core"
PARTS = ("errors", "versions", "config", "gate", "hooks", "parallel", "model")  # gated_patch/core/<part>.py, in order
ROOTS = ("check_transformers_version", "GatedPreTrainedMixin", "gated_config_class", "__getattr__")
ALLOWED_IMPORTS = ("torch", "transformers")
ALLOWED_STDLIB = ("__future__", "collections", "dataclasses", "functools", "itertools", "math", "re", "sys", "typing")
FORBIDDEN_BUILTINS = frozenset({"__import__", "breakpoint", "compile", "eval", "exec", "globals", "locals", "open"})
OWN_KEY_PREFIX = "_gated_attention_"  # the gate's own keys in a module's __dict__ (core/hooks.py)
ALLOWED_PRIVATE = ("_init_weights",)  # the method transformers documents for models that add parameters
MAX_LINES = 285


def _alias(alias: ast.alias) -> str:
    return alias.name if alias.asname is None else f"{alias.name} as {alias.asname}"


def _defined_names(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return {node.name}
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    return {name.id for target in targets for name in ast.walk(target) if isinstance(name, ast.Name)}


def _with_short_docstrings(lines: list[str], node: ast.stmt) -> str:
    """The source lines of `node` (decorators and comments included), docstrings cut to their summary line (which must
    be a whole sentence), those of private functions dropped, and blank lines dropped."""
    first = min([node.lineno] + [decorator.lineno for decorator in getattr(node, "decorator_list", [])])
    cut, closed = set(), set()  # lines dropped; summary lines that get the docstring's closing quotes
    for inner in ast.walk(node):
        body = getattr(inner, "body", None)
        if not (isinstance(inner, (ast.FunctionDef, ast.ClassDef)) and isinstance(body[0], ast.Expr) and isinstance(
                body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            continue
        start, end = body[0].lineno, body[0].end_lineno
        if isinstance(inner, ast.FunctionDef) and inner.name.startswith("_") and not inner.name.startswith("__"):
            cut.update(range(start, end + 1))  # a private helper: its code says what it does
        elif end > start:
            if not lines[start - 1].rstrip().endswith("."):
                raise RuntimeError(f"gated_patch/core: the docstring of {inner.name} (line {start}) must begin "
                                   "with a one-line summary sentence; the remote code keeps only that line.")
            cut.update(range(start + 1, end + 1))
            closed.add(start)
    kept = [lines[number - 1] + ('"""' if number in closed else "") for number in range(first, node.end_lineno + 1)
            if number not in cut and lines[number - 1].strip()]
    return "\n".join(kept)


@lru_cache(maxsize=1)
def remote_code_source() -> str:
    """The text of ``modeling_gated_attention.py``."""
    parts, modules, names_from, definitions = [], set(), {}, {}
    for part in PARTS:
        source = (CORE / f"{part}.py").read_text(encoding="utf-8")
        tree = ast.parse(source)
        parts.append((part, source.splitlines(), tree.body))
        for node in tree.body:
            if isinstance(node, ast.Import):
                modules.update(_alias(alias) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
                names_from.setdefault(node.module, set()).update(_alias(alias) for alias in node.names)
            for name in _defined_names(node):
                if name in definitions:
                    raise RuntimeError(f"gated_patch/core defines {name!r} twice; the remote code needs unique names.")
                definitions[name] = node
    kept, todo = set(), list(ROOTS)
    while todo:
        node = definitions.get(todo.pop())
        if node is not None and id(node) not in kept:
            kept.add(id(node))
            todo.extend(name.id for name in ast.walk(node) if isinstance(name, ast.Name))
    lines = [f'"""Gated attention (Qiu et al. 2025, arXiv 2505.06708): the code of a gated checkpoint for transformers>='
             f"{MIN_TRANSFORMERS},<{MAX_TRANSFORMERS}, generated by gated_patch",
             f"{__version__} from gated_patch/core/{{{','.join(PARTS)}}}.py, in that order (from_pretrained(path, "
             'trust_remote_code=True); with gated_patch installed, `import gated_patch` instead)."""']
    lines += [f"import {module}" for module in sorted(modules)]
    lines += [f"from {module} import {', '.join(sorted(names))}" for module, names in sorted(names_from.items())]
    for part, source, body in parts:
        for node in body:
            if id(node) in kept:
                lines.append(_with_short_docstrings(source, node))
        if part == "versions":  # the version check runs before anything else is defined
            lines.append("check_transformers_version()  # at import: refuse a transformers this file was not made for")
    text = "\n".join(lines) + "\n"
    check_remote_code(text)
    return text


def imported_top_level_modules(source: str) -> set[str]:
    """Top-level names of every module `source` imports (relative imports as ``"."``)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." if node.level else node.module.split(".")[0])
    return names


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_attributes(source: str) -> set[str]:
    """Every private name `source` reaches: ``x._name`` attributes, modules and names it imports (``torch._C``,
    ``from m import _name``) and string literals naming one (``getattr(torch, "_C")``, ``m.__dict__["_hooks"]``);
    the file's own ``__dict__`` keys (`OWN_KEY_PREFIX`) and dunders aside."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            names.update(part for module in modules for part in module.split("."))
            if isinstance(node, ast.ImportFrom):
                names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
            names.add(node.value)
    return {name for name in names if _is_private(name) and not name.startswith(OWN_KEY_PREFIX)}


def remote_code_problems(source: str) -> list[str]:
    """What makes `source` unfit to ship as remote code (empty if nothing)."""
    problems = []
    if source.count("\n") > MAX_LINES:
        problems.append(f"{source.count(chr(10))} lines (at most {MAX_LINES})")
    imports = sorted(imported_top_level_modules(source) - set(ALLOWED_IMPORTS) - set(ALLOWED_STDLIB))
    if imports:
        problems.append(f"imports {imports} (allowed: {sorted(ALLOWED_IMPORTS + ALLOWED_STDLIB)})")
    private = sorted(private_attributes(source) - set(ALLOWED_PRIVATE))
    if private:
        problems.append(f"private names {private} (allowed: {list(ALLOWED_PRIVATE)})")
    builtins = sorted({node.id for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Name)} & FORBIDDEN_BUILTINS)
    if builtins:
        problems.append(f"runs or reads code or files with {builtins}")
    return problems


def check_remote_code(source: str) -> None:
    """Refuse remote code that is too long to audit, imports anything beyond torch, transformers and `ALLOWED_STDLIB`,
    reaches a private name other than transformers' documented `_init_weights` hook, or can run code it does not
    show (`FORBIDDEN_BUILTINS`). A guard against drift in gated_patch/core, not a sandbox: read the file."""
    problems = remote_code_problems(source)
    if problems:
        raise RuntimeError(f"The generated {REMOTE_CODE_FILE} has {'; '.join(problems)}: keep gated_patch/core short, "
                           "on public APIs and free of other imports.")


def write_remote_code(directory: str | os.PathLike) -> Path:
    """Write ``modeling_gated_attention.py`` into `directory` (atomically) and return its path."""
    return atomic_write(Path(directory) / REMOTE_CODE_FILE, remote_code_source())
