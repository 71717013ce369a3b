"""The house rules of the code base, checked on the source (issue 24 "One house"; DESIGN.md "Top level").

Each test reads the source files with :mod:`ast` and asserts one rule: the layers (``smn_core`` never imports ray),
the package layout of ``orchestrator/``, no import cycle (function-level imports included), few function-level
imports of sibling modules (each with a reason), no function over 100 lines, one writer of ledger rows, no
import of another module's private names.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "smn_core")


def _modules(package: str) -> dict[str, Path]:
    """``{dotted module name: path}`` of every module of ``package``."""
    out = {}
    for path in sorted((REPO / package).rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, module: str) -> list[tuple[str, list[str], bool, int, str]]:
    """``(imported module, names, at function level, line, source line)`` for every import of ``path``."""
    tree = ast.parse(path.read_text())
    lines = path.read_text().splitlines()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []

    def visit(node, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                out.extend((a.name, [], nested, child.lineno, lines[child.lineno - 1]) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                out.append((base, [a.name for a in child.names], nested, child.lineno, lines[child.lineno - 1]))
            visit(child, inner)

    visit(tree, False)
    return out


def _graph() -> dict[str, set[str]]:
    """Import graph among orchestrator's modules (top-level and function-level imports alike)."""
    mods = _modules("orchestrator")
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        for target, names, _, _, _ in _imports(path, name):
            for cand in [f"{target}.{n}" for n in names] + [target]:
                if cand in mods and cand != name:
                    graph[name].add(cand)
                    break
    return graph


def test_smn_core_never_imports_ray():
    bad = [f"{p.name}:{line}" for name, p in _modules("smn_core").items()
           for target, _, _, line, _ in _imports(p, name) if target == "ray" or target.startswith("ray.")]
    assert bad == [], f"smn_core imports ray at {bad} (DESIGN.md: smn_core is plain PyTorch)"


def test_orchestrator_top_level_holds_packages_only():
    top = sorted(p.name for p in (REPO / "orchestrator").glob("*.py"))
    assert top == ["__init__.py", "__main__.py"], f"modules directly in orchestrator/: {top}"
    packages = sorted(p.name for p in (REPO / "orchestrator").iterdir() if (p / "__init__.py").exists())
    assert packages == ["cli", "engine", "reports", "results", "serve", "spec", "store"]
    for pkg in packages:  # each package says what it owns
        assert ast.get_docstring(ast.parse((REPO / "orchestrator" / pkg / "__init__.py").read_text())), pkg


def test_no_import_cycle_among_orchestrator_modules():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def dfs(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                dfs(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node, [node])
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_function_level_sibling_imports_are_few_and_explained():
    nested = [(p.relative_to(REPO), line, src.strip()) for name, p in _modules("orchestrator").items()
              for target, _, at_function, line, src in _imports(p, name)
              if at_function and target.startswith("orchestrator")]
    assert len(nested) <= 5, f"{len(nested)} function-level imports of orchestrator modules: {nested}"
    unexplained = [n for n in nested if "#" not in n[2]]
    assert unexplained == [], f"function-level imports without a one-line reason: {unexplained}"


def test_no_function_over_100_lines():
    long = []
    for package in PACKAGES:
        for name, path in _modules(package).items():
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                    if node.end_lineno - start + 1 > 100:
                        long.append(f"{name}.{node.name} ({node.end_lineno - start + 1} lines)")
    assert long == [], f"functions over 100 lines: {long}"


def test_ledger_rows_have_one_writer():
    calls = []
    for package in PACKAGES:
        for name, path in _modules(package).items():
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call):
                    fn = node.func
                    called = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
                    if called == "write_cell":
                        calls.append(f"{name}:{node.lineno}")
    assert len(calls) == 1 and calls[0].startswith("orchestrator.engine.cell:"), \
        f"ledger.write_cell is called from {calls}; the engine's land() must be the only writer"


def test_no_module_imports_another_modules_private_names():
    bad = []
    for package in PACKAGES:
        for name, path in _modules(package).items():
            for target, names, _, line, _ in _imports(path, name):
                if target.split(".")[0] in PACKAGES:
                    bad += [f"{name}:{line} {target}.{n}" for n in names if n.startswith("_") and n != "__version__"]
    assert bad == [], f"imports of private names: {bad}"
