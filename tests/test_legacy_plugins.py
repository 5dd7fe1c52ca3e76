"""A plugin written against the first version's imports gets one line naming the new import (exit 2)."""

import importlib.metadata
import importlib.util
import sys

import pytest
from twinbench.harness.cli.main import main
from twinbench.harness.core import registry
from twinbench.harness.core.errors import UsageError
from twinbench.harness.core.legacy_names import LEGACY_MODULES, new_module_name


@pytest.mark.parametrize("source,old,new", [
    ("from harness.registry import register_impl\n", "harness.registry", "twinbench.harness.core.registry"),
    ("import torch\nfrom harness import registry\n", "harness.registry", "twinbench.harness.core.registry"),
    ("import harness.gate_against as ga\n", "harness.gate_against", "twinbench.harness.gate.against"),
    ("from impls.nf4_kernels import dequantize\n", "impls.nf4_kernels", "twinbench.impls.kernels.nf4"),
])
def test_first_version_import_in_a_plugin_is_one_line_exit_2(tmp_path, capsys, source, old, new):
    plugin = tmp_path / "old_style.py"
    plugin.write_text(source)
    out = tmp_path / "o"
    assert main(["run", "attention", "--device", "cpu", "--plugin", str(plugin), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"twinbench: error: plugin {plugin.resolve()}: {old!r} is twinbench's first-version import; "
                   f"use {new!r}\n")
    assert not out.exists()


def test_a_plugin_missing_another_module_keeps_the_generic_message(tmp_path, capsys):
    plugin = tmp_path / "needs_dep.py"
    plugin.write_text("import no_such_dependency_xyz\n")
    assert main(["list", "--plugin", str(plugin)]) == 2
    err = capsys.readouterr().err
    assert "cannot load plugin" in err and "ModuleNotFoundError" in err and "first-version" not in err


def test_an_installed_plugin_with_first_version_imports_is_refused_by_name(tmp_path, monkeypatch):
    """Entry-point plugins: the module of the package that used the old name is named in the line."""
    pkg = tmp_path / "vendor_kernels_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "fast.py").write_text("from harness.case import Case\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = importlib.metadata.EntryPoint(name="vendor", value="vendor_kernels_pkg", group="twinbench.impls")
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: [ep] if group == "twinbench.impls" else real(group=group))
    monkeypatch.setattr(registry, "_loaded_sources", set(registry._loaded_sources))
    try:
        with pytest.raises(UsageError) as caught:
            registry.load_plugins()
    finally:
        for name in [m for m in sys.modules if m.startswith("vendor_kernels_pkg")]:
            del sys.modules[name]
    assert str(caught.value) == ("plugin vendor_kernels_pkg.fast: 'harness.case' is twinbench's first-version "
                                 "import; use 'twinbench.harness.core.case'")


def test_every_new_name_in_the_table_is_a_module():
    for old, new in LEGACY_MODULES.items():
        assert importlib.util.find_spec(new) is not None, f"{old} -> {new}: no such module"


def test_unchanged_names_below_twinbench_map_only_to_real_modules():
    assert new_module_name("reference.attention") == "twinbench.reference.attention"
    assert new_module_name("suites.attention") == "twinbench.suites.attention"
    assert new_module_name("suites.attention.make_inputs") is None  # a name inside the module, not a module
    assert new_module_name("numpy.linalg") is None
