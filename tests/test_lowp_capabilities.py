"""Which device runs which low-precision format natively, proved on fake devices (no GPU needed): the capability
table (harness/core/devices.py), the impls' availability built on it, and `twinbench list` saying so before
anything runs. Each contract check also runs on a planted wrong table, so it can fail."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from twinbench.harness.core import devices
from twinbench.harness.core.case import Case
from twinbench.harness.core.devices import Device, LowpSupport, lowp_support
from twinbench.harness.core.registry import IMPLS, load_plugins

ROOT = Path(__file__).resolve().parent.parent
load_plugins()


def fake(arch: str) -> Device:
    if arch.startswith("sm_"):
        major, minor = arch[3:-1], arch[-1]
        return Device(name="cuda:0", backend="cuda", torch_device="cuda:0", model=f"fake {arch}", arch=arch,
                      extra={"capability": f"{major}.{minor}"})
    if arch.startswith("gfx"):
        return Device(name="cuda:0", backend="rocm", torch_device="cuda:0", model=f"fake {arch}", arch=arch)
    return Device(name="cpu", backend="cpu", torch_device="cpu", model="cpu", arch="x86_64")


# Public facts (docs/low_precision.md): the formats each device's matrix units run.
NATIVE = {
    "sm_80": set(),
    "sm_89": {"e4m3", "e5m2"},
    "sm_90": {"e4m3", "e5m2"},
    "sm_100": {"e4m3", "e5m2", "mxfp8", "mxfp4", "nvfp4"},
    "gfx942": {"e4m3fnuz", "e5m2fnuz"},
    "gfx950": {"e4m3", "e5m2", "mxfp8", "mxfp4"},
    "gfx1201": {"e4m3", "e5m2"},
    "gfx1100": set(),
    "cpu": set(),
}


def table_problems(support) -> list[str]:
    problems = []
    for arch, native in NATIVE.items():
        for fmt in devices.LOWP_FORMATS:
            s = support(fake(arch), fmt)
            if s.native != (fmt in native):
                problems.append(f"{arch} {fmt}: native={s.native}")
            if not s.native and "emulated" not in s.why_not:
                problems.append(f"{arch} {fmt}: no reason given ({s.why_not!r})")
    return problems


def fnuz_everywhere_on_rocm(device: Device, fmt: str) -> LowpSupport:
    """The planted mix-up: every ROCm arch treated as MI300 (FNUZ), MI350/RDNA4's OCP FP8 lost."""
    if device.backend == "rocm" and fmt.startswith(("e4m3", "e5m2")):
        return LowpSupport(fmt, fmt.endswith("fnuz"), "" if fmt.endswith("fnuz") else "gfx: emulated")
    return lowp_support(device, fmt)


def test_capability_table_matches_the_published_facts():
    assert table_problems(lowp_support) == []
    assert table_problems(fnuz_everywhere_on_rocm)  # the check can fail


@pytest.mark.parametrize("arch,fmt,reason", [
    ("cpu", "e4m3", "CPU: emulated"), ("sm_90", "mxfp4", "MXFP4 native: sm100"), ("sm_90", "e4m3fnuz",
                                                                                   "fnuz: ROCm gfx942 only"),
    ("gfx942", "e4m3", "OCP FP8"), ("gfx1201", "nvfp4", "NVFP4 native: sm100"),
])
def test_why_not_names_where_it_is_native(arch, fmt, reason):
    assert reason in lowp_support(fake(arch), fmt).why_not


def _case(**kw) -> Case:
    base = dict(op="gemm", m=64, n=128, k=256, x_format="e4m3", w_format="e4m3", scaling="tensor", saturate=True,
                dtype="bf16", data="normal")
    return Case.of(**{**base, **kw})


@pytest.mark.parametrize("arch,case,ok,why", [
    ("sm_90", _case(), True, ""),
    ("sm_89", _case(scaling="row"), True, ""),
    ("sm_80", _case(), False, "OCP FP8: CUDA sm89+"),
    ("gfx942", _case(), False, "OCP FP8"),
    ("gfx942", _case(x_format="e4m3fnuz", w_format="e4m3fnuz"), True, ""),
    ("gfx950", _case(x_format="e4m3fnuz", w_format="e4m3fnuz"), False, "fnuz: ROCm gfx942 only"),
    ("gfx1201", _case(), True, ""),
    ("cpu", _case(x_format="e4m3fnuz", w_format="e4m3fnuz"), False, "fnuz: ROCm gfx942 only"),
    ("cpu", _case(k=200), True, ""),
    ("sm_90", _case(k=200), False, "multiples of 16"),
    ("sm_90", _case(scaling="block"), False, "block"),
])
def test_scaled_mm_runs_where_the_device_has_the_format(arch, case, ok, why):
    got, reason = IMPLS[("fp8_linear", "scaled_mm")].can_run(case, fake(arch))
    assert got == ok and why in reason


@pytest.mark.parametrize("arch,ok", [("sm_100", True), ("sm_90", False), ("gfx950", False), ("cpu", False)])
def test_block_scaled_scaled_mm_only_on_sm100(arch, ok):
    case = Case.of(op="gemm", m=64, n=128, k=256, format="mxfp4", dtype="bf16", data="normal")
    assert IMPLS[("mx_linear", "scaled_mm_blockscaled")].can_run(case, fake(arch))[0] == ok


def test_list_says_per_device_what_runs_and_why_before_anything_runs():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "400"}
    proc = subprocess.run([sys.executable, "-m", "twinbench", "list", "fp8_linear", "mx_linear", "--device", "cpu"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in ("CPU: emulated e4m3, e5m2, e4m3fnuz, e5m2fnuz", "fnuz: ROCm gfx942 only", "MXFP4 native: sm100+",
                 "block-scaled torch._scaled_mm: CUDA sm100+ only"):
        assert line in proc.stdout, line
