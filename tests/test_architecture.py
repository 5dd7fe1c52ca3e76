"""The layer graph of docs/architecture.md, enforced on this checkout's source by reading it (ast, no imports).

Each check runs twice: on this tree, and on a tiny fake tree with planted violations, so a checker that
silently found nothing would fail here too.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import architecture_tools as arch  # noqa: E402  (a sibling helper module, not a package)

ROOT = Path(__file__).resolve().parent.parent
OUTSIDE_NAMESPACE = (*arch.LAYER_ROOTS, "tests")


def _fail_if_any(found: list[str], what: str) -> None:
    """One readable line per finding (an assert would print the whole report's repr)."""
    if found:
        pytest.fail(f"{what}:\n  " + "\n  ".join(found), pytrace=False)


@pytest.fixture(scope="module")
def report() -> arch.Report:
    return arch.check_tree(ROOT)


def test_the_checker_reads_this_tree(report):
    # guards the checks below against passing on an empty scan
    assert {"harness.core.registry", "harness.cli.main", "suites.attention", "reports.html"} <= set(report.modules)
    assert report.rules is arch.ALLOWED
    assert any(e.lazy for e in report.edges) and len(report.edges) > 100


def test_no_upward_or_sideways_import(report):
    _fail_if_any([f"{arch.layer_of(e.source)} -> {arch.layer_of(e.target)}: {e.where(report.modules)}"
                  for e in report.violations], "imports against docs/architecture.md's layer graph")


def test_no_module_level_cycle(report):
    _fail_if_any([" <-> ".join(c) for c in report.module_cycles], "import cycles between modules")


def test_no_folder_level_cycle(report):
    _fail_if_any([" <-> ".join(c) for c in report.folder_cycles], "import cycles between folders")


def test_reference_finds_no_files_by_path():
    _fail_if_any(arch.reference_path_reads(ROOT), "reference/ must get its data paths passed in")


def test_no_bare_first_version_import():
    _fail_if_any(arch.bare_first_version_imports(ROOT, OUTSIDE_NAMESPACE),
                 "first-version names: spell the namespace (twinbench.harness...)")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="reads pyproject.toml with tomllib (Python >= 3.11)")
def test_every_package_folder_is_in_pyproject():
    names = arch.package_folders(ROOT)
    assert {"twinbench.harness.core", "twinbench.impls.kernels", "twinbench.impls.qlora"} <= set(names)
    _fail_if_any(arch.unlisted_packages(ROOT), "missing from pyproject.toml [tool.setuptools] packages")


# ------------------------------------------------------------------ the checker on planted trees

CLEAN = {
    "twinbench/__init__.py": "",
    "twinbench/__main__.py": "from twinbench.harness.cli.main import main\n",
    "harness/__init__.py": "",
    "harness/core/__init__.py": "",
    "harness/core/registry.py": "import torch\n",
    "harness/store/__init__.py": "",
    "harness/store/results.py": "from twinbench.harness.core import registry\n",
    "harness/run/__init__.py": "",
    "harness/run/runner.py": "from twinbench.harness.store.results import x\nfrom ..core import registry\n",
    "harness/gate/__init__.py": "",
    "harness/gate/stats.py": "def f():\n    from twinbench.harness.run import runner\n",
    "harness/cli/__init__.py": "",
    "harness/cli/main.py": "from twinbench.harness.gate import stats\nfrom twinbench.reports import html\n",
    "reports/__init__.py": "",
    "reports/html.py": "from twinbench.harness.store.results import x\n",
    "reference/__init__.py": "",
    "reference/op.py": "import torch\n",
    "suites/__init__.py": "",
    "suites/op.py": "from twinbench.harness.core.registry import r\nfrom twinbench.reference.op import f\n",
    "impls/__init__.py": "",
    "impls/op/__init__.py": "",
    "impls/op/fast.py": "from twinbench.reference import op\nfrom . import helper\n",
    "impls/op/helper.py": "from twinbench.impls.kernels import k\n",
    "impls/kernels/__init__.py": "",
    "impls/kernels/k.py": "",
    "tests/test_op.py": "from twinbench.suites import op\n",
    "pyproject.toml": textwrap.dedent("""\
        [tool.setuptools]
        packages = ["twinbench", "twinbench.harness", "twinbench.harness.core", "twinbench.harness.store",
                    "twinbench.harness.run", "twinbench.harness.gate", "twinbench.harness.cli",
                    "twinbench.reports", "twinbench.reference", "twinbench.suites", "twinbench.impls",
                    "twinbench.impls.op", "twinbench.impls.kernels"]
        """),
}

PLANTED = {
    # upward, and lazy: the engine's base reaching for the store (and, with the next line, a cycle)
    "harness/core/registry.py": "def load():\n    from twinbench.harness.store import results\n",
    # a reference importing harness internals through importlib, and finding data by path
    "reference/op.py": "import importlib\nfrom pathlib import Path\nDATA = Path(__file__).parent\n"
                       "m = importlib.import_module('twinbench.harness.core.registry')\n",
    # sideways: a suite importing an impl
    "suites/op.py": "from twinbench.impls.op.fast import go\n",
    # a cycle inside one folder, one side relative
    "impls/kernels/k.py": "from .j import g\n",
    "impls/kernels/j.py": "import twinbench.impls.kernels.k\n",
    # a first-version bare name outside twinbench/
    "tests/test_op.py": "from harness.core.registry import register_impl\n",
    # a package folder pyproject.toml does not list
    "impls/extra/__init__.py": "",
}


def _write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_a_clean_fake_tree_passes(tmp_path):
    root = _write_tree(tmp_path, CLEAN)
    r = arch.check_tree(root)
    assert len(r.edges) == 13
    assert (r.violations, r.module_cycles, r.folder_cycles) == ([], [], [])
    assert arch.reference_path_reads(root) == []
    assert arch.bare_first_version_imports(root, OUTSIDE_NAMESPACE) == []
    if sys.version_info >= (3, 11):
        assert arch.unlisted_packages(root) == []


def test_planted_violations_are_found(tmp_path):
    root = _write_tree(tmp_path, {**CLEAN, **PLANTED})
    r = arch.check_tree(root)
    found = {(e.source, e.target, e.lazy) for e in r.violations}
    assert found == {
        ("harness.core.registry", "harness.store.results", True),
        ("reference.op", "harness.core.registry", False),
        ("suites.op", "impls.op.fast", False),
    }
    assert r.module_cycles == [["harness.core.registry", "harness.store.results"],
                               ["impls.kernels.j", "impls.kernels.k"]]
    assert r.folder_cycles == [["harness.core", "harness.store"]]
    assert [s.split(" ", 1)[1] for s in arch.reference_path_reads(root)] == ["__file__"]
    bare = arch.bare_first_version_imports(root, OUTSIDE_NAMESPACE)
    assert len(bare) == 1 and "tests/test_op.py:1 import harness.core.registry" in bare[0]
    if sys.version_info >= (3, 11):
        assert arch.unlisted_packages(root) == ["twinbench.impls.extra"]


def test_the_first_version_layout_is_read_with_its_own_rule(tmp_path):
    # the "before" graph in docs/architecture.md: flat harness/*.py, bare imports, the design's old rule
    root = _write_tree(tmp_path, {
        "harness/__init__.py": "", "harness/registry.py": "", "harness/runner.py": "import suites.op\n",
        "suites/__init__.py": "", "suites/op.py": "from harness.registry import r\n",
    })
    r = arch.check_tree(root)
    assert r.rules is arch.FLAT_ALLOWED
    assert [(e.source, e.target) for e in r.violations] == [("harness.runner", "suites.op")]
    assert r.folder_cycles == [["harness", "suites"]]


def test_largest_functions_counts_lines_of_nested_functions(tmp_path):
    root = _write_tree(tmp_path, {"harness/a.py": "def outer():\n    def inner():\n        pass\n    return 1\n"})
    assert arch.largest_functions(root, ("harness",), 2) == [
        (4, "harness/a.py:1 outer"), (2, "harness/a.py:2 outer.inner")]
