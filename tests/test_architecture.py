"""Static checks of the code base: no import cycles, the library never imports the scripts in conversion/, distinct
class names, and a remote-code file that a person can audit (short, public APIs only, torch + transformers + stdlib)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import conftest
import pytest
from conftest import real_model_tests_not_marked_slow

import gated_patch.checkpoints.remote_code as remote_code_module
from gated_patch.checkpoints.remote_code import (MAX_LINES, check_remote_code, private_attributes, remote_code_problems,
                                                 remote_code_source)

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gated_patch", "conversion")


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def import_graph() -> dict[str, set[str]]:
    """Module -> project modules it imports, at module level or inside functions.

    Importing ``a.b.c`` also runs the ``__init__`` of ``a`` and ``a.b`` (unless the importer is inside them, when they
    are already being imported); ``from a import name`` where ``name`` is not a submodule needs ``a``'s ``__init__`` to
    have defined it, so it is an edge to ``a`` even from inside ``a``.
    """
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        targets = set()

        def add(name: str, explicit: bool) -> None:
            parts = name.split(".")
            for end in range(1, len(parts) + 1):
                target = ".".join(parts[:end])
                inside = module == target or module.startswith(target + ".")
                if target in modules and target != module and (not inside or (explicit and end == len(parts))):
                    targets.add(target)

        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, explicit=False)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, path, node)
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    add(submodule, explicit=False) if submodule in modules else add(base, explicit=True)
        graph[module] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert {"gated_patch", "gated_patch.core.hooks", "conversion.convert"} <= set(graph)
    assert "gated_patch.patching" in graph["gated_patch"]  # the graph sees the package's imports
    assert find_cycles(graph) == []


#: The layers of docs/design.md, bottom up: a module may import its own layer and those below, never one above.
LAYERS = (
    ("ground: the gate", ("gated_patch.core", "gated_patch.version")),
    ("on disk, and the structure guard", ("gated_patch.files", "gated_patch.checkpoints", "gated_patch.guards")),
    ("gating and families", ("gated_patch.gating", "gated_patch.discovery", "gated_patch.families")),
    ("the library's users", ("gated_patch.patching", "gated_patch.loading", "gated_patch.sharding", "gated_patch.adapters",
                             "gated_patch.diagnostics", "gated_patch.vllm", "gated_patch.cli", "gated_patch.demo",
                             "gated_patch.default_model", "gated_patch.arguments", "gated_patch")),
    ("conversion", ("conversion",)),
)


def layer_of(module: str) -> int:
    """The layer of `module`: the one holding the longest package prefix of its name."""
    matches = [(len(prefix), index) for index, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer of LAYERS (docs/design.md): place it"
    return max(matches)[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
                  for module, targets in graph.items() for target in targets if layer_of(target) > layer_of(module))


def test_imports_never_run_up_the_layers():
    assert upward_imports(import_graph()) == []
    assert layer_of("gated_patch.core.model") == 0 and layer_of("gated_patch.checkpoints.saving") == 1
    assert layer_of("gated_patch") == 3 and layer_of("conversion.plan") == 4


def test_the_layer_check_sees_an_upward_import():
    """What the old layout had: the on-disk format's loader importing the gating layer above it."""
    graph = {"gated_patch.checkpoints.loading": {"gated_patch.gating", "gated_patch.core.model"},
             "gated_patch.gating": {"gated_patch.checkpoints.format"}}
    assert upward_imports(graph) == ["gated_patch.checkpoints.loading (on disk, and the structure guard) imports "
                                     "gated_patch.gating (gating and families)"]


def test_library_never_imports_the_conversion_scripts():
    graph = import_graph()
    assert any(target.startswith("gated_patch") for target in graph["conversion.convert"])  # one way: scripts -> library
    offenders = {module: sorted(t for t in targets if t.split(".")[0] == "conversion")
                 for module, targets in graph.items() if module.startswith("gated_patch")}
    assert {module: targets for module, targets in offenders.items() if targets} == {}


def test_core_imports_only_torch_transformers_and_itself():
    graph = import_graph()
    for module, path in _modules().items():
        if not module.startswith("gated_patch.core"):
            continue
        assert all(target.startswith("gated_patch.core") for target in graph[module]), module
        imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.ImportFrom) and not node.level}
        assert imported <= {"torch", "transformers", "__future__"} | set(sys.stdlib_module_names), (module, imported)


def test_class_names_are_distinct():
    seen: dict[str, str] = {}
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                assert node.name not in seen, f"class {node.name} in {module} and {seen[node.name]}"
                seen[node.name] = module


def test_remote_code_is_short_and_uses_public_apis_only():
    source = remote_code_source()
    assert source.count("\n") <= MAX_LINES and remote_code_problems(source) == []
    tree = ast.parse(source)
    # _init_weights: the method transformers documents for models that add parameters (super() call of the override)
    assert private_attributes(source) == {"_init_weights"}
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert "_C" not in names and "_compiled_call_impl" not in source and "_global_" not in source
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert modules - set(sys.stdlib_module_names) == {"torch", "transformers"}
    # the version check runs at import, before any class is defined
    first_call = next(i for i, node in enumerate(tree.body) if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call))
    first_class = next(i for i, node in enumerate(tree.body) if isinstance(node, ast.ClassDef) and node.name == "GateConfig")
    assert ast.unparse(tree.body[first_call]) == "check_transformers_version()" and first_call < first_class


def test_remote_code_docstrings_are_whole_summary_sentences():
    """The generator keeps the summary line of each docstring; a summary cut mid-sentence would mislead an auditor."""
    tree = ast.parse(remote_code_source())
    docstrings = [ast.get_docstring(node, clean=False) for node in ast.walk(tree)
                  if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module)) and ast.get_docstring(node)]
    assert len(docstrings) >= 20 and all(text.rstrip().endswith(".") for text in docstrings)
    source = 'def f():\n    """A summary that goes on\n    to the next line."""\n    return 1\n'
    with pytest.raises(RuntimeError, match="docstring of f .* one-line summary sentence"):
        remote_code_module._with_short_docstrings(source.splitlines(), ast.parse(source).body[0])


@pytest.mark.parametrize("bad, named", [
    ("x = torch._C._get_tracing_state()\n", "private names ['_C', '_get_tracing_state']"),
    ("from torch._C import _get_tracing_state\n", "private names ['_C', '_get_tracing_state']"),
    ("import torch._dynamo as dynamo\n", "private names ['_dynamo']"),
    ("from torch.nn.modules import module\nhooks = vars(module)['_global_forward_hooks']\n", "['_global_forward_hooks']"),
    ("c = getattr(torch, '_C')\n", "private names ['_C']"),
    ("hooks = model.__dict__['_forward_pre_hooks']\n", "private names ['_forward_pre_hooks']"),
    ("exec('import os')\n", "with ['exec']"),
    ("f = eval\n", "with ['eval']"),
    ("os = __import__('os')\n", "with ['__import__']"),
    ("import importlib\n", "imports ['importlib']"),
    ("import subprocess\n", "imports ['subprocess']"),
    ("from pickle import loads\n", "imports ['pickle']"),
    ("import numpy\n", "imports ['numpy']"),
    ("\n" * (MAX_LINES + 1), f"{MAX_LINES + 1} lines (at most {MAX_LINES})"),
])  # fmt: skip
def test_the_remote_code_check_refuses_what_an_auditor_would(bad, named):
    with pytest.raises(RuntimeError, match=r"generated modeling_gated_attention\.py has .*" + re.escape(named)):
        check_remote_code(bad)
    check_remote_code("import torch\nfrom torch import nn\nx = nn.Module().__dict__.get('_gated_attention_input')\n")


def test_every_test_that_loads_the_real_model_is_marked_slow():
    """`make test-fast` (``-m "not slow"``) then never loads SmolLM2; `make test` (CI) runs everything. conftest checks
    every collected test before deselection, through pytest's fixture closure (fixtures of fixtures included)."""
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test-fast:.*\n\t.*pytest -q -m \"not slow\"$", makefile, re.MULTILINE)
    assert re.search(r"^test:.*\n\t.*pytest -q$", makefile, re.MULTILINE)

    class Item:
        def __init__(self, nodeid, fixturenames, slow):
            self.nodeid, self.fixturenames, self.slow = nodeid, fixturenames, slow

        def get_closest_marker(self, name):
            return object() if self.slow and name == "slow" else None

    items = [Item("direct", ["tmp_path", "load_smollm2"], False), Item("through_a_fixture", ["study", "smollm2_dir"], False),
             Item("marked", ["smollm2_tokenizer"], True), Item("tiny", ["tmp_path", "family"], False)]
    assert real_model_tests_not_marked_slow(items) == ["direct", "through_a_fixture"]
    hook = conftest.pytest_collection_modifyitems
    with pytest.raises(pytest.UsageError, match=r"'direct', 'through_a_fixture'.*not marked slow"):
        hook(None, items)
    assert hook.pytest_impl["tryfirst"]  # pluggy's record of @pytest.hookimpl(tryfirst=True)


def test_no_tracker_references_commit_hashes_or_dates_in_code_and_docs():
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()  # the project, not venvs
    files = [ROOT / name for name in listed if Path(name).suffix in (".py", ".md", ".cfg", ".toml")
             and "results" not in Path(name).parts and (ROOT / name).is_file()]
    patterns = [re.compile(r"\(issue \d+\)|\bissue #?\d+\b", re.IGNORECASE), re.compile(r"(?<![\w/])#\d{1,4}\b"),
                re.compile(r"\bcommit [0-9a-f]{7,40}\b"), re.compile(r"\b20\d\d-\d\d-\d\d\b")]
    hits = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in files for pattern in patterns
            for m in pattern.finditer(p.read_text(errors="ignore"))]
    assert hits == []
    assert not (ROOT / "DEVELOPERS-BRIEF.md").exists()
    assert len((ROOT / "README.md").read_bytes()) <= 15_000
