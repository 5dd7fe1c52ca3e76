"""Timers per backend, warm-up, raw samples, and reference/optimized interleaved round by round.

docs/method.md §2: keep raw samples; report median, IQR, p20/p80; interleave R O R O... and store each
round's ratio, so both sides of a ratio ran under the same conditions (drift between rounds cancels; the
different contention response of two different kernels does not, which is why the gate compares an impl
with itself, §4); flush L2 outside the timed region on GPUs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from twinbench.harness.core.devices import Device


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
    """Times ``number`` back-to-back calls of ``fn``; returns milliseconds per call."""

    mode = "cpu-wallclock"

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


class CudaTimer(Timer):
    """CUDA/ROCm events around each call; an L2-sized buffer is zeroed before each call, outside the events."""

    mode = "cuda-events+l2-flush"

    def __init__(self, device: Device):
        super().__init__(device)
        l2 = int(device.extra.get("l2_cache_bytes") or 0)
        # >= 2x last-level cache; 256 MiB covers MI300X's Infinity Cache when L2 size is unknown.
        flush_bytes = max(2 * l2, 256 * 2**20)
        self.flush_buf = torch.empty(flush_bytes // 4, dtype=torch.int32, device=device.torch_device)
        if device.backend == "rocm":
            self.mode = "hip-events+l2-flush"

    def sync(self) -> None:
        torch.cuda.synchronize(self.device.torch_device)

    def block(self, fn: Callable[[], Any], number: int) -> float:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(number)]
        for start, end in events:
            self.flush_buf.zero_()
            start.record()
            fn()
            end.record()
        self.sync()
        return float(np.mean([s.elapsed_time(e) for s, e in events]))


class XpuTimer(Timer):
    mode = "xpu-events"

    def sync(self) -> None:
        torch.xpu.synchronize()

    def block(self, fn: Callable[[], Any], number: int) -> float:
        start, end = torch.xpu.Event(enable_timing=True), torch.xpu.Event(enable_timing=True)
        self.sync()
        start.record()
        for _ in range(number):
            fn()
        end.record()
        self.sync()
        return float(start.elapsed_time(end)) / number


class MpsTimer(Timer):
    """torch.utils.benchmark does not synchronise MPS; MPS events do."""

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
    rounds: int = 11           # >= 7: the exact Mann-Whitney test needs 7 per side to reach p < 0.002
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
        per_round_s += numbers[name] * per_call / 1e3
    rounds = plan.rounds
    if per_round_s * rounds > plan.budget_s:
        rounds = max(plan.min_rounds, int(plan.budget_s / max(per_round_s, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))  # alternate order: no fixed position bias
        for name in order:
            if on_round:
                on_round(name)
            samples[name].append(timer.block(fns[name], numbers[name]))
    return {name: {**summarize(samples[name]), "calls_per_sample": numbers[name]} for name in fns}


def round_ratios(ref_samples: list[float], impl_samples: list[float]) -> list[float]:
    """Per-round speedup of the impl over the reference (>1 means faster), measured in the same round."""
    return [r / i for r, i in zip(ref_samples, impl_samples) if i > 0]


def flops_ceiling(ceilings: Mapping[str, Any], dtype: str | None) -> float | None:
    """The FLOP/s ceiling for a case's dtype: a 16-bit case may compute in fp32 inside (CPUs without fast fp16
    GEMM do), so its ceiling is at least the fp32 one; otherwise '% of peak' could exceed 100."""
    peaks = ceilings.get("matmul_tflops") or {}
    found = [p for p in (peaks.get(dtype), peaks.get("fp32")) if p]
    return max(found) if found else None


def measure_ceilings(device: Device, dtypes: tuple[str, ...] = ("fp32", "bf16", "fp16"),
                     budget_ms: float = 400.0) -> dict[str, Any]:
    """The device's achievable peaks, measured: a large matmul per dtype and a large copy."""
    from twinbench.harness.core.case import torch_dtype

    timer = timer_for(device)
    plan = TimingPlan(block_ms=budget_ms / 4, warmup_ms=budget_ms / 8)
    n = 2048 if device.is_gpu else 1024
    out: dict[str, Any] = {"matmul_tflops": {}, "copy_gbps": None, "matmul_n": n}
    for name in dtypes:
        if not device.supports_dtype(name):
            continue
        try:
            a = torch.randn(n, n, device=device.torch_device).to(torch_dtype(name))
            b = torch.randn(n, n, device=device.torch_device).to(torch_dtype(name))
            number, _ = calibrate_number(timer, lambda: torch.mm(a, b), plan)
            ms = min(timer.block(lambda: torch.mm(a, b), number) for _ in range(3))
            out["matmul_tflops"][name] = 2 * n**3 / (ms * 1e-3) / 1e12
        except Exception:  # a dtype the backend cannot multiply has no ceiling
            continue
    size = (256 if device.is_gpu else 64) * 2**20
    src = torch.empty(size // 4, dtype=torch.float32, device=device.torch_device).fill_(1.0)
    dst = torch.empty_like(src)
    number, _ = calibrate_number(timer, lambda: dst.copy_(src), plan)
    ms = min(timer.block(lambda: dst.copy_(src), number) for _ in range(3))
    out["copy_gbps"] = 2 * size / (ms * 1e-3) / 1e9  # read + write
    return out
