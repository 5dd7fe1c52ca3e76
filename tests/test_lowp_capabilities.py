"""Which device runs which low-precision format natively, proved on fake devices (no GPU needed): the capability
table (harness/core/devices.py), the impls' availability built on it, and `twinbench list` saying so before
anything runs. Each contract check also runs on a planted wrong table, so it can fail."""

from __future__ import annotations

from dataclasses import replace

import pytest
from twinbench.harness.core import devices
from twinbench.harness.core.case import Case
from twinbench.harness.core.devices import Device, LowpSupport, lowp_support
from twinbench.harness.core.registry import IMPLS, impls_for, load_plugins

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
    ("sm_90", _case(scaling="block", k=512), True, ""),
    ("sm_90", _case(scaling="block", k=512, x_format="e5m2"), True, ""),  # the backward GEMM
    ("sm_100", _case(scaling="block", k=512), False, "sm90 only"),
    ("sm_89", _case(scaling="block", k=512), False, "sm90 only"),
    ("gfx942", _case(scaling="block", k=512, x_format="e4m3fnuz", w_format="e4m3fnuz"), False, "not on rocm"),
    ("cpu", _case(scaling="block", k=512), False, "CUDA sm90 only"),
    ("sm_90", _case(scaling="block", k=512, dtype="fp32"), False, "bf16 output"),
    ("sm_90", _case(scaling="block", k=256), False, "16-byte aligned"),
    ("sm_90", _case(scaling="block", k=512, m=30), False, "16-byte aligned"),
])
def test_scaled_mm_runs_where_the_device_has_the_format(arch, case, ok, why, monkeypatch):
    monkeypatch.setattr("torch.version.cuda", "12.9")
    got, reason = IMPLS[("fp8_linear", "scaled_mm")].can_run(case, fake(arch))
    assert got == ok and why in reason


def test_block_scaled_mm_needs_a_cuda_12_9_build(monkeypatch):
    monkeypatch.setattr("torch.version.cuda", "12.8")
    got, reason = IMPLS[("fp8_linear", "scaled_mm")].can_run(_case(scaling="block", k=512), fake("sm_90"))
    assert not got and "CUDA 12.9+" in reason


def _scale_layout_problems(a, b, scale_a, scale_b) -> list[str]:
    """torch 2.13's ScaledBlas.cpp rules for (BlockWise1x128, BlockWise128x128), transcribed: scale_a (M,
    ceil(K/128)) outer-dim major (strides (1, M)); scale_b.t() (ceil(N/128), ceil(K/128)) row-major."""
    m, k = a.shape
    n = b.shape[1]
    kb, nb = -(-k // 128), -(-n // 128)
    problems = []
    if tuple(scale_a.shape) != (m, kb) or (m > 1 and scale_a.stride(0) != 1) or (kb > 1 and scale_a.stride(1) != m):
        problems.append(f"scale_a {tuple(scale_a.shape)} strides {scale_a.stride()}")
    sbt = scale_b.t()
    if tuple(sbt.shape) != (nb, kb) or (nb > 1 and sbt.stride(0) != kb) or (kb > 1 and sbt.stride(1) != 1):
        problems.append(f"scale_b.t() {tuple(sbt.shape)} strides {sbt.stride()}")
    if a.stride(1) != 1 or b.stride(0) != 1:
        problems.append("a must be row-major and b column-major")
    return problems


def test_block_scaled_mm_passes_scales_in_the_layout_torch_checks(monkeypatch):
    """The impl's block-scale arguments on meta tensors: torch's meta kernel checks their shapes, the
    transcription above their strides (torch's meta kernel does not). Unverified on sm90 hardware here."""
    import torch
    from twinbench.suites.fp8_linear import SUITE

    seen = []
    real = torch._scaled_mm

    def spy(a, b, *, scale_a, scale_b, out_dtype):
        seen.append(_scale_layout_problems(a, b, scale_a, scale_b))
        return real(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    case = Case.of(op="gemm", m=8, n=256, k=512, x_format="e4m3", w_format="e4m3", scaling="block", saturate=True,
                   dtype="bf16", data="normal")
    inputs = SUITE.make_inputs(case, "cpu", 0)
    meta = {n: t.to("meta") for n, t in inputs.tensors.items()}
    out = IMPLS[("fp8_linear", "scaled_mm")].fn(**meta, **inputs.static)["out"]
    assert tuple(out.shape) == (8, 256) and out.dtype == torch.bfloat16 and seen == [[]]
    # the check can fail: w's scales passed untransposed are refused by torch's meta kernel
    with pytest.raises(RuntimeError, match="Invalid scaling configuration"):
        real(meta["x_codes"].view(torch.float8_e4m3fn), meta["w_codes"].view(torch.float8_e4m3fn).t(),
             scale_a=meta["x_scale"], scale_b=meta["w_scale"], out_dtype=torch.bfloat16)
    x_rowmajor = torch.empty(64, 4)
    assert _scale_layout_problems(torch.empty(64, 512), torch.empty(256, 512).t(), x_rowmajor,
                                  torch.empty(2, 4).t())  # row-major 1x128 scales: wrong strides


@pytest.mark.parametrize("arch,ok", [("sm_100", True), ("sm_90", False), ("gfx950", False), ("cpu", False)])
def test_block_scaled_scaled_mm_only_on_sm100(arch, ok):
    case = Case.of(op="gemm", m=64, n=128, k=256, format="mxfp4", dtype="bf16", data="normal")
    assert IMPLS[("mx_linear", "scaled_mm_blockscaled")].can_run(case, fake(arch))[0] == ok


def test_list_says_per_device_what_runs_and_why_before_anything_runs(monkeypatch, capsys):
    """`twinbench list` on fake sm90 / gfx942 / gfx950 devices and the CPU; the probes run in-process here (the
    worker that runs them for real is tested in tests/test_cli.py)."""
    from rich.console import Console
    from twinbench.harness.cli import console
    from twinbench.harness.cli.main import main
    from twinbench.harness.run import supervisor

    fakes = tuple(replace(fake(arch), name=name) for arch, name in
                  (("sm_90", "cuda:0"), ("gfx942", "cuda:1"), ("gfx950", "cuda:2"), ("cpu", "cpu")))
    monkeypatch.setattr(devices, "detect", lambda: fakes)
    monkeypatch.setattr(console, "make_console", lambda: Console(width=2000))
    monkeypatch.setattr(supervisor, "probe_impls", lambda dev, suites, plugins, timeout: {
        (s, i.name): i.can_run(None, dev) for s in suites for i in impls_for(s)})
    assert main(["list", "fp8_linear", "mx_linear"]) == 0
    rows = {line.split("│")[2].strip() + "@" + line.split("│")[1].strip(): [c.strip() for c in line.split("│")[4:-1]]
            for line in capsys.readouterr().out.splitlines() if line.count("│") >= 6}
    sm90, gfx942, gfx950, cpu = rows["reference@fp8_linear"]
    assert sm90.startswith("yes (native: e4m3, e5m2;") and "fnuz: ROCm gfx942 only" in sm90
    assert gfx942.startswith("yes (native: e4m3fnuz, e5m2fnuz;") and "OCP FP8" in gfx942
    assert "CPU: emulated e4m3, e5m2, e4m3fnuz, e5m2fnuz" in cpu
    assert "native: mxfp8, mxfp4" in rows["reference@mx_linear"][2]
    assert rows["scaled_mm_blockscaled@mx_linear"][0].startswith("no: ") and "MXFP4 native: sm100+" in \
        rows["scaled_mm_blockscaled@mx_linear"][0]
    assert rows["scaled_mm@fp8_linear"][3].startswith("yes (CPU: emulated")
