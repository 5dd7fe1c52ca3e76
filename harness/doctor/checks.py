"""The doctor's checks: can the harness trust its own numbers on this device? (docs/bring-up.md)

Each check is a small function ``(DoctorContext) -> Check``. They run inside the doctor's worker process on
the device (harness/doctor/worker.py), in the order of :data:`CHECKS`; ``clock_drift`` runs last so it sees
the clocks after everything else has loaded the device. A check that raises is recorded as a failure with
its exception by the worker, never a crash of the doctor.
"""

from __future__ import annotations

import contextlib
import enum
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from twinbench.harness.core.case import Case, torch_dtype
from twinbench.harness.core.devices import Device, _nvidia_smi, _rocm_smi
from twinbench.harness.core.parity import check_parity
from twinbench.harness.core.registry import Impl, Inputs, Suite
from twinbench.harness.core.timing import (
    Timer,
    TimingPlan,
    calibrate_number,
    flops_ceiling,
    measure_ceilings,
    timer_for,
)
from twinbench.harness.run.process import VISIBILITY_VARIABLES


class Status(enum.Enum):
    PASS = "pass"
    WARN = "warn"  # the numbers can be used, with the caveat in ``why``
    FAIL = "fail"  # do not trust this device's numbers until fixed
    SKIP = "skip"  # not applicable here, or not measurable (``why`` says which)


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    measured: dict[str, Any]
    expected: str
    why: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status.value, "measured": finite(self.measured),
                "expected": self.expected, "why": self.why}


def finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None: the doctor's JSON is strict."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


@dataclass
class DoctorContext:
    device: Device
    timer: Timer
    # Filled by clock_state, read by clock_drift (the run between them is what drifts).
    clocks_at_start: dict[str, float] = field(default_factory=dict)


# --- timer ------------------------------------------------------------------------------------------------

PLAN = TimingPlan()
# A clock step must be far below one timed block (docs/method.md §2: blocks of >= block_ms): at most 1% of it.
MAX_RESOLUTION_MS = PLAN.block_ms / 100
# Linearity: per-call time at k x the calls against 1 x, as the median of per-round ratios of interleaved
# blocks (§2: both sides of a ratio under the same conditions). One thread, wall clock, on this loaded box:
# median-ratio CV 0.038-0.052 (§7), so 15% is three of those; up to 50% (twice the worst unpinned
# two-thread CV, 0.24) is a warning about the machine. A timer that misses the work or adds a fixed cost
# per block reads 1/k or below at the largest k: far beyond either.
LINEARITY_PASS = 0.15
LINEARITY_WARN = 0.50
LINEARITY_FACTORS = (1, 2, 4)
LINEARITY_ROUNDS = 11
# The 1x block spans many scheduler time slices (a few ms each), so on a shared machine every block length
# loses the same share of its wall time to other processes; a block that fits in one slice is sometimes
# not preempted at all, and short blocks then read faster per call (docs/bring-up.md, Measured).
LINEARITY_BLOCK_MS = 40.0


@contextlib.contextmanager
def single_thread_cpu(device: Device):
    """On the CPU the timer checks run on one thread: an OpenMP team waiting for a descheduled member turns a
    0.03 ms call into 8-16 ms on a shared box (docs/method.md §6, §7), which is the machine, not the timer."""
    saved = torch.get_num_threads()
    if not device.is_gpu:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _matmul_work(device: Device, n: int) -> Callable[[], Any]:
    a = torch.randn(n, n, device=device.torch_device)
    b = torch.randn(n, n, device=device.torch_device)
    return lambda: torch.mm(a, b)


def timer_resolution(ctx: DoctorContext) -> Check:
    """The smallest step the timer can show: host clock steps, and on GPUs an empty event pair."""
    steps = []
    for _ in range(2000):
        t0 = time.perf_counter()
        t1 = time.perf_counter()
        while t1 == t0:
            t1 = time.perf_counter()
        steps.append((t1 - t0) * 1e3)
    measured: dict[str, Any] = {"host_step_ms": min(steps), "host_step_median_ms": statistics.median(steps)}
    worst = measured["host_step_median_ms"]
    if ctx.device.is_gpu:
        empty = [ctx.timer.block(lambda: None, 1) for _ in range(50)]
        measured["event_empty_median_ms"] = statistics.median(empty)
        worst = max(worst, measured["event_empty_median_ms"])
    ok = worst <= MAX_RESOLUTION_MS
    return Check("timer_resolution", Status.PASS if ok else Status.FAIL, measured,
                 f"<= {MAX_RESOLUTION_MS:g} ms (1% of a {PLAN.block_ms:g} ms timed block)",
                 "fine enough for the timed blocks" if ok else
                 "the timer's step is a visible share of a timed block: samples are quantised")


def timer_linearity(ctx: DoctorContext) -> Check:
    """k x the calls in one block must give the same time per call (k x the work -> k x the time)."""
    n = 512 if ctx.device.is_gpu else 96
    with single_thread_cpu(ctx.device):
        work = _matmul_work(ctx.device, n)
        plan = TimingPlan(block_ms=LINEARITY_BLOCK_MS, warmup_ms=20.0)
        number, _ = calibrate_number(ctx.timer, work, plan)
        samples: dict[int, list[float]] = {k: [] for k in LINEARITY_FACTORS}
        for r in range(LINEARITY_ROUNDS):
            order = LINEARITY_FACTORS if r % 2 == 0 else tuple(reversed(LINEARITY_FACTORS))
            for k in order:
                samples[k].append(ctx.timer.block(work, k * number))
    base = statistics.median(samples[1])
    ratios = {f"x{k}": statistics.median(s / b for s, b in zip(samples[k], samples[1])) for k in LINEARITY_FACTORS[1:]}
    worst = max(abs(math.log(r)) for r in ratios.values())
    status = (Status.PASS if worst <= math.log1p(LINEARITY_PASS) else
              Status.WARN if worst <= math.log1p(LINEARITY_WARN) else Status.FAIL)
    return Check("timer_linearity", status,
                 {"calls_per_block": number, "per_call_ms_x1": base, "per_call_ratio": ratios,
                  "rounds": LINEARITY_ROUNDS},
                 f"per-call time at 2x and 4x the calls within {LINEARITY_PASS:.0%} of 1x (warn to "
                 f"{LINEARITY_WARN:.0%}), median of {LINEARITY_ROUNDS} interleaved rounds' ratios",
                 {Status.PASS: "time grows with the work", Status.WARN: "time per call drifts with block length: "
                  "the machine is noisy or the timer has a per-block offset",
                  Status.FAIL: "time does not grow with the work: the timer misses work or adds a fixed cost"}[status])


def events_vs_wall(ctx: DoctorContext) -> Check:
    """GPU events against the host's wall clock around the same synchronised block."""
    if not ctx.device.is_gpu:
        return Check("events_vs_wall", Status.SKIP, {}, "GPU only",
                     "the CPU timer is the wall clock (docs/method.md §2)")
    work = _matmul_work(ctx.device, 2048)
    number = 20
    ratios = []
    for _ in range(5):
        ctx.timer.sync()
        start = time.perf_counter()
        event_ms = ctx.timer.block(work, number) * number
        wall_ms = (time.perf_counter() - start) * 1e3
        ratios.append(event_ms / wall_ms)
    ratio = statistics.median(ratios)
    # Events exclude the host's launch gaps and (CudaTimer) the L2 flush between calls, so they read below
    # the wall clock; above it means the events time something other than the work.
    ok = 0.3 <= ratio <= 1.05
    return Check("events_vs_wall", Status.PASS if ok else Status.FAIL, {"events_over_wall_median": ratio,
                                                                       "ratios": ratios},
                 "0.3 <= events/wall <= 1.05 (events exclude launch gaps and the flush)",
                 "events agree with the wall clock" if ok else "device events disagree with the wall clock")


def l2_flush(ctx: DoctorContext) -> Check:
    """A read of a cache-sized buffer, cache-resident (plain events) against flushed (the run's timer)."""
    if not ctx.device.is_gpu or not hasattr(ctx.timer, "flush_buf"):
        return Check("l2_flush", Status.SKIP, {}, "GPUs with events + flush (CUDA, ROCm)",
                     "this device's timer does not flush caches (docs/method.md §2)")
    l2 = int(ctx.device.extra.get("l2_cache_bytes") or 0) or 32 * 2**20
    buf = torch.ones(l2 // 2 // 4, dtype=torch.float32, device=ctx.device.torch_device)
    work = lambda: buf.sum()  # noqa: E731
    flushed = statistics.median(ctx.timer.block(work, 10) for _ in range(7))
    resident = statistics.median(_resident_ms(ctx.timer, work, 10) for _ in range(7))
    ratio = flushed / resident
    ok = ratio >= 1.1
    return Check("l2_flush", Status.PASS if ok else Status.WARN,
                 {"buffer_bytes": buf.numel() * 4, "flushed_ms": flushed, "resident_ms": resident,
                  "flushed_over_resident": ratio},
                 ">= 1.1x slower after the flush (half the L2, read once)",
                 "the flush evicts the cache" if ok else
                 "a flushed read is not slower: the flush may not reach the last-level cache")


def _resident_ms(timer: Timer, fn: Callable[[], Any], number: int) -> float:
    """Events around each call like CudaTimer.block, without its flush: the cache stays warm."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(number)]
    fn()
    for start, end in events:
        start.record()
        fn()
        end.record()
    timer.sync()
    return statistics.fmean(s.elapsed_time(e) for s, e in events)


# --- clocks -----------------------------------------------------------------------------------------------

def smi_id(device: Device):
    """The device's id for nvidia-smi / rocm-smi: the worker sees only its device (docs/method.md §6), so
    torch's index is 0 while the SMI tools count physical devices; the visibility mask names the real one."""
    mask = os.environ.get(VISIBILITY_VARIABLES.get(device.backend, ""), "").split(",")[0].strip()
    if mask:
        return mask
    return int(device.torch_device.split(":")[1]) if ":" in device.torch_device else 0


def read_clocks(device: Device) -> dict[str, float]:
    """Clock readings now: GPU SMI tools where present; CPU: /proc/cpuinfo MHz. Empty: not available."""
    if device.backend == "cuda":
        smi = _nvidia_smi(smi_id(device))
        return {k: float(v) for k, v in smi.items() if k.startswith("clocks.") and _is_number(v)}
    if device.backend == "rocm":
        out = {}
        for key, value in _rocm_smi(smi_id(device)).items():
            digits = "".join(ch for ch in value.split("(")[-1] if ch.isdigit() or ch == ".")
            if "clk" in key.lower() and _is_number(digits):
                out[key] = float(digits)
        return out
    if device.backend == "cpu":
        try:
            mhz = [float(line.split(":", 1)[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("cpu MHz")]
        except OSError:
            mhz = []
        return {"cpu_mhz_mean": statistics.fmean(mhz), "cpu_mhz_min": min(mhz)} if mhz else {}
    return {}


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def throttle_state(device: Device) -> dict[str, str]:
    if device.backend == "cuda":
        reasons = _nvidia_smi(smi_id(device)).get("clocks_throttle_reasons.active", "")
        return {"throttle_reasons": reasons} if reasons else {}
    if device.backend == "cpu":
        governor = Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
        try:
            return {"scaling_governor": governor.read_text().strip()}
        except OSError:
            return {}
    return {}


# nvidia-smi's clocks_throttle_reasons bit mask: 0x1 is "GPU idle", not a throttle.
GPU_IDLE_REASON = 0x1


def _throttling(reasons: str) -> bool:
    try:
        return bool(int(reasons, 16) & ~GPU_IDLE_REASON)
    except ValueError:  # "[N/A]", "Not Active", absent
        return False


def clock_state(ctx: DoctorContext) -> Check:
    ctx.clocks_at_start = read_clocks(ctx.device)
    state = throttle_state(ctx.device)
    measured = {**ctx.clocks_at_start, **state}
    if not measured:
        return Check("clock_state", Status.SKIP, {"clocks": "not available"}, "readable clocks",
                     "no SMI tool, /proc/cpuinfo MHz or cpufreq governor readable here: not available")
    warn = []
    if _throttling(state.get("throttle_reasons", "")):
        warn.append(f"throttled now (nvidia-smi reasons {state['throttle_reasons']})")
    if state.get("scaling_governor", "performance") not in ("performance",):
        warn.append(f"CPU governor {state['scaling_governor']!r}: clocks follow load, times vary")
    return Check("clock_state", Status.WARN if warn else Status.PASS, measured,
                 "no active throttle reason; CPU governor 'performance' where one is readable",
                 "; ".join(warn) or "clocks readable, nothing throttling")


CLOCK_DRIFT_WARN = 0.10  # a clock that moves by more than this between start and end moves the timings too


def clock_drift(ctx: DoctorContext) -> Check:
    end = read_clocks(ctx.device)
    common = sorted(set(end) & set(ctx.clocks_at_start))
    if not common:
        return Check("clock_drift", Status.SKIP, {"clocks": "not available"}, "readable clocks",
                     "clocks not readable at start and end: not available")
    drift = {k: end[k] / ctx.clocks_at_start[k] - 1 for k in common if ctx.clocks_at_start[k]}
    worst = max((abs(v) for v in drift.values()), default=0.0)
    ok = worst <= CLOCK_DRIFT_WARN
    return Check("clock_drift", Status.PASS if ok else Status.WARN,
                 {"start": {k: ctx.clocks_at_start[k] for k in common}, "end": {k: end[k] for k in common},
                  "relative_drift": drift},
                 f"each clock within {CLOCK_DRIFT_WARN:.0%} from the first check to the last",
                 "clocks held over the doctor's run" if ok else
                 "clocks moved during the run (boost, thermal or power limits): expect run-to-run noise")


# --- ceilings and dtypes -------------------------------------------------------------------------------------

def ceilings(ctx: DoctorContext) -> Check:
    """The measured ceilings the roofline divides by (§2); a larger matmul that beats them means '% of peak'
    would exceed 100 in a report."""
    found = measure_ceilings(ctx.device)
    probes, over = {}, {}
    for name, tflops in found["matmul_tflops"].items():
        n = probes[name] = found["matmul_n"][name] * 3 // 2
        a = torch.randn(n, n, device=ctx.device.torch_device).to(torch_dtype(name))
        b = torch.randn(n, n, device=ctx.device.torch_device).to(torch_dtype(name))
        ms = min(ctx.timer.block(lambda: torch.mm(a, b), 1) for _ in range(3))
        over[name] = 2 * n**3 / (ms * 1e-3) / 1e12 / (flops_ceiling(found, name) or tflops)
    measured = {"matmul_tflops": found["matmul_tflops"], "copy_gbps": found["copy_gbps"],
                "matmul_n": found["matmul_n"], "probe_n": probes, "probe_share_of_ceiling": over}
    beyond = {k: v for k, v in over.items() if v > 1.0}
    if not found["matmul_tflops"] or not found["copy_gbps"]:
        return Check("ceilings", Status.FAIL, measured, "a matmul ceiling per dtype and a copy bandwidth",
                     "no ceiling measured: every '% of peak' would be missing")
    return Check("ceilings", Status.WARN if beyond else Status.PASS, measured,
                 "a matmul 1.5x the ceiling's size reaches <= 100% of the measured ceiling",
                 ("'% of peak' would exceed 100 for " + ", ".join(f"{k} ({v:.0%})" for k, v in beyond.items())
                  + ": the ceiling under-measures the device") if beyond else "ceilings bound larger work")


def dtype_support(ctx: DoctorContext) -> Check:
    """fp64 (the reference of fp32 cases) and bf16 (the training dtype): do they run, and correctly?"""
    gen = torch.Generator().manual_seed(0)
    a64 = torch.randn(64, 64, generator=gen, dtype=torch.float64)
    b64 = torch.randn(64, 64, generator=gen, dtype=torch.float64)
    exact = a64 @ b64
    measured: dict[str, Any] = {"claimed": list(ctx.device.dtypes)}
    problems, notes = [], []
    # max relative error a correct matmul of N(0,1) 64x64 stays below in each dtype (unit roundoff x ~sqrt(64))
    bounds = {"fp64": 1e-12, "bf16": 0.1}
    for name, dtype in (("fp64", torch.float64), ("bf16", torch.bfloat16)):
        try:
            got = (a64.to(dtype).to(ctx.device.torch_device) @ b64.to(dtype).to(ctx.device.torch_device))
            err = float((got.double().cpu() - exact).abs().max() / exact.abs().max())
            measured[name] = {"runs": True, "max_rel_error": err}
            if err > bounds[name]:
                problems.append(f"{name} matmul wrong (relative error {err:.2g} > {bounds[name]:g})")
            elif name not in ctx.device.dtypes:
                notes.append(f"{name} works but the device does not claim it")
        except Exception as exc:
            measured[name] = {"runs": False, "error": f"{type(exc).__name__}: {exc}"[:200]}
            (problems if name in ctx.device.dtypes else notes).append(f"{name} unavailable")
    status = Status.FAIL if problems else Status.WARN if notes else Status.PASS
    return Check("dtype_support", status, measured,
                 "fp64 and bf16 matmuls run and match an fp64 CPU product; every claimed dtype works",
                 "; ".join(problems + notes) or "fp64 and bf16 available and correct")


# --- the parity engine's own self-test ------------------------------------------------------------------------

SELF_TEST_CASE = Case.of(n=48, dtype="fp32")  # square, so a transposed operand still fits


def _self_test_inputs(case: Case, device: Any, seed: int) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(case["n"], case["n"], generator=gen).to(device)
    b = torch.randn(case["n"], case["n"], generator=gen).to(device)
    return Inputs(tensors={"a": a, "b": b}, grad=("a", "b"))


SELF_TEST_SUITE = Suite(name="doctor_matmul", description="the doctor's parity self-test: a @ b",
                        profiles={"doctor": [SELF_TEST_CASE]}, make_inputs=_self_test_inputs, trials=2)


def _reference(a, b):
    return a @ b


def _correct(a, b):
    return torch.matmul(a, b)


def _transposed(a, b):  # a planted bug: b read transposed (the self-test's matrices are square)
    return a @ b.T


def _off_by_one(a, b):  # a planted bug: the reduction loop stops one term early
    return a[:, :-1] @ b[:-1, :]


def _low_precision(a, b):  # a planted bug: an fp32 op computed in a 16-bit dtype
    return (a.to(torch.bfloat16) @ b.to(torch.bfloat16)).to(a.dtype)


def _unwritten_row(a, b):  # a planted bug: the last output row is never written
    out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)
    out[:-1] = a[:-1] @ b
    return out


# (impl name, function, whether parity must pass)
SELF_TEST_IMPLS: tuple[tuple[str, Callable[..., Any], bool], ...] = (
    ("correct", _correct, True),
    ("planted_transposed", _transposed, False),
    ("planted_off_by_one", _off_by_one, False),
    ("planted_low_precision", _low_precision, False),
    ("planted_unwritten_row", _unwritten_row, False),
)


def parity_self_test(ctx: DoctorContext) -> Check:
    """Planted wrong impls of a tiny matmul must fail the parity rule on this device; the correct one must
    pass (docs/method.md §1: three-way rule, poisoned allocations, stability)."""
    ref = Impl(name="reference", suite=SELF_TEST_SUITE.name, fn=_reference, tags=("reference",))
    verdicts: dict[str, Any] = {}
    wrong = []
    for name, fn, should_pass in SELF_TEST_IMPLS:
        impl = Impl(name=name, suite=SELF_TEST_SUITE.name, fn=fn)
        verdict = check_parity(SELF_TEST_SUITE, impl, ref, SELF_TEST_CASE, ctx.device.torch_device)
        worst = max(verdict.checks.values(), key=lambda c: c.ratio, default=None)
        verdicts[name] = {"passed": verdict.ok, "expected_pass": should_pass,
                          "worst_ratio": worst.ratio if worst else None, "problems": verdict.problems[:3]}
        if verdict.ok != should_pass:
            wrong.append(f"{name} {'passed' if verdict.ok else 'failed'}")
    return Check("parity_self_test", Status.FAIL if wrong else Status.PASS, verdicts,
                 "the correct matmul passes; transposed, off-by-one, low-precision and unwritten-row plants fail",
                 ("the parity engine misjudged: " + ", ".join(wrong)) if wrong else
                 "the parity engine catches every planted bug here and passes the correct impl")


CHECKS: tuple[Callable[[DoctorContext], Check], ...] = (
    clock_state, timer_resolution, timer_linearity, events_vs_wall, l2_flush, dtype_support, ceilings,
    parity_self_test, clock_drift,
)
CHECK_NAMES = tuple(fn.__name__ for fn in CHECKS)


def make_context(device: Device) -> DoctorContext:
    return DoctorContext(device=device, timer=timer_for(device))


def failed_check(name: str, reason: str) -> Check:
    """A check that raised (or a worker that died during it): a failure, with the reason."""
    return Check(name, Status.FAIL, {"error": reason[:500]}, "the check completes", reason[:500])

