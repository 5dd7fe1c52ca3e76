"""Every registered (suite, quick case, impl, device) as a pytest item, so any CI that reads pytest
output shows parity per kernel and device (on this project's CI: the CPU). Suites opt out of this by tagging themselves "no-pytest-items"
(training loops, which have their own tests)."""

import pytest
from twinbench.harness.core import devices
from twinbench.harness.core.parity import check_parity
from twinbench.harness.core.registry import IMPLS, SUITES, impls_for, load_plugins

load_plugins()
DEVICES = devices.detect()


def _items():
    for suite in sorted(SUITES.values(), key=lambda s: s.name):
        if "no-pytest-items" in suite.tags or "quick" not in suite.profiles:
            continue
        for case in suite.cases("quick"):
            for impl in impls_for(suite.name):
                if impl.name == suite.reference:
                    continue
                for dev in DEVICES:
                    yield pytest.param(suite.name, case, impl.name, dev,
                                       id=f"{suite.name}/{case.id}/{impl.name}/{dev.name}",
                                       marks=pytest.mark.registry)


@pytest.mark.parametrize("suite_name,case,impl_name,device", list(_items()))
def test_parity(suite_name, case, impl_name, device):
    suite = SUITES[suite_name]
    impl = IMPLS[(suite_name, impl_name)]
    ok, why = impl.can_run(case, device)
    if ok and "dtype" in case and not device.supports_dtype(case["dtype"]):
        ok, why = False, f"{device.name} cannot compute in {case['dtype']}"
    if not ok:
        pytest.skip(why)
    verdict = check_parity(suite, impl, IMPLS[(suite_name, suite.reference)], case, device.torch_device)
    failing = {n: f"{c.error:.3g} > {c.bound:.3g} {c.detail}" for n, c in verdict.checks.items() if not c.ok}
    assert verdict.ok, f"problems={verdict.problems} failing={failing}"
