"""The pytest plugin (harness/pytest_plugin), as a vendor's repository uses it: pytest's own ``pytester`` runs
pytest in a subprocess in a throwaway project beside a throwaway vendor package that registers impls through the
``twinbench.impls`` entry point (a .dist-info folder with entry_points.txt on PYTHONPATH, as pip would install it).

The planted impls: a correct one, a wrong one (weights 5% off), one whose available() says no, and one that
aborts its process; a second plugin fails to import. A plain project without ``--twinbench`` must see nothing of
the plugin.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
from pathlib import Path

import pytest
from twinbench.harness.core import registry
from twinbench.harness.core.errors import UsageError
from twinbench.harness.core.registry import load_plugins
from twinbench.harness.pytest_plugin.session import Selection, Target, is_builtin, judge, plan, tasks_for
from twinbench.harness.store.record import Status

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = "twinbench.harness.pytest_plugin.plugin"
# The smallest quick case of the gating suite: one case keeps one worker start (and one restart after the crash).
CASE = "tokens=16,hidden=64,experts=16"

VENDOR = '''
import os

from twinbench.harness.core.registry import register_impl
from twinbench.reference.moe import gating


@register_impl("gating", "vendor_good")
def good(hidden_states, router_weight, *, top_k, norm_topk_prob):
    return gating(hidden_states, router_weight, top_k=top_k, norm_topk_prob=norm_topk_prob)


@register_impl("gating", "vendor_wrong")
def wrong(hidden_states, router_weight, *, top_k, norm_topk_prob):
    out = gating(hidden_states, router_weight, top_k=top_k, norm_topk_prob=norm_topk_prob)
    return dict(out, weights=out["weights"] * 1.05)


@register_impl("gating", "vendor_unavailable", available=lambda device: (False, "needs the VendorChip runtime"))
def unavailable(hidden_states, router_weight, *, top_k, norm_topk_prob):
    raise AssertionError("never called: not available")


@register_impl("gating", "vendor_crash")
def crash(hidden_states, router_weight, *, top_k, norm_topk_prob):
    os.abort()
'''

# The vendor's own test, through the fixture: the suite's inputs, the reference's outputs, the parity rule.
VENDOR_TEST = f'''
import pytest
from vendor_kernels import good, wrong


@pytest.mark.twinbench_case("gating", case="{CASE}")
def test_own_check(twinbench_case):
    out = good(**twinbench_case.kwargs)
    ref = twinbench_case.reference()
    assert set(ref) == {{"weights", "ids", "aux_loss", "z_loss"}}
    assert out["ids"].equal(ref["ids"])
    assert twinbench_case.check(good, trials=1).ok
    verdict = twinbench_case.check(wrong, trials=1)
    assert not verdict.ok and "weights" in verdict.reason()


def test_fixture_without_marker(twinbench_case):
    pass
'''


def plugin_args() -> list[str]:
    """``-p`` the plugin unless its entry point is installed (CI installs the package; pluggy refuses the same
    module registered twice)."""
    installed = any(ep.value == PLUGIN for ep in importlib.metadata.entry_points(group="pytest11"))
    return [] if installed else ["-p", PLUGIN]


@pytest.fixture
def vendor(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A project folder with the vendor's package installed beside it (site/) and on the subprocess's path."""
    site = pytester.path / "site"
    (site / "vendor_kernels").mkdir(parents=True)
    (site / "vendor_kernels" / "__init__.py").write_text(VENDOR)
    info = site / "vendor_kernels-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vendor-kernels\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[twinbench.impls]\nvendor = vendor_kernels\n")
    # a second plugin whose module does not import: its failure must show, not vanish
    (site / "vendor_broken.py").write_text("import vendor_runtime_that_is_not_installed\n")
    broken = site / "vendor_broken-0.1.dist-info"
    broken.mkdir()
    (broken / "METADATA").write_text("Metadata-Version: 2.1\nName: vendor-broken\nVersion: 0.1\n")
    (broken / "entry_points.txt").write_text("[twinbench.impls]\nbroken = vendor_broken\n")
    path = [str(ROOT), str(site), os.environ.get("PYTHONPATH")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in path if p))
    # the vendor's pytest is its own run, not one of ours: under our xdist workers it would inherit
    # PYTEST_XDIST_WORKER and pytest-benchmark would take it for an xdist worker and turn itself off
    for name in [n for n in os.environ if n.startswith("PYTEST_XDIST_")]:
        monkeypatch.delenv(name)
    return pytester


def outcomes_by_name(result: pytest.RunResult) -> dict[str, str]:
    """Item name -> PASSED/FAILED/SKIPPED/ERROR from ``-rA``'s short summary."""
    found = {}
    for line in result.outlines:
        for word in ("PASSED", "FAILED", "SKIPPED", "ERROR"):
            if line.startswith(word + " "):
                found[line.split(" ", 1)[1].split(" - ")[0]] = word
    return found


def test_vendor_repository(vendor: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    """``pytest --twinbench`` (here through the ini switch) in the vendor's project: one parity item per impl the
    plugin registers (none for twinbench's built-in impls), the run's verdicts and reasons, the crash costing only
    its own items; the fixture; the timing items' pytest-benchmark JSON, which `pytest-benchmark compare` reads;
    results.json for `twinbench report`."""
    pytest.importorskip("pytest_benchmark", reason="the timing items need pytest-benchmark (extra `test`)")
    vendor.makepyfile(test_vendor=VENDOR_TEST)
    vendor.makeini("[pytest]\ntwinbench = true\n")  # the ini switch, as --twinbench
    result = vendor.runpytest_subprocess(
        *plugin_args(), "-p", "no:cacheprovider", "-rA", "--twinbench-device", "cpu", "--twinbench-case", CASE,
        "--twinbench-trials", "1", "--twinbench-out", "tb",
        "--twinbench-benchmark", "--benchmark-json", "bench.json", "--benchmark-max-time", "0.01",
        "--benchmark-min-rounds", "2")
    text = result.stdout.str()
    case = f"gating/{CASE},top_k=4,norm=true,dtype=fp32,tie_rows=2,nonfinite_rows=2"
    outcomes = outcomes_by_name(result)
    parity = {k.split("/")[-2]: v for k, v in outcomes.items() if k.startswith("twinbench::parity[")}
    assert parity == {"reference": "PASSED", "vendor_good": "PASSED", "vendor_wrong": "FAILED",
                      "vendor_crash": "FAILED"}, text
    assert "SKIPPED [1] twinbench:1: needs the VendorChip runtime" in text
    assert "wrong: weights: err " in text and " > bound " in text
    assert "crashed: worker died with SIGABRT (aborted)" in text
    assert outcomes["twinbench::import[vendor_broken]"] == "FAILED"
    assert "plugin module vendor_broken failed to import: ModuleNotFoundError" in text
    timed = {k: v for k, v in outcomes.items() if k.startswith("twinbench::benchmark[")}
    assert timed == {f"twinbench::benchmark[{case}/{impl}/cpu/{mode}]": "PASSED"
                     for impl in ("reference", "vendor_good") for mode in ("fwd", "fwdbwd")}, text
    assert "not timed: parity crashed: worker died with SIGABRT" in text
    assert "not timed: parity wrong: weights" in text
    assert outcomes[f"test_vendor.py::test_own_check[{case}/cpu]"] == "PASSED"
    assert outcomes["test_vendor.py::test_fixture_without_marker"] == "ERROR"
    assert "needs @pytest.mark.twinbench_case(SUITE)" in text
    result.assert_outcomes(passed=7, failed=3, skipped=7, errors=1)

    bench = json.loads((vendor.path / "bench.json").read_text())
    names = {(b["extra_info"]["impl"], b["extra_info"]["mode"]) for b in bench["benchmarks"]}
    assert names == {("reference", "fwd"), ("reference", "fwdbwd"), ("vendor_good", "fwd"), ("vendor_good", "fwdbwd")}
    assert {b["group"] for b in bench["benchmarks"]} == {f"{case}/cpu/fwd", f"{case}/cpu/fwdbwd"}
    from pytest_benchmark.cli import main as pytest_benchmark_command

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["pytest-benchmark", "compare", str(vendor.path / "bench.json")])
    pytest_benchmark_command()
    assert "vendor_good/cpu/fwdbwd]" in capsys.readouterr().out

    from twinbench.harness.store.results import load

    doc = load(vendor.path / "tb" / "results.json")
    statuses = {r["impl"]: r["status"] for r in doc["results"]}
    assert statuses == {"reference": "ok", "vendor_good": "ok", "vendor_wrong": "wrong", "vendor_unavailable": "skipped",
                        "vendor_crash": "crashed"}


def test_off_unless_asked(vendor: pytest.Pytester) -> None:
    """Installed but not asked: a plain project collects its own tests only, and the plugin imports no torch (every
    pytest run on the machine loads it). An item option without --twinbench is refused, not ignored."""
    vendor.makepyfile(test_plain='''
        import sys

        def test_plain(pytestconfig):
            assert any("pytest_plugin" in (getattr(p, "__name__", "") or "")
                       for p in pytestconfig.pluginmanager.get_plugins())
            assert "torch" not in sys.modules
    ''')
    result = vendor.runpytest_subprocess(*plugin_args(), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "collected 1 item" in result.stdout.str()

    refused = vendor.runpytest_inprocess(*plugin_args(), "-p", "no:cacheprovider", "--twinbench-impl", "vendor_good")
    assert refused.ret == pytest.ExitCode.USAGE_ERROR
    assert "--twinbench-impl selects twinbench items, which are off: add --twinbench" in refused.stderr.str()


def test_selection_mistakes_are_usage_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """A selection that names nothing runnable is one UsageError line before anything runs (pytest: exit 4)."""
    with pytest.raises(UsageError, match="no device 'nope:7' on this machine"):
        plan(Selection(devices=("nope:7",)))
    with pytest.raises(UsageError, match="unknown impl nope"):
        plan(Selection(impls=("nope",), devices=("cpu",)))
    load_plugins()  # then only twinbench's own impls (other tests register some of their own)
    monkeypatch.setattr(registry, "IMPLS", {k: i for k, i in registry.IMPLS.items() if is_builtin(i)})
    with pytest.raises(UsageError, match="no installed plugin registers a twinbench impl"):
        plan(Selection(devices=("cpu",)))


def test_entry_point_declared() -> None:
    """The package declares the plugin under pytest11 (CI's installed package loads it from there)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.entry-points.pytest11]\n", 1)[1].split("\n[", 1)[0]
    assert f'twinbench = "{PLUGIN}"' in section.splitlines()


def _target(impl: str) -> Target:
    return Target("gating", "c1", {"tokens": 1}, impl, "cpu")


@pytest.mark.parametrize("status,outcome", [
    (Status.OK, None), (Status.SKIPPED, pytest.skip.Exception), (Status.WRONG, pytest.fail.Exception),
    (Status.CRASHED, pytest.fail.Exception), (Status.TIMEOUT, pytest.fail.Exception)])
def test_judge_maps_every_status(status: Status, outcome) -> None:
    """A record's status as a pytest outcome, with the run's reason; a missing record fails, never passes."""
    record = {"status": status.value, "reason": "the reason"}
    if outcome is None:
        judge(record, _target("x"))
        return
    with pytest.raises(outcome, match="the reason") as caught:
        judge(record, _target("x"))
    if status is not Status.SKIPPED:
        assert str(caught.value).startswith(f"{status.value}: the reason")
    with pytest.raises(pytest.fail.Exception, match="no record"):
        judge(None, _target("x"))


def test_tasks_for_groups_cases_reference_first() -> None:
    tasks = tasks_for([_target("a"), _target("b"), _target("a"), _target("reference"),
                       Target("gating", "c2", {"tokens": 2}, "b", "cpu")], {"gating": "reference"})
    assert [(t.case_id, t.impls) for t in tasks] == [("c1", ["reference", "a", "b"]), ("c2", ["b"])]
