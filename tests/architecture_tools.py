"""The import-direction checker behind tests/test_architecture.py and the layer graph in docs/architecture.md.

Pure ``ast``: nothing in the checked tree is imported or run, so the same functions read this checkout, an
old commit checked out elsewhere, or a fake tree a test plants in a temporary folder. Every import counts,
module-level or inside a function (a lazy import is still a dependency; it only fails later), and so does
``importlib.import_module("twinbench....")`` with a literal name.

As a script it prints the folder-level import graph (edges with counts, cycles, layer violations) and the
largest functions of a tree: ``python3 tests/architecture_tools.py [ROOT] [--functions 10]``.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

NAMESPACE = "twinbench"
# The folders the `twinbench` namespace is made of (pyproject.toml's package-dir), first-version names too.
LAYER_ROOTS = ("harness", "suites", "reference", "impls", "reports")

# The intended layer graph (docs/architecture.md): layer -> the layers it may import. A module belongs to
# the longest layer name that prefixes its path-based name. Imports inside one layer are allowed (cycles
# are caught separately); everything not listed is an upward or sideways import.
ALLOWED: dict[str, frozenset[str]] = {
    "harness.core": frozenset({"harness.core"}),
    "harness.store": frozenset({"harness.core", "harness.store"}),
    "harness.run": frozenset({"harness.core", "harness.store", "harness.run"}),
    "harness.gate": frozenset({"harness.core", "harness.store", "harness.run", "harness.gate"}),
    "harness.doctor": frozenset({"harness.core", "harness.store", "harness.run", "harness.doctor"}),
    "harness.cluster": frozenset({"harness.core", "harness.store", "harness.run", "harness.cluster"}),
    "harness.cli": frozenset({"*"}),
    "harness.pytest_plugin": frozenset({"harness.core", "harness.store", "harness.run", "harness.pytest_plugin"}),
    "reports": frozenset({"harness.store", "reports"}),
    "reference": frozenset({"reference"}),
    "suites": frozenset({"harness.core", "reference", "suites"}),
    "impls": frozenset({"harness.core", "reference", "impls"}),
    # the namespace package itself and `python -m twinbench` (the command's entry point)
    NAMESPACE: frozenset({"*"}),
}
# `harness/__init__.py` holds only the checkout-root constant: it belongs to the base layer.
LAYER_OF_PACKAGE_ROOT = {"harness": "harness.core"}

# The first version's flat layout (harness/*.py, impls/*.py; commit 2ad4c8a): the intended graph projected
# onto its folders, so the "before" graph of docs/architecture.md marks its upward arrows the same way. The
# flat harness/ holds the cli too, so harness -> reports is not upward there (it is a cycle with reports).
FLAT_ALLOWED: dict[str, frozenset[str]] = {
    "harness": frozenset({"harness", "reports"}),
    "reports": frozenset({"harness", "reports"}),
    "reference": frozenset({"reference"}),
    "suites": frozenset({"harness", "reference", "suites"}),
    "impls": frozenset({"harness", "reference", "impls"}),
    NAMESPACE: frozenset({"*"}),
}


@dataclass(frozen=True)
class Module:
    name: str  # path-based dotted name: "harness.core.registry", "twinbench", "tests.test_cli"
    path: Path
    is_package: bool

    @property
    def folder(self) -> str:
        """The folder the module's file is in, dotted ("harness.core", "impls.kernels", "suites")."""
        return self.name if self.is_package else self.name.rpartition(".")[0]


@dataclass(frozen=True)
class ImportEdge:
    source: str  # importing module (path-based name)
    target: str  # imported module (path-based name), always one of the tree's modules
    line: int
    lazy: bool  # inside a function or class body, not at module level
    spelled: str  # the name as written ("twinbench.harness.core.registry", "harness.registry")

    def where(self, modules: dict[str, Module]) -> str:
        kind = "lazy " if self.lazy else ""
        return f"{modules[self.source].path}:{self.line} {kind}import {self.spelled}"


def module_name(root: Path, path: Path) -> tuple[str, bool]:
    """The path-based dotted name of a .py file under ``root`` and whether it is a package's __init__."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def collect_modules(root: Path, folders: Iterable[str]) -> dict[str, Module]:
    """Every .py file under the given top-level folders of ``root`` (missing folders are skipped)."""
    modules: dict[str, Module] = {}
    for folder in folders:
        base = root / folder
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            name, is_package = module_name(root, path)
            modules[name] = Module(name, path, is_package)
    return modules


def _walk_with_scope(tree: ast.AST) -> Iterator[tuple[ast.AST, bool]]:
    """Every node with whether it sits inside a function or class body (a lazy import)."""
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]
    while stack:
        node, nested = stack.pop()
        yield node, nested
        inner = nested or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef))
        stack.extend((child, inner) for child in ast.iter_child_nodes(node))


def imported_names(module: Module) -> Iterator[tuple[str, int, bool, bool]]:
    """(absolute dotted name, line, lazy, relative) for every import in the module, relative ones resolved.

    ``from a.b import c`` yields ``a.b.c`` (a submodule or a name in ``a.b``; the resolver decides).
    """
    tree = ast.parse(module.path.read_text(encoding="utf-8"), filename=str(module.path))
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    for node, lazy in _walk_with_scope(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, lazy, False
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                yield (f"{base}.{alias.name}" if alias.name != "*" else base), node.lineno, lazy, node.level > 0
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield node.args[0].value, node.lineno, lazy, False


def strip_namespace(name: str) -> str:
    """``twinbench.harness.core`` -> ``harness.core``; the bare ``twinbench`` stays itself."""
    prefix = NAMESPACE + "."
    return name[len(prefix):] if name.startswith(prefix) else name


def resolve(name: str, modules: dict[str, Module]) -> str | None:
    """The tree's module an imported name lands in (longest known prefix), or None for outside modules."""
    parts = strip_namespace(name).split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def import_edges(modules: dict[str, Module], sources: Iterable[str] | None = None) -> list[ImportEdge]:
    """Every import from ``sources`` (default: all modules) into the tree; self-imports dropped."""
    edges: dict[tuple[str, str, int], ImportEdge] = {}  # one edge per statement and target module
    for source in sorted(sources if sources is not None else modules):
        for spelled, line, lazy, _relative in imported_names(modules[source]):
            target = resolve(spelled, modules)
            if target is not None and target != source:
                edges.setdefault((source, target, line), ImportEdge(source, target, line, lazy, spelled))
    return list(edges.values())


def layer_of(name: str, rules: dict[str, frozenset[str]] = ALLOWED) -> str | None:
    """The layer a path-based module name belongs to (longest matching layer), None outside the layers."""
    if rules is ALLOWED and name in LAYER_OF_PACKAGE_ROOT:
        return LAYER_OF_PACKAGE_ROOT[name]
    best = None
    for layer in rules:
        if (name == layer or name.startswith(layer + ".")) and (best is None or len(layer) > len(best)):
            best = layer
    return best


def layer_violations(edges: Iterable[ImportEdge],
                     rules: dict[str, frozenset[str]] = ALLOWED) -> list[ImportEdge]:
    """Imports a layer may not make under ``rules`` (upward or sideways)."""
    bad = []
    for e in edges:
        src, dst = layer_of(e.source, rules), layer_of(e.target, rules)
        if src is None or dst is None:
            continue
        allowed = rules[src]
        if "*" not in allowed and dst not in allowed:
            bad.append(e)
    return sorted(bad, key=lambda e: (e.source, e.line, e.target))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    nodes = sorted(set(graph) | {t for ts in graph.values() for t in ts})
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def module_graph(edges: Iterable[ImportEdge]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
    return graph


def folder_edges(edges: Iterable[ImportEdge], modules: dict[str, Module]) -> Counter[tuple[str, str]]:
    """(importing folder, imported folder) -> number of imports, imports inside one folder left out."""
    counts: Counter[tuple[str, str]] = Counter()
    for e in edges:
        a, b = modules[e.source].folder, modules[e.target].folder
        if a != b:
            counts[(a, b)] += 1
    return counts


def folder_graph(counts: Counter[tuple[str, str]]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for a, b in counts:
        graph.setdefault(a, set()).add(b)
    return graph


@dataclass(frozen=True)
class Report:
    """What the architecture test asserts about one tree."""

    modules: dict[str, Module]
    rules: dict[str, frozenset[str]]
    edges: list[ImportEdge]
    violations: list[ImportEdge]
    module_cycles: list[list[str]]
    folder_cycles: list[list[str]]
    folder_counts: Counter[tuple[str, str]]


def check_tree(root: Path) -> Report:
    """Layer violations and cycles (module- and folder-level) of the layer folders under ``root``."""
    modules = collect_modules(root, (NAMESPACE, *LAYER_ROOTS))
    rules = ALLOWED if (root / "harness" / "core").is_dir() else FLAT_ALLOWED
    edges = import_edges(modules)
    counts = folder_edges(edges, modules)
    return Report(modules, rules, edges, layer_violations(edges, rules), cycles(module_graph(edges)),
                  cycles(folder_graph(counts)), counts)


def reference_path_reads(root: Path) -> list[str]:
    """Uses of ``__file__`` in reference/: a reference gets its data paths passed in, it finds nothing itself."""
    found = []
    for module in collect_modules(root, ("reference",)).values():
        tree = ast.parse(module.path.read_text(encoding="utf-8"))
        found += [f"{module.path}:{n.lineno} __file__" for n in ast.walk(tree)
                  if isinstance(n, ast.Name) and n.id == "__file__"]
    return found


def bare_first_version_imports(root: Path, folders: Iterable[str]) -> list[str]:
    """Imports of ``harness``/``impls``/``suites``/``reference``/``reports`` as top-level modules.

    Outside ``twinbench/`` every module must spell the namespace (``twinbench.harness...``); a bare name
    works in a checkout only by accident of sys.path and never in an installed wheel.
    """
    found = []
    modules = [*collect_modules(root, folders).values(), *top_level_modules(root).values()]
    for module in modules:
        for spelled, line, lazy, relative in imported_names(module):
            if not relative and spelled.split(".")[0] in LAYER_ROOTS:
                found.append(f"{module.path}:{line} {'lazy ' if lazy else ''}import {spelled}")
    return found


def top_level_modules(root: Path) -> dict[str, Module]:
    """The .py files directly in ``root`` (noxfile.py, setup scripts): checked for bare names too."""
    return {path.stem: Module(path.stem, path, False) for path in sorted(root.glob("*.py"))}


def package_folders(root: Path) -> list[str]:
    """Every folder with an __init__.py under the namespace, as its `twinbench.*` package name."""
    names = []
    for module in collect_modules(root, (NAMESPACE, *LAYER_ROOTS)).values():
        if module.is_package:
            names.append(module.name if module.name == NAMESPACE else f"{NAMESPACE}.{module.name}")
    return sorted(names)


def unlisted_packages(root: Path) -> list[str]:
    """Package folders missing from pyproject.toml's ``[tool.setuptools] packages`` (a wheel would lack them)."""
    import tomllib  # Python >= 3.11; the caller skips on 3.10

    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    return [name for name in package_folders(root) if name not in listed]


def largest_functions(root: Path, folders: Iterable[str], count: int = 10) -> list[tuple[int, str]]:
    """(lines, "path:line qualified.name") of the ``count`` longest functions (nested ones counted too)."""
    sized = []
    for folder in folders:
        for module in collect_modules(root, (folder,)).values():
            tree = ast.parse(module.path.read_text(encoding="utf-8"))
            sized.extend(_function_sizes(tree, module.path.relative_to(root), ""))
    return sorted(sized, key=lambda s: (-s[0], s[1]))[:count]


def _function_sizes(node: ast.AST, path: Path, prefix: str) -> Iterator[tuple[int, str]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            qual = f"{prefix}{child.name}"
            if not isinstance(child, ast.ClassDef):
                yield child.end_lineno - child.lineno + 1, f"{path}:{child.lineno} {qual}"
            yield from _function_sizes(child, path, qual + ".")
        else:
            yield from _function_sizes(child, path, prefix)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", nargs="?", type=Path, default=Path(__file__).resolve().parent.parent)
    p.add_argument("--functions", type=int, default=10, help="how many of the largest functions to list")
    args = p.parse_args(argv)
    report = check_tree(args.root)
    print(f"{len(report.modules)} modules, {len(report.edges)} imports into the tree "
          f"({sum(e.lazy for e in report.edges)} lazy)")
    print("\nfolder-level edges (imports):")
    for (a, b), n in sorted(report.folder_counts.items()):
        upward = any(layer_violations([e], report.rules) for e in report.edges
                     if report.modules[e.source].folder == a and report.modules[e.target].folder == b)
        print(f"  {a:24} -> {b:24} {n:4}{'   UPWARD' if upward else ''}")
    print(f"\nfolder-level cycles: {report.folder_cycles or 'none'}")
    print(f"module-level cycles: {report.module_cycles or 'none'}")
    print(f"layer violations: {len(report.violations)}")
    for e in report.violations:
        print(f"  {layer_of(e.source, report.rules)} -> {layer_of(e.target, report.rules)}: "
              f"{e.where(report.modules)}")
    print(f"reference/ finding files by path: {reference_path_reads(args.root) or 'none'}")
    print(f"\n{args.functions} largest functions (lines):")
    for lines, where in largest_functions(args.root, (NAMESPACE, *LAYER_ROOTS), args.functions):
        print(f"  {lines:4}  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
