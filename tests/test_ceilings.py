"""Ceilings that tell the truth (docs/method.md §2): measured under the thread count of the cases they divide,
read bandwidth beside copy bandwidth, buffers past the last-level cache, and no share ever above 100% — a
share that would be is re-measured next to its case once, then clipped and named. Fake timers throughout:
these tests prove the logic, never a speed."""

from __future__ import annotations

import types

import pytest
import torch
from twinbench.harness.core import timing
from twinbench.harness.core.case import Case
from twinbench.harness.core.devices import Device
from twinbench.harness.core.registry import Impl, Inputs
from twinbench.harness.run import worker

CPU = Device(name="cpu", backend="cpu", torch_device="cpu", model="cpu", dtypes=("fp32",))
SMALL = 1 << 16  # bandwidth buffer bytes in these tests (the real one is hundreds of MiB)


class BandwidthTimer(timing.Timer):
    """A fake device: a copy takes 2 ms, a reduction 1 ms (sum) or 4 ms (dot), a matmul 10 ms."""

    def block(self, fn, number):
        out = fn()
        if out.dim() == 2:
            return 10.0
        if out.dim() == 1:  # the copy returns its destination
            return 2.0
        return 1.0 if "sum" in fn.__code__.co_names else 4.0


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_ceilings_record_thread_count_and_read_bandwidth(monkeypatch, one_thread):
    monkeypatch.setattr(timing, "timer_for", BandwidthTimer)
    got = timing.measure_ceilings(CPU, dtypes=(), buffer_bytes=SMALL)  # matmul sizes: test_device_contracts.py
    assert got["threads"] == 1  # the thread count it was measured under travels with it
    assert got["bandwidth_bytes"] == SMALL
    assert got["copy_gbps"] == pytest.approx(2 * SMALL / 2e-3 / 1e9)  # read + write in 2 ms
    assert got["read_gbps"] == pytest.approx(SMALL / 1e-3 / 1e9)  # the better of the two reductions (sum: 1 ms)


@pytest.mark.parametrize("cache,want", [(0, 64 << 20), (300 << 20, 600 << 20), (800 << 20, 1 << 30)])
def test_bandwidth_buffers_pass_the_last_level_cache(cache, want, monkeypatch):
    monkeypatch.setattr(timing, "cpu_cache_bytes", lambda: 0)
    dev = Device(name="cpu", backend="cpu", torch_device="cpu", model="cpu", dtypes=("fp32",),
                 extra={"last_level_cache_bytes": cache})
    assert timing.bandwidth_bytes(dev) == want


def test_a_share_never_reads_above_100():
    """1 GB in 1 ms is 1000 GB/s against ceilings of 10: clipped to 100 and named, per ceiling and mode."""
    got = timing.throughput({"fwd": 1.0}, {}, {"fwd": 1e9}, "fp32",
                            {"copy_gbps": 10.0, "read_gbps": 2000.0, "threads": 2})
    assert got.derived["fwd_gbps"] == pytest.approx(1000.0)
    assert got.derived["fwd_pct_peak_bw"] == 100.0 and got.ceiling_too_low == ("fwd_pct_peak_bw",)
    assert got.derived["fwd_pct_read_bw"] == pytest.approx(50.0)
    assert got.derived["ceiling_threads"] == 2.0


# --- in the worker: per thread count, and re-measured next to a case that beats them ------------------------

def _job(ceilings, remeasure, moved=1e9):
    """One fake case: an impl and the reference that each take 1 ms (fixed timer) and move ``moved`` bytes."""
    suite = types.SimpleNamespace(make_inputs=lambda case, device, seed: Inputs(tensors={"x": torch.ones(4)}),
                                  flops=None, bytes=lambda case: {"fwd": moved})
    ref = Impl(name="reference", suite="fake", fn=lambda x: x + 1, backward=False)
    mine = Impl(name="mine", suite="fake", fn=lambda x: x * 2, backward=False)
    plan = timing.TimingPlan(rounds=7, min_rounds=7, block_ms=1.0, warmup_ms=0.0, budget_s=1.0)
    return worker.TimingJob(suite=suite, case=Case.of(dtype="fp32"), device=CPU, reference=ref, passed=(ref, mine),
                            seed=0, plan=plan, ceilings=ceilings, remeasure=remeasure)


class OneMsTimer(timing.Timer):
    def block(self, fn, number):
        fn()
        return 1.0


class NullEvents:
    def send(self, message):
        pass


@pytest.mark.parametrize("fresh_read_gbps,want_pct,flagged", [(4000.0, 25.0, False), (10.0, 100.0, True)],
                         ids=["re-measured", "still-too-low"])
def test_share_above_100_is_remeasured_once_then_flagged(fresh_read_gbps, want_pct, flagged, monkeypatch):
    monkeypatch.setattr(timing, "timer_for", OneMsTimer)
    calls = []

    def remeasure():
        calls.append(1)
        return {"copy_gbps": 8000.0, "read_gbps": fresh_read_gbps, "threads": 1}

    out = worker.measure_timing(_job({"copy_gbps": 10.0, "read_gbps": 10.0, "threads": 1}, remeasure), NullEvents())
    assert len(calls) == 1  # once per case, not once per impl or mode
    rec = out["mine"]
    assert rec.derived["fwd_pct_read_bw"] == pytest.approx(want_pct)
    assert rec.derived["ceiling_read_gbps"] == fresh_read_gbps  # the ceiling it was divided by, next to it
    assert ("fwd_pct_read_bw" in rec.timing.get("ceiling_too_low", [])) == flagged
    assert all(v is None or v <= 100.0 for k, v in rec.derived.items() if "_pct_" in k)


def test_ceilings_within_reach_are_not_remeasured(monkeypatch):
    monkeypatch.setattr(timing, "timer_for", OneMsTimer)
    calls = []
    job = _job({"copy_gbps": 4000.0, "read_gbps": 2000.0, "threads": 1}, lambda: calls.append(1) or {})
    out = worker.measure_timing(job, NullEvents())
    assert calls == [] and out["mine"].derived["fwd_pct_read_bw"] == pytest.approx(50.0)


def test_ceilings_are_measured_under_the_cases_thread_count():
    """A case with threads=1 in a worker of N threads: its ceilings are measured at 1 thread (once), the
    worker's own are kept for cases without the parameter, and the thread count comes back after the case."""
    before = torch.get_num_threads()
    measured_at = []

    def fake_measure(device):
        measured_at.append(torch.get_num_threads())
        return {"read_gbps": 10.0 * torch.get_num_threads(), "threads": torch.get_num_threads()}

    book = worker.CeilingBook(CPU, "fp", None, True, measure=fake_measure)
    assert book.current()["threads"] == before
    with worker.case_threads(Case.of(threads=1)):
        assert torch.get_num_threads() == 1
        assert book.current()["threads"] == 1
        assert book.current()["threads"] == 1
    assert torch.get_num_threads() == before
    assert book.current()["threads"] == before
    assert measured_at == [before, 1] if before != 1 else measured_at == [1]
    with worker.case_threads(Case.of(threads=0)):  # 0: the worker's own count
        assert torch.get_num_threads() == before


def test_cached_ceilings_serve_only_their_thread_count():
    """Ceilings from a --resume'd journal measured at 7 threads do not stand in for another count."""
    measured = []
    book = worker.CeilingBook(CPU, "fp", None, True, cached={"read_gbps": 1.0, "threads": 7},
                              measure=lambda device: measured.append(1) or {"threads": torch.get_num_threads()})
    if torch.get_num_threads() != 7:
        book.current()
        assert measured == [1]
    assert book.by_threads[7]["read_gbps"] == 1.0
