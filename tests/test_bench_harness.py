"""The harness's own overheads, measured with pytest-benchmark (run: nox -s bench, or
pytest tests/test_bench_harness.py --benchmark-enable). With the default --benchmark-disable they run
once as ordinary tests, so the code paths stay exercised in CI."""

import torch
from twinbench.harness.core import devices
from twinbench.harness.core.parity import PoisonedAllocations, compare_tensor
from twinbench.harness.core.registry import Tolerance
from twinbench.harness.core.timing import Timer

CPU = devices.find("cpu")


def test_timer_block_overhead(benchmark):
    timer = Timer(CPU)
    per_call_ms = benchmark(timer.block, lambda: None, 1000)
    assert per_call_ms < 1.0  # an empty call costs microseconds, not milliseconds


def test_parity_compare_cost(benchmark):
    ref = torch.randn(256, 256, dtype=torch.float64)
    opt = ref.float() + 1e-7
    lo = ref.float()
    check = benchmark(compare_tensor, "out", opt, ref, lo, Tolerance(), False)
    assert check.ok


def test_poisoned_allocation_overhead(benchmark):
    def allocate():
        with PoisonedAllocations():
            return torch.empty(1024)

    out = benchmark(allocate)
    assert out.isnan().all()
