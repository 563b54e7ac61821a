"""The package's layers (patchgap/__init__.py): imports point down only, packages on one line do
not import each other, no module imports itself back through a cycle, and the core never
imports the kfp SDK. Every import counts, including those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {
    "patchgap": ROOT / "src" / "patchgap",
    "patchgap.components": ROOT / "components",
    "patchgap.pipelines": ROOT / "pipelines",
}
# Top to bottom; names on one line are independent of each other.
LAYERS = [
    {"cli"},
    {"run"},
    {"pipelines"},
    {"components"},
    {"kfp"},
    {"stages"},
    {"training"},
    # The study's arms read data and gate outputs; its report (reports.study) reads arms.json.
    {"reward", "reports", "study"},
    {"lm"},
    {"data"},
    {"storage"},
    {"<ground>"},
]
# Layers allowed to import the kfp SDK (and kfp-kubernetes).
KFP_USERS = {"cli", "run", "pipelines", "components", "kfp"}


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for prefix, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([prefix, *parts])] = path
    return out


MODULES = _modules()


def _package_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) < 2:
        return "<ground>"
    top = parts[1]
    if f"patchgap.{top}" in MODULES and (MODULES[f"patchgap.{top}"].name == "__init__.py"):
        return top
    return "<ground>"


def _layer(package: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if package in names)


def _imports(module: str) -> list[tuple[str, int]]:
    """(imported module, line) for every import in ``module``, resolved to a known module where
    ``from a import b`` names a submodule."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in MODULES else target, node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        graph[module] = {t for t, _ in _imports(module) if t in MODULES and t != module}
    return graph


def test_every_package_says_what_it_is_for_and_may_import() -> None:
    for module, path in MODULES.items():
        if path.name != "__init__.py" or module.count(".") != 1:
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert doc, f"{path}: no docstring"
        if module != "patchgap":
            assert "May import:" in doc, f"{path}: docstring does not say what it may import"


def test_imports_point_down_only() -> None:
    bad = []
    for module in MODULES:
        here = _package_of(module)
        for target, line in _imports(module):
            if not target.startswith("patchgap") or target not in MODULES:
                continue
            there = _package_of(target)
            if there == here:
                continue
            if _layer(there) <= _layer(here):
                bad.append(f"{MODULES[module].relative_to(ROOT)}:{line}: {here} -> {there}")
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_core_never_imports_kfp() -> None:
    bad = []
    for module in MODULES:
        if _package_of(module) in KFP_USERS:
            continue
        for target, line in _imports(module):
            if target.split(".")[0] in ("kfp", "kubernetes"):
                bad.append(f"{MODULES[module].relative_to(ROOT)}:{line}: imports {target}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    ("module", "package"),
    [("patchgap.answers", "<ground>"), ("patchgap.storage.store", "storage")],
)
def test_checker_classifies_modules(module: str, package: str) -> None:
    # Guards the checker itself: a package the layer list misses would silently pass.
    assert _package_of(module) == package
    assert all(any(_package_of(m) in names for names in LAYERS) for m in MODULES), (
        "a package is missing from LAYERS"
    )
