"""Every registered (suite, quick case, impl, device) as a pytest item, so any CI that reads pytest
output shows parity per kernel and device (on this project's CI: the CPU). Suites opt out of this by tagging
themselves "no-pytest-items" (training loops, which have their own tests).

The items, their records and their outcomes are the pytest plugin's (harness/pytest_plugin/session.py: what
`pytest --twinbench --twinbench-suite S` collects in a vendor's repository), run in this process: the case code of
`twinbench run` (harness.run.worker.run_case), without a worker start per test session. The references' own items
are left out: each case's impls are judged against their reference, which is not judged itself (a broken
reference fails every impl of its case), as this file did before it used the plugin (the references' checks
would cost this file about 30% more CPU time)."""

from pathlib import Path

import pytest
from twinbench.harness.core.registry import SUITES, load_plugins
from twinbench.harness.pytest_plugin.session import ParityRecords, Selection, judge, plan

load_plugins()
SELECTION = Selection(suites=tuple(sorted(name for name, suite in SUITES.items()
                                          if "no-pytest-items" not in suite.tags and "quick" in suite.profiles)),
                      in_process=True)
PLAN = plan(SELECTION)


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> ParityRecords:
    return ParityRecords(PLAN, SELECTION, tmp_path_factory.mktemp("registry-parity"), "pytest tests/test_registry_parity.py")


def scheduled(session: pytest.Session) -> list:
    """The targets of this file's items that this session runs (a case runs once, for its selected impls)."""
    here = Path(__file__)
    return [item.callspec.params["target"] for item in session.items
            if item.path == here and getattr(item, "originalname", "") == "test_parity"]


@pytest.mark.registry
@pytest.mark.parametrize("target", [t for t in PLAN.parity if t.impl != PLAN.reference_of[t.suite]], ids=lambda t: t.id)
def test_parity(target, records: ParityRecords, request: pytest.FixtureRequest) -> None:
    judge(records.record(target, scheduled(request.session)), target)
