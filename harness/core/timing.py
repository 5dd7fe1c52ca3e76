"""Timers per backend, warm-up, raw samples, and reference/optimized interleaved round by round.

docs/method.md §2: keep raw samples; report median, IQR, p20/p80; interleave R O R O... and store each
round's ratio, so both sides of a ratio ran under the same conditions (drift between rounds cancels; the
different contention response of two different kernels does not, which is why the gate compares an impl
with itself, §4); flush L2 outside the timed region on GPUs.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from twinbench.harness.core.devices import Device
from twinbench.harness.core.interleave import two_round_blocks


def summarize(samples_ms: list[float]) -> dict[str, Any]:
    a = np.asarray(samples_ms, dtype=float)
    p20, p25, med, p75, p80 = np.percentile(a, [20, 25, 50, 75, 80])
    return {"samples_ms": [float(x) for x in a], "median_ms": float(med), "iqr_ms": float(p75 - p25),
            "p20_ms": float(p20), "p80_ms": float(p80)}


def summarize_ratio(ratios: list[float]) -> dict[str, Any]:
    a = np.asarray(ratios, dtype=float)
    p20, med, p80 = np.percentile(a, [20, 50, 80])
    return {"samples": [float(x) for x in a], "median": float(med), "p20": float(p20), "p80": float(p80)}


class Timer:
    """Times ``number`` back-to-back calls of ``fn``; returns milliseconds per call.

    ``overhead_ms_per_call`` is device time each call costs outside the timed region (the cache flush): it
    does not count in the samples but it does in the time budget (:func:`interleaved`).
    """

    mode = "cpu-wallclock"
    overhead_ms_per_call = 0.0

    def __init__(self, device: Device):
        self.device = device

    def sync(self) -> None:
        pass

    def block(self, fn: Callable[[], Any], number: int) -> float:
        self.sync()
        start = time.perf_counter()
        for _ in range(number):
            fn()
        self.sync()
        return (time.perf_counter() - start) * 1e3 / number


# Flush size when the device reports no last-level cache: twice the largest one known (MI300X's and MI355X's
# 256 MiB Infinity Cache), docs/method.md §2.
UNKNOWN_CACHE_FLUSH_BYTES = 2 * 256 * 2**20


def flush_bytes(device: Device) -> int:
    """Bytes written between timed calls: at least twice the largest cache level the device reports."""
    largest = int(device.extra.get("last_level_cache_bytes") or 0)  # 0: unknown (devices.py)
    return 2 * largest if largest > 0 else UNKNOWN_CACHE_FLUSH_BYTES


class CudaTimer(Timer):
    """CUDA/ROCm events on the device's own current stream around each call; a buffer of at least twice the
    last-level cache is zeroed before each call, outside the events. Every call names the device: events,
    streams and ``synchronize()`` without one use the current device, which need not be this one."""

    mode = "cuda-events+l2-flush"

    def __init__(self, device: Device):
        super().__init__(device)
        self.torch_device = torch.device(device.torch_device)
        self.flush_buf = torch.empty(flush_bytes(device) // 4, dtype=torch.int32, device=self.torch_device)
        if device.backend == "rocm":
            self.mode = "hip-events+l2-flush"
        self.overhead_ms_per_call = self._flush_ms()

    def _flush_ms(self, repeats: int = 3) -> float:
        """Device time of one flush (the first, cold one not counted)."""
        stream = torch.cuda.current_stream(self.torch_device)
        self.flush_buf.zero_()
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in pairs:
            start.record(stream)
            self.flush_buf.zero_()
            end.record(stream)
        self.sync()
        return float(np.median([s.elapsed_time(e) for s, e in pairs]))

    def sync(self) -> None:
        torch.cuda.synchronize(self.torch_device)

    def block(self, fn: Callable[[], Any], number: int) -> float:
        stream = torch.cuda.current_stream(self.torch_device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(number)]
        for start, end in events:
            self.flush_buf.zero_()
            start.record(stream)
            fn()
            end.record(stream)
        self.sync()
        return float(np.mean([s.elapsed_time(e) for s, e in events]))


class XpuTimer(Timer):
    """XPU events on the device's own current stream; every call names the device (see CudaTimer)."""

    mode = "xpu-events"

    def __init__(self, device: Device):
        super().__init__(device)
        self.torch_device = torch.device(device.torch_device)

    def sync(self) -> None:
        torch.xpu.synchronize(self.torch_device)

    def block(self, fn: Callable[[], Any], number: int) -> float:
        stream = torch.xpu.current_stream(self.torch_device)
        start, end = torch.xpu.Event(enable_timing=True), torch.xpu.Event(enable_timing=True)
        self.sync()
        start.record(stream)
        for _ in range(number):
            fn()
        end.record(stream)
        self.sync()
        return float(start.elapsed_time(end)) / number


class MpsTimer(Timer):
    """torch.utils.benchmark does not synchronise MPS; MPS events do. MPS has one device."""

    mode = "mps-events"

    def sync(self) -> None:
        torch.mps.synchronize()

    def block(self, fn: Callable[[], Any], number: int) -> float:
        start, end = torch.mps.event.Event(enable_timing=True), torch.mps.event.Event(enable_timing=True)
        self.sync()
        start.record()
        for _ in range(number):
            fn()
        end.record()
        self.sync()
        return float(start.elapsed_time(end)) / number


def timer_for(device: Device) -> Timer:
    return {"cuda": CudaTimer, "rocm": CudaTimer, "xpu": XpuTimer, "mps": MpsTimer}.get(device.backend, Timer)(device)


@dataclass
class TimingPlan:
    rounds: int = 12           # >= 7: the exact Mann-Whitney test needs 7 per side to reach p < 0.002; even
                               # (interleaved() rounds an odd count up: the ratios come in two-round blocks)
    min_rounds: int = 7
    block_ms: float = 10.0     # each round times a block of calls at least this long
    warmup_ms: float = 30.0
    budget_s: float = 8.0      # per case and mode: rounds shrink (not below min_rounds) to fit


def calibrate_number(timer: Timer, fn: Callable[[], Any], plan: TimingPlan) -> tuple[int, float]:
    """Warm up (compilation, autotuning, allocator), then pick calls per block; returns (number, ms/call)."""
    first = timer.block(fn, 1)
    elapsed, per_call = first, first
    while elapsed < plan.warmup_ms:
        per_call = timer.block(fn, 1)
        elapsed += per_call
    per_call = min(per_call, timer.block(fn, 1))
    number = max(1, int(np.ceil(plan.block_ms / max(per_call, 1e-6))))
    return number, per_call


def interleaved(timer: Timer, fns: Mapping[str, Callable[[], Any]], plan: TimingPlan,
                on_round: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """Time every fn round by round (A B C A B C ...); per-fn samples and calls per block."""
    numbers: dict[str, int] = {}
    per_round_s = 0.0
    for name, fn in fns.items():
        if on_round:
            on_round(name)
        numbers[name], per_call = calibrate_number(timer, fn, plan)
        per_round_s += numbers[name] * (per_call + timer.overhead_ms_per_call) / 1e3
    rounds = plan.rounds
    if per_round_s * rounds > plan.budget_s:
        rounds = max(plan.min_rounds, int(plan.budget_s / max(per_round_s, 1e-9)))
    rounds += rounds % 2  # each order equally often: the ratios are taken over two-round blocks (round_ratios)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))  # alternate order: no fixed position bias
        for name in order:
            if on_round:
                on_round(name)
            samples[name].append(timer.block(fns[name], numbers[name]))
    return {name: {**summarize(samples[name]), "calls_per_sample": numbers[name]} for name in fns}


def round_ratios(ref_samples: list[float], impl_samples: list[float]) -> list[float]:
    """Speedup of the impl over the reference (>1 means faster) per two-round block (:func:`two_round_blocks`:
    the geometric mean of a round in one order and the next in the other), each measured in the same rounds."""
    ref, impl = np.asarray(ref_samples, dtype=float), np.asarray(impl_samples, dtype=float)
    n = min(ref.size, impl.size)
    ref, impl = ref[:n], impl[:n]
    measured = (impl > 0) & (ref > 0)
    # a round whose sample did not measure (a zero from a coarse clock) leaves its block out: NaN propagates
    logr = np.full(n, np.nan)
    logr[measured] = np.log(ref[measured] / impl[measured])
    blocks = two_round_blocks(logr)
    return [float(x) for x in np.exp(blocks[np.isfinite(blocks)])]


def flops_ceiling(ceilings: Mapping[str, Any], dtype: str | None) -> float | None:
    """The FLOP/s ceiling for a case's dtype: a 16-bit case may compute in fp32 inside (CPUs without fast fp16
    GEMM do), so its ceiling is at least the fp32 one; otherwise '% of peak' could exceed 100."""
    peaks = ceilings.get("matmul_tflops") or {}
    found = [p for p in (peaks.get(dtype), peaks.get("fp32")) if p]
    return max(found) if found else None


@dataclass(frozen=True)
class PeakShare:
    """Achieved throughput as a share of the measured ceiling. ``ceiling_too_low``: the case ran faster than the
    ceiling, so the ceiling under-measures the device; the share is then clipped to 100, never reported above."""

    pct: float | None
    ceiling_too_low: bool = False


def share_of_peak(achieved: float, ceiling: float | None) -> PeakShare:
    if not ceiling:
        return PeakShare(None)
    pct = 100 * achieved / ceiling
    return PeakShare(min(pct, 100.0), pct > 100.0)


# Square matmul sizes tried for the FLOP/s ceiling: one size under-measures some devices (2048^3 is below the
# achievable peak of H100/B200/MI300-class GPUs; 1024 below a 2-core CPU's), so several are timed and the best
# counts.
CEILING_SIZES_GPU = (2048, 4096, 8192)
CEILING_SIZES_CPU = (512, 1024, 2048)
# Bandwidth buffers on the CPU: twice the last-level cache (so the data streams from memory), at least 64 MiB,
# at most 1 GiB (the copy holds two).
CPU_BANDWIDTH_BYTES = (64 * 2**20, 2**30)


def cpu_cache_bytes() -> int:
    """The largest CPU cache level Linux reports (sysfs), 0 where unknown."""
    sizes = [0]
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = index.read_text().strip() if index.is_file() else ""
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        if text[:-1].isdigit() and text[-1:] in units:
            sizes.append(int(text[:-1]) * units[text[-1]])
        elif text.isdigit():
            sizes.append(int(text))
    return max(sizes)


def bandwidth_bytes(device: Device) -> int:
    """Bytes of each bandwidth buffer: larger than every cache level (docs/method.md §2)."""
    if device.is_gpu:
        return max(256 * 2**20, flush_bytes(device))
    largest = int(device.extra.get("last_level_cache_bytes") or 0) or cpu_cache_bytes()
    low, high = CPU_BANDWIDTH_BYTES
    return min(max(low, 2 * largest), high)


def _best_ms(timer: Timer, fn: Callable[[], Any], plan: TimingPlan) -> tuple[float, float]:
    """(best of three blocks, one warm call) in ms per call."""
    number, per_call = calibrate_number(timer, fn, plan)
    return min(timer.block(fn, number) for _ in range(3)), per_call


def measure_ceilings(device: Device, dtypes: tuple[str, ...] = ("fp32", "bf16", "fp16"),
                     budget_ms: float = 400.0, buffer_bytes: int | None = None) -> dict[str, Any]:
    """The device's achievable peaks, measured under the calling thread's torch thread count (recorded as
    ``threads``: the cases a ceiling divides must run under the same count, docs/method.md §2): the best of
    several matmul sizes per dtype, a large copy (``copy_gbps``, read + write) and a read-dominated reduction
    (``read_gbps``: the best of a sum and a dot over one buffer, the floor of kernels that stream a weight)."""
    from twinbench.harness.core.case import torch_dtype

    timer = timer_for(device)
    plan = TimingPlan(block_ms=budget_ms / 4, warmup_ms=budget_ms / 8)
    sizes = CEILING_SIZES_GPU if device.is_gpu else CEILING_SIZES_CPU
    out: dict[str, Any] = {"matmul_tflops": {}, "copy_gbps": None, "read_gbps": None, "matmul_n": {},
                           "threads": torch.get_num_threads(), "bandwidth_bytes": None}
    for name in dtypes:
        if not device.supports_dtype(name):
            continue
        for n in sizes:
            try:
                a = torch.randn(n, n, device=device.torch_device).to(torch_dtype(name))
                b = torch.randn(n, n, device=device.torch_device).to(torch_dtype(name))
                ms, per_call = _best_ms(timer, lambda a=a, b=b: torch.mm(a, b), plan)
            except Exception:  # a dtype the backend cannot multiply (or a size it cannot hold) has no ceiling
                break
            tflops = 2 * n**3 / (ms * 1e-3) / 1e12
            if tflops > out["matmul_tflops"].get(name, 0.0):
                out["matmul_tflops"][name], out["matmul_n"][name] = tflops, n
            if 8 * per_call > plan.block_ms:  # the next size takes ~8x longer: one call past a block's budget
                break
    size = buffer_bytes or bandwidth_bytes(device)
    out["bandwidth_bytes"] = size
    src = torch.empty(size // 4, dtype=torch.float32, device=device.torch_device).fill_(1.0)
    dst = torch.empty_like(src)
    ms, _ = _best_ms(timer, functools.partial(dst.copy_, src), plan)
    out["copy_gbps"] = 2 * size / (ms * 1e-3) / 1e9  # read + write
    del dst  # freed before the reductions: they need one buffer
    # Two reductions (a vectorised sum; BLAS's dot of the buffer with itself, one stream): the better is the
    # read bandwidth, since either may fall short of it on some CPU or GPU.
    ms = min(_best_ms(timer, fn, plan)[0] for fn in (lambda: src.sum(), lambda: torch.dot(src, src)))
    out["read_gbps"] = size / (ms * 1e-3) / 1e9
    return out


@dataclass(frozen=True)
class Throughput:
    """What one impl's timed medians give against the ceilings: TFLOP/s, GB/s and their shares (never above
    100: ``ceiling_too_low`` names a share the impl beat, docs/method.md §2)."""

    derived: dict[str, float | None]
    ceiling_too_low: tuple[str, ...]


def throughput(medians_ms: Mapping[str, float], flops: Mapping[str, float], nbytes: Mapping[str, float],
               dtype: str, ceilings: Mapping[str, Any]) -> Throughput:
    """Derived throughput per timing mode ('fwd', 'fwdbwd') from its median ms. Bytes are divided by both the
    copy ceiling (``_pct_peak_bw``) and the read ceiling (``_pct_read_bw``: the floor of a kernel that
    streams its data once); the ceilings' thread count is recorded with them (``ceiling_threads``)."""
    derived: dict[str, float | None] = {}
    too_low: list[str] = []

    def share(key: str, achieved: float, ceiling: float | None) -> None:
        got = share_of_peak(achieved, ceiling)
        derived[key] = got.pct
        if got.ceiling_too_low:
            too_low.append(key)

    for mode, median_ms in medians_ms.items():
        seconds = median_ms / 1e3
        work = flops.get("fwd", 0) + (flops.get("bwd", 0) if mode == "fwdbwd" else 0)
        moved = nbytes.get("fwd", 0) + (nbytes.get("bwd", 0) if mode == "fwdbwd" else 0)
        if work:
            derived[f"{mode}_tflops"] = work / seconds / 1e12
            share(f"{mode}_pct_peak_flops", derived[f"{mode}_tflops"], flops_ceiling(ceilings, dtype))
        if moved:
            derived[f"{mode}_gbps"] = moved / seconds / 1e9
            share(f"{mode}_pct_peak_bw", derived[f"{mode}_gbps"], ceilings.get("copy_gbps"))
            share(f"{mode}_pct_read_bw", derived[f"{mode}_gbps"], ceilings.get("read_gbps"))
    if derived and ceilings.get("threads") is not None:
        derived["ceiling_threads"] = float(ceilings["threads"])
    return Throughput(derived, tuple(too_low))
