"""Every registered (suite, quick case, impl) as a pytest item on the CPU, so any CI that reads pytest
output shows parity per kernel. Suites opt out of this by tagging themselves "no-pytest-items"
(training loops, which have their own tests)."""

import pytest

from harness import devices
from harness.parity import check_parity
from harness.registry import IMPLS, SUITES, impls_for, load_plugins

load_plugins()
CPU = devices.find("cpu")


def _items():
    for suite in sorted(SUITES.values(), key=lambda s: s.name):
        if "no-pytest-items" in suite.tags or "quick" not in suite.profiles:
            continue
        for case in suite.cases("quick"):
            for impl in impls_for(suite.name):
                if impl.name == suite.reference:
                    continue
                yield pytest.param(suite.name, case, impl.name, id=f"{suite.name}/{case.id}/{impl.name}/cpu",
                                   marks=pytest.mark.registry)


@pytest.mark.parametrize("suite_name,case,impl_name", list(_items()))
def test_parity(suite_name, case, impl_name):
    suite = SUITES[suite_name]
    impl = IMPLS[(suite_name, impl_name)]
    ok, why = impl.can_run(case, CPU)
    if not ok:
        pytest.skip(why)
    verdict = check_parity(suite, impl, IMPLS[(suite_name, suite.reference)], case, "cpu")
    failing = {n: f"{c.error:.3g} > {c.bound:.3g} {c.detail}" for n, c in verdict.checks.items() if not c.ok}
    assert verdict.ok, f"problems={verdict.problems} failing={failing}"
