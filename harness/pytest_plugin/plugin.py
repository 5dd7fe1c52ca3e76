"""twinbench's pytest plugin (entry point ``pytest11``: installed, every pytest run on the machine loads it).

Off unless asked: without ``--twinbench`` (or ``twinbench = true`` in the ini file) it adds its options, two
markers and the ``twinbench_case`` fixture, and nothing else; importing it imports neither torch nor the
registry, so other projects' test sessions pay nothing. With it, the items of :mod:`.session` are collected:

    pytest --twinbench                              # parity items of every impl the installed plugins register
    pytest --twinbench --twinbench-impl my_kernel --twinbench-device cuda:0 --twinbench-case dtype=bf16
    pytest --twinbench --twinbench-benchmark --benchmark-autosave   # + timing items (pytest-benchmark)

A test of the vendor's own, over a suite's cases (works with or without ``--twinbench``)::

    @pytest.mark.twinbench_case("gating", profile="quick")
    def test_router(twinbench_case):
        out = my_router(**twinbench_case.kwargs)
        assert twinbench_case.check(my_router).ok

User mistakes (an unknown suite or impl, a malformed ``--twinbench-case``) are pytest usage errors: one line,
exit 4, nothing run. docs/adding-an-op.md ("Test your impl in your own repository").
"""

from __future__ import annotations

import pytest

# Options that select items: given without --twinbench they would silently do nothing, so they are refused.
ITEM_OPTIONS = {"twinbench_suite": "--twinbench-suite", "twinbench_impl": "--twinbench-impl",
                "twinbench_profile": "--twinbench-profile", "twinbench_case": "--twinbench-case",
                "twinbench_in_process": "--twinbench-in-process", "twinbench_benchmark": "--twinbench-benchmark",
                "twinbench_out": "--twinbench-out", "twinbench_timeout": "--twinbench-timeout",
                "twinbench_trials": "--twinbench-trials"}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("twinbench", "twinbench kernel parity (items only with --twinbench)")
    group.addoption("--twinbench", action="store_true", default=False,
                    help="collect a parity item per (suite, case, impl, device) of the installed plugins' impls")
    group.addoption("--twinbench-suite", action="append", default=[], metavar="SUITE",
                    help="only these suites, every impl of them (repeatable)")
    group.addoption("--twinbench-impl", action="append", default=[], metavar="IMPL",
                    help="only these impls (repeatable; built-in ones too)")
    group.addoption("--twinbench-profile", default=None, metavar="PROFILE", help="case grid (default quick)")
    group.addoption("--twinbench-case", action="append", default=[], metavar="K=V,...",
                    help="filter the grid, or build that shape (as `twinbench run --case`; repeatable)")
    group.addoption("--twinbench-device", action="append", default=[], metavar="DEVICE",
                    help="cpu, cuda:0, ... (repeatable; default every device found)")
    group.addoption("--twinbench-plugin", action="append", default=[], metavar="FILE.py",
                    help="impls/suites from a Python file (as `twinbench run --plugin`)")
    group.addoption("--twinbench-in-process", action="store_true", default=None,
                    help="run parity in the pytest process: no worker start, but a crashing kernel ends pytest")
    group.addoption("--twinbench-timeout", type=float, default=None, metavar="S",
                    help="seconds without progress before a worker's case counts as hung (default 600)")
    group.addoption("--twinbench-trials", type=int, default=None, metavar="N",
                    help="parity trials (fresh inputs) per case (default: the suite's)")
    group.addoption("--twinbench-benchmark", action="store_true", default=None,
                    help="also time each impl that passed parity, and its reference, with pytest-benchmark")
    group.addoption("--twinbench-out", default=None, metavar="DIR",
                    help="keep results.json, journal.jsonl and worker logs there (for `twinbench report`)")
    parser.addini("twinbench", type="bool", default=False, help="collect twinbench's items as with --twinbench")


def enabled(config: pytest.Config) -> bool:
    return bool(config.getoption("twinbench") or config.getini("twinbench"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "twinbench: a twinbench parity or timing item (collected with --twinbench)")
    config.addinivalue_line("markers", "twinbench_case(suite, profile='quick', case=None): run the test once per case "
                                       "of the suite's profile (case: 'k=v,...' filters or builds one) and device; "
                                       "the twinbench_case fixture holds the case's inputs")
    if not enabled(config):
        given = [flag for dest, flag in ITEM_OPTIONS.items() if config.getoption(dest) not in (None, [], False)]
        if given:
            raise pytest.UsageError(f"twinbench: {given[0]} selects twinbench items, which are off: add --twinbench "
                                    f"(or `twinbench = true` in the ini file)")
        return
    from twinbench.harness.core.errors import UsageError
    from twinbench.harness.pytest_plugin import session

    if config.getoption("twinbench_benchmark") and not config.pluginmanager.has_plugin("benchmark"):
        raise pytest.UsageError("twinbench: --twinbench-benchmark needs pytest-benchmark (pip install "
                                "pytest-benchmark)")
    try:
        config.stash[session.SESSION_KEY] = session.TwinbenchSession(_selection(config), session.command_line(config))
    except UsageError as exc:
        raise session.usage_error(exc) from None


def _selection(config: pytest.Config):
    from twinbench.harness.pytest_plugin.session import Selection

    here = config.invocation_params.dir
    out = config.getoption("twinbench_out")
    for dest, flag in (("twinbench_trials", "--twinbench-trials"), ("twinbench_timeout", "--twinbench-timeout")):
        value = config.getoption(dest)
        if value is not None and not value > 0:
            raise pytest.UsageError(f"twinbench: {flag} must be positive, not {value:g}")
    return Selection(suites=tuple(config.getoption("twinbench_suite")), impls=tuple(config.getoption("twinbench_impl")),
                     profile=config.getoption("twinbench_profile") or "quick",
                     devices=tuple(config.getoption("twinbench_device")), cases=tuple(config.getoption("twinbench_case")),
                     plugins=_plugin_paths(config), in_process=bool(config.getoption("twinbench_in_process")),
                     benchmark=bool(config.getoption("twinbench_benchmark")),
                     timeout=config.getoption("twinbench_timeout") or 600.0,
                     trials=config.getoption("twinbench_trials"),
                     out=(here / out).resolve() if out else None)


def _plugin_paths(config: pytest.Config) -> tuple[str, ...]:
    """``--twinbench-plugin`` files as absolute paths (workers start in twinbench's own folder)."""
    here = config.invocation_params.dir
    return tuple(str((here / p).resolve()) for p in config.getoption("twinbench_plugin"))


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselection, which then applies to these items too
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    if not enabled(config):
        return
    from twinbench.harness.pytest_plugin.session import SESSION_KEY

    items.extend(config.stash[SESSION_KEY].collect(session))


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not enabled(session.config):
        return
    from twinbench.harness.pytest_plugin.session import SESSION_KEY

    tb = session.config.stash.get(SESSION_KEY, None)
    if tb is not None:
        written = tb.finish()
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if written is not None and reporter is not None:
            reporter.write_line(f"twinbench: wrote {written}")


def pytest_unconfigure(config: pytest.Config) -> None:
    if not enabled(config):
        return
    from twinbench.harness.pytest_plugin.session import SESSION_KEY

    tb = config.stash.get(SESSION_KEY, None)
    if tb is not None:
        tb.close()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "twinbench_case" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("twinbench_case")
    if marker is None:
        return  # the fixture says what is missing
    from twinbench.harness.core.errors import UsageError
    from twinbench.harness.pytest_plugin.session import case_specs, usage_error

    suite = marker.args[0] if marker.args else marker.kwargs.get("suite")
    case = marker.kwargs.get("case")
    try:
        specs = case_specs(suite, marker.kwargs.get("profile", "quick"), [case] if case else [],
                           metafunc.config.getoption("twinbench_device"), _plugin_paths(metafunc.config))
    except UsageError as exc:
        raise usage_error(exc) from None
    metafunc.parametrize("twinbench_case", specs, ids=[s.id for s in specs], indirect=True)


@pytest.fixture
def twinbench_case(request: pytest.FixtureRequest):
    """One case of a suite on one device (:class:`~twinbench.harness.pytest_plugin.session.CaseInputs`): its
    inputs (``kwargs``), the reference's outputs (``reference()``), the tolerance policy and the parity rule
    (``check(fn)``). The test is run once per case of ``@pytest.mark.twinbench_case(SUITE, profile=..., case=...)``."""
    spec = getattr(request, "param", None)
    if spec is None:
        pytest.fail("the twinbench_case fixture needs @pytest.mark.twinbench_case(SUITE) on the test", pytrace=False)
    from twinbench.harness.pytest_plugin.session import CaseInputs

    return CaseInputs.build(spec)

