"""Contracts with the device APIs, proved on fakes: no GPU is needed (docs/method.md §2, §5, §6).

Each contract is a check function run on the real code and on a planted wrong implementation (the behaviour
before the fix), so every test can fail: the check must reject the planted one.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import stat
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from twinbench.harness.core import devices, memory, timing
from twinbench.harness.core.devices import Device
from twinbench.harness.core.errors import UsageError
from twinbench.harness.run import process
from twinbench.harness.run.process import WorkerKind, narrowed_visibility, worker_environment

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20


def gpu(name: str = "cuda:1", backend: str = "cuda", **extra) -> Device:
    return Device(name=name, backend=backend, torch_device=name if backend != "rocm" else name, model="fake GPU",
                  arch="sm_90", dtypes=("fp32", "fp16", "bf16"), extra={"last_level_cache_bytes": 50 * MiB, **extra})


# --- a fake torch.cuda / torch.xpu with two devices: every call records which device it used ----------------


class FakeAccelerator:
    """Two devices, current device 0 (an unpinned process); streams, events, synchronize and a flush buffer."""

    def __init__(self, kind: str):
        self.kind = kind
        self.current = 0
        self.calls: list[tuple[str, int]] = []  # (what, device index)

    def _index(self, device) -> int:
        if device is None:
            return self.current
        return torch.device(device).index if not isinstance(device, int) else device

    def current_stream(self, device=None):
        return types.SimpleNamespace(device_index=self._index(device))

    def synchronize(self, device=None):
        self.calls.append(("synchronize", self._index(device)))

    def Event(self, enable_timing=False):  # noqa: N802 (torch's name)
        fake = self

        class _Event:
            def record(self, stream=None):
                stream = stream or fake.current_stream()
                fake.calls.append(("event", stream.device_index))

            def elapsed_time(self, other):
                return 0.5

        return _Event()

    def empty(self, numel, dtype=None, device=None):
        fake, index = self, self._index(device)

        class _Buffer:
            nbytes = numel * 4

            def zero_(self):
                fake.calls.append(("flush", index))

        return _Buffer()

    def torch_namespace(self):
        """What timing.py reads from ``torch``: the fake backend module and a fake ``torch.empty``."""
        return types.SimpleNamespace(device=torch.device, int32=torch.int32, empty=self.empty,
                                     **{self.kind: self})


def devices_used(fake: FakeAccelerator, timer) -> set[int]:
    """The contract: every event, synchronize and flush of a timed block is on the timer's device."""
    fake.calls.clear()
    timer.block(lambda: None, 3)
    assert {what for what, _ in fake.calls} >= {"event", "synchronize"}
    return {index for _, index in fake.calls}


class PlantedCurrentDeviceTimer(timing.CudaTimer):
    """Before the fix: events on the current device's stream, whatever device the timer serves."""

    def block(self, fn, number):
        events = [(timing.torch.cuda.Event(enable_timing=True), timing.torch.cuda.Event(enable_timing=True))
                  for _ in range(number)]
        for start, end in events:
            self.flush_buf.zero_()
            start.record()
            fn()
            end.record()
        timing.torch.cuda.synchronize()
        return 0.5


def test_cuda_timer_records_on_its_own_devices_stream_not_the_current_one(monkeypatch):
    fake = FakeAccelerator("cuda")
    monkeypatch.setattr(timing, "torch", fake.torch_namespace())
    timer = timing.CudaTimer(gpu("cuda:1"))
    assert devices_used(fake, timer) == {1}
    assert timer.flush_buf.nbytes == 2 * 50 * MiB  # twice the last-level cache the device reports
    assert timer.overhead_ms_per_call == 0.5       # the flush's own device time, measured
    assert devices_used(fake, PlantedCurrentDeviceTimer(gpu("cuda:1"))) == {0, 1}  # the check catches it


def test_xpu_timer_and_xpu_memory_name_their_device(monkeypatch):
    fake = FakeAccelerator("xpu")
    monkeypatch.setattr(timing, "torch", fake.torch_namespace())
    dev = gpu("xpu:1", backend="xpu")
    assert devices_used(fake, timing.XpuTimer(dev)) == {1}

    seen: list[tuple[str, object]] = []
    for name in ("synchronize", "reset_peak_memory_stats", "memory_allocated", "max_memory_allocated"):
        monkeypatch.setattr(torch.xpu, name, lambda device=None, n=name: seen.append((n, device)) or 0)
    memory.peak_memory(dev, lambda: None)
    assert len(seen) == 5 and {str(device) for _, device in seen} == {"xpu:1"}


def test_pinning_makes_the_workers_device_current(monkeypatch):
    pinned: list[tuple[str, int]] = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pinned.append((d.type, d.index)))
    monkeypatch.setattr(torch.xpu, "set_device", lambda d: pinned.append((d.type, d.index)))
    for name in ("cuda:1", "xpu:2", "cpu", "mps"):
        process.pin_worker_device(name)
    assert pinned == [("cuda", 1), ("xpu", 2)]


@pytest.mark.parametrize("path", ["harness/gate/worker.py", "harness/run/worker.py"])
def test_every_worker_pins_its_device_before_it_measures(path):
    """The gate worker sees every GPU and may drive a tree whose timers use the current device: it must pin."""
    main = next(n for n in ast.walk(ast.parse((ROOT / path).read_text()))
                if isinstance(n, ast.FunctionDef) and n.name == "main")
    calls = sorted((c.lineno, c.func.attr if isinstance(c.func, ast.Attribute) else getattr(c.func, "id", ""))
                   for c in ast.walk(main) if isinstance(c, ast.Call))
    names = [name for _, name in calls]
    assert "pin_worker_device" in names
    assert names.index("pin_worker_device") < names.index("fingerprint")


# --- device visibility: the worker's one device is the parent's device, whatever masks the user set -----------


def rocm_physical(env: dict[str, str], n_physical: int = 8) -> list[int]:
    """ROCm's rule: ROCR_VISIBLE_DEVICES filters the physical list first; HIP_VISIBLE_DEVICES (else
    CUDA_VISIBLE_DEVICES) then indexes into what is left."""
    listed = list(range(n_physical))
    if "ROCR_VISIBLE_DEVICES" in env:
        listed = [listed[int(i)] for i in env["ROCR_VISIBLE_DEVICES"].split(",")]
    mask = env.get("HIP_VISIBLE_DEVICES", env.get("CUDA_VISIBLE_DEVICES"))
    return listed if mask is None else [listed[int(i)] for i in mask.split(",")]


def cuda_physical(env: dict[str, str], n_physical: int = 8) -> list[int]:
    mask = env.get("CUDA_VISIBLE_DEVICES")
    return list(range(n_physical)) if mask is None else [int(i) for i in mask.split(",")]


USER_MASKS = [
    {}, {"CUDA_VISIBLE_DEVICES": "4,6"}, {"HIP_VISIBLE_DEVICES": "5,2"}, {"ROCR_VISIBLE_DEVICES": "1,3,7"},
    {"HIP_VISIBLE_DEVICES": "3,0", "CUDA_VISIBLE_DEVICES": "6,7"},
    {"ROCR_VISIBLE_DEVICES": "2,4,6", "HIP_VISIBLE_DEVICES": "2,1"},
    {"ROCR_VISIBLE_DEVICES": "2,4,6", "CUDA_VISIBLE_DEVICES": "1,2"},
    {"ROCR_VISIBLE_DEVICES": "7,5,3", "HIP_VISIBLE_DEVICES": "1,2", "CUDA_VISIBLE_DEVICES": "0,1"},
]


def worker_sees_parents_device(policy, backend: str, physical) -> list[str]:
    """Every (user masks, device index) where the worker would land on another physical GPU than the parent's."""
    wrong = []
    for user in USER_MASKS:
        parent = physical(user)
        for index in range(len(parent)):
            env = dict(user)
            for var, value in policy(backend, index, env).items():
                env.pop(var, None) if value is None else env.__setitem__(var, value)
            if physical(env) != [parent[index]]:
                wrong.append(f"{user} index {index}: worker sees {physical(env)}, parent meant {parent[index]}")
    return wrong


def planted_hip_only_policy(backend: str, index: int, env) -> dict[str, str | None]:
    """Before the fix: HIP_VISIBLE_DEVICES indexed on its own, a user's CUDA_VISIBLE_DEVICES ignored."""
    var = process.VISIBILITY_VARIABLES[backend]
    visible = [v for v in env.get(var, "").split(",") if v.strip()]
    return {var: visible[index] if visible and index < len(visible) else str(index)}


def test_rocm_worker_lands_on_the_parents_gpu_for_every_mask_combination():
    assert worker_sees_parents_device(narrowed_visibility, "rocm", rocm_physical) == []
    assert worker_sees_parents_device(planted_hip_only_policy, "rocm", rocm_physical)  # the check catches it


def test_cuda_worker_lands_on_the_parents_gpu():
    assert worker_sees_parents_device(narrowed_visibility, "cuda", cuda_physical) == []


@pytest.mark.parametrize(("backend", "base", "device", "expected"), [
    ("cuda", {"CUDA_VISIBLE_DEVICES": "GPU-aa,GPU-bb"}, "cuda:1", {"CUDA_VISIBLE_DEVICES": "GPU-bb"}),
    ("cuda", {"HIP_VISIBLE_DEVICES": "3"}, "cuda:0", {"CUDA_VISIBLE_DEVICES": "0", "HIP_VISIBLE_DEVICES": "3"}),
    ("rocm", {"CUDA_VISIBLE_DEVICES": "4,6"}, "cuda:1", {"HIP_VISIBLE_DEVICES": "6"}),
    ("rocm", {"ROCR_VISIBLE_DEVICES": "GPU-x,GPU-y"}, "cuda:1",
     {"ROCR_VISIBLE_DEVICES": "GPU-x,GPU-y", "HIP_VISIBLE_DEVICES": "1"}),
    ("xpu", {"ZE_AFFINITY_MASK": "0.1,1"}, "xpu:1", {"ZE_AFFINITY_MASK": "1"}),
])
def test_worker_environment_composes_masks(backend, base, device, expected):
    env = worker_environment(WorkerKind.RUN, backend, device, root=ROOT, head_root=ROOT, base=base).env
    names = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "ZE_AFFINITY_MASK")
    assert {k: env[k] for k in names if k in env} == expected
    gate = worker_environment(WorkerKind.GATE, backend, device, root=ROOT, head_root=ROOT, base=base).env
    assert {k: gate[k] for k in names if k in gate} == base  # gate workers are pinned, not narrowed


def test_an_index_outside_the_mask_is_refused():
    with pytest.raises(ValueError, match="not in CUDA_VISIBLE_DEVICES"):
        narrowed_visibility("cuda", 2, {"CUDA_VISIBLE_DEVICES": "4,6"})


# --- --reference-device in the worker's numbering -------------------------------------------------------------


@pytest.mark.parametrize(("reference", "worker", "expected"), [
    ("cuda:1", "cuda:1", "cuda:0"), ("cuda", "cuda:0", "cuda:0"), ("rocm", "cuda:0", "cuda:0"),
    ("cpu", "cuda:1", "cpu"), ("cuda:1", "cpu", "cuda:1"), ("xpu:2", "xpu:2", "xpu:0"),
    ("xpu:0", "cuda:1", "xpu:0"), ("mps", "mps", "mps"), (None, "cuda:1", None),
])
def test_reference_device_is_translated_into_the_workers_numbering(reference, worker, expected):
    assert devices.reference_device_in_worker(reference, worker) == expected


def test_a_reference_device_the_worker_cannot_see_is_refused_in_one_line():
    with pytest.raises(UsageError) as err:
        devices.reference_device_in_worker("cuda:0", "cuda:1")
    assert "not visible to the cuda:1 worker" in str(err.value) and "\n" not in str(err.value)


def test_every_narrowed_backend_is_translated():
    """devices.NARROWED_IN_RUN_WORKERS must follow process.worker_environment's narrowing."""
    family = {"cuda": "cuda", "rocm": "cuda", "xpu": "xpu"}
    assert {family[b] for b in process.VISIBILITY_VARIABLES} == set(devices.NARROWED_IN_RUN_WORKERS)


def test_run_refuses_an_invisible_reference_device_before_writing(tmp_path, monkeypatch):
    from twinbench.harness.run import runner
    from twinbench.harness.run.plan import RunOptions

    fake = (gpu("cuda:0"), gpu("cuda:1"), Device(name="cpu", backend="cpu", torch_device="cpu", model="cpu"))
    monkeypatch.setattr(devices, "detect", lambda: fake)
    monkeypatch.setattr(runner, "plan_tasks", lambda options: [])
    monkeypatch.setattr(runner, "check_dtypes", lambda planned, found: None)
    out = tmp_path / "run"
    options = RunOptions(suites=["attention"], devices=["cuda:1"], reference_device="cuda:0", out=out)
    with pytest.raises(UsageError, match="not visible to the cuda:1 worker"):
        runner.run(options)
    assert not out.exists()


# --- nvidia-smi / rocm-smi: the GPU is named by UUID, never by torch's (masked) index ------------------------


def fake_tool(folder: Path, name: str, script: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env python3\nimport sys, os\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_nvidia_smi_is_queried_by_uuid(tmp_path, monkeypatch):
    log = tmp_path / "args.txt"
    fake_tool(tmp_path, "nvidia-smi", f"""
open({str(log)!r}, "a").write(" ".join(sys.argv[1:]) + "\\n")
by_id = {{"--id=GPU-1111": "550.1, 1980, 1980, 700, 40, 0x0", "--id=0": "550.1, 345, 1980, 700, 80, 0x40",
         "--id=1": "550.1, 345, 1980, 700, 80, 0x40"}}
key = next(a for a in sys.argv if a.startswith("--id="))
print(by_id[key]) if key in by_id else sys.exit(6)
""")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    fp = devices.fingerprint(gpu("cuda:1", uuid="1111"))
    assert fp["hard"]["driver"] == "550.1" and fp["soft"]["clocks.sm"] == "1980"
    assert "--id=GPU-1111" in log.read_text()
    log.unlink()
    assert devices._nvidia_smi("") == {} and not log.exists()  # no UUID: nothing, never a guess by index


def test_rocm_smi_card_is_matched_by_unique_id(tmp_path, monkeypatch):
    report = {"card0": {"Unique ID": "0xaaaa000000000001", "sclk clock level": "(100Mhz)",
                        "Temperature (Sensor edge) (C)": "90.0"},
              "card1": {"Unique ID": "0x5caba7916cc92c49", "sclk clock level": "(2100Mhz)",
                        "Temperature (Sensor edge) (C)": "45.0"},
              "system": {"Driver version": "6.8.5"}}
    fake_tool(tmp_path, "rocm-smi", f"print({json.dumps(json.dumps(report))})\n")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    ascii_uuid = "35636162-6137-3931-3663-633932633439"  # HIP's UUID: the unique ID's digits as ASCII bytes
    for uuid in (ascii_uuid, "5caba7916cc92c49"):
        got = devices._rocm_smi(uuid)
        assert got == {"driver": "6.8.5", "sclk clock level": "(2100Mhz)", "Temperature (Sensor edge) (C)": "45.0"}
    assert devices._rocm_smi("ffff0000-0000-0000-0000-000000000000") == {"driver": "6.8.5"}  # no card guessed


# --- detection: bf16 of the device in question, caches, Apple chips -------------------------------------------


def fake_cuda_devices(monkeypatch, props: list, hip: str | None = None) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(props))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # emulation counts
    monkeypatch.setattr(torch.version, "hip", hip)


def props(major: int, arch: str = "", l2: int = 0, uuid: str = "") -> types.SimpleNamespace:
    return types.SimpleNamespace(name="fake", major=major, minor=0, multi_processor_count=80, total_memory=2**34,
                                 L2_cache_size=l2, gcnArchName=arch, uuid=uuid)


def test_bf16_is_decided_per_device_without_emulation(monkeypatch):
    fake_cuda_devices(monkeypatch, [props(7, l2=6 * MiB, uuid="a"), props(9, l2=50 * MiB, uuid="b")])
    volta, hopper = devices._cuda_devices()
    assert not volta.supports_dtype("bf16") and hopper.supports_dtype("bf16")
    assert (volta.extra["uuid"], hopper.extra["uuid"]) == ("a", "b")
    assert timing.flush_bytes(hopper) == 100 * MiB


@pytest.mark.parametrize(("arch", "l2", "flush"), [
    ("gfx942:sramecc+:xnack-", 4 * MiB, 512 * MiB),  # MI300X: twice the 256 MiB Infinity Cache
    ("gfx1201", 8 * MiB, 128 * MiB),                  # RDNA4: twice 64 MiB
    ("gfx90a", 8 * MiB, 16 * MiB),                    # MI200: no Infinity Cache, twice the L2
    ("gfx1151", 2 * MiB, timing.UNKNOWN_CACHE_FLUSH_BYTES),  # not in the table: unknown, never just L2
])
def test_rocm_flush_covers_the_infinity_cache(monkeypatch, arch, l2, flush):
    fake_cuda_devices(monkeypatch, [props(9, arch=arch, l2=l2)], hip="6.2")
    (dev,) = devices._cuda_devices()
    assert timing.flush_bytes(dev) == flush and dev.supports_dtype("bf16")


def test_mps_fingerprint_names_the_chip_and_its_gpu_cores(tmp_path, monkeypatch):
    fake_tool(tmp_path, "sysctl", "print('Apple M2 Pro')\n")
    fake_tool(tmp_path, "system_profiler", "print('{\"SPDisplaysDataType\": [{\"sppci_cores\": \"19\"}]}')\n")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    (dev,) = devices._mps_devices()
    assert (dev.model, dev.compute_units) == ("Apple M2 Pro", 19)


def test_mps_peak_memory_counts_live_tensors(monkeypatch):
    monkeypatch.setattr(torch.mps, "synchronize", lambda: None)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 0, raising=False)  # what MPS reads: ~0
    mps = Device(name="mps", backend="mps", torch_device="mps", model="Apple M2 Pro")

    def call():
        a = torch.ones(1024, 256)  # 1 MiB alive while b is made
        b = a * 2
        return b.sum()

    got = memory.peak_memory(mps, call)
    assert got["method"] == memory.TensorPeak.METHOD and got["peak_bytes"] >= 2 * MiB


# --- availability -------------------------------------------------------------------------------------------


def test_flash_attn_on_rocm_only_on_its_archs(monkeypatch):
    from twinbench.impls.attention import flash_attn_peer

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn"
                        else real(name, *a))
    monkeypatch.delenv(flash_attn_peer.TRITON_AMD_VARIABLE, raising=False)

    def rocm(arch):
        return Device(name="cuda:0", backend="rocm", torch_device="cuda:0", model="AMD", arch=arch)

    assert flash_attn_peer._available(rocm("gfx942")) == (True, "")
    ok, why = flash_attn_peer._available(rocm("gfx1201"))
    assert not ok and "gfx1201" in why
    monkeypatch.setenv(flash_attn_peer.TRITON_AMD_VARIABLE, "TRUE")
    assert flash_attn_peer._available(rocm("gfx1201")) == (True, "")


# --- numbers that mislead -------------------------------------------------------------------------------------


class FixedTimer(timing.Timer):
    """1 ms per call, without running anything; ``overhead_ms_per_call`` device time outside the samples."""

    def __init__(self, overhead_ms: float):
        super().__init__(Device(name="cpu", backend="cpu", torch_device="cpu", model="cpu"))
        self.overhead_ms_per_call = overhead_ms

    def block(self, fn, number):
        return 1.0


def test_flush_time_counts_in_the_budget():
    plan = timing.TimingPlan(rounds=11, min_rounds=7, block_ms=10.0, warmup_ms=3.0, budget_s=1.0)
    fns = {"ref": lambda: None, "opt": lambda: None}

    def rounds(timer):
        return len(timing.interleaved(timer, fns, plan)["ref"]["samples_ms"])

    # 10 calls x (1 + 9) ms x 2 impls = 0.2 s a round: min_rounds 7, rounded up to an even count (two-round blocks)
    assert rounds(FixedTimer(overhead_ms=9.0)) == 8
    assert rounds(FixedTimer(overhead_ms=0.0)) == 12  # a flush left out of the budget would run all 11 (+1)


class OrderTimer(FixedTimer):
    """1 ms per call, 1.3 ms when the block runs right after another kernel's block (its caches evicted)."""

    def __init__(self):
        super().__init__(0.0)
        self.last = None

    def block(self, fn, number):
        slow = self.last is not None and self.last is not fn
        self.last = fn
        return 1.3 if slow else 1.0


def test_an_order_effect_cancels_in_the_runs_speedup():
    """Two identical kernels, the one timed second in a round 30% slower: the speedup, taken over two-round
    blocks (opposite orders), is exactly 1. Per-round ratios alternate 1.3 / 0.77, so their median is off
    (by the whole effect over an odd number of rounds: the statistic before 2026-12-06)."""
    plan = timing.TimingPlan(rounds=11, min_rounds=7, block_ms=10.0, warmup_ms=3.0, budget_s=100.0)
    fns = {"ref": lambda: None, "opt": lambda: None}
    stats = timing.interleaved(OrderTimer(), fns, plan)
    ref, opt = stats["ref"]["samples_ms"], stats["opt"]["samples_ms"]
    assert len(ref) == 12
    blocks = timing.round_ratios(ref, opt)
    # the first round's first sample follows the other kernel's warm-up, so the first block is off; no other
    assert len(blocks) == 6 and blocks[1:] == pytest.approx([1.0] * 5) and float(np.median(blocks)) == pytest.approx(1.0)
    per_round = [r / o for r, o in zip(ref, opt)]
    assert sorted({round(x, 3) for x in per_round[1:]}) == [0.769, 1.3]
    assert abs(float(np.median(per_round[1:])) - 1.0) > 0.2  # 11 rounds, per round: a whole effect off



def test_an_unmeasured_sample_leaves_out_only_its_block():
    """A zero sample (a coarse clock) cannot form an order-balanced block: that block is dropped, the others
    stay two-round blocks (not per-round ratios, which carry the order effect)."""
    ref = [1.3, 1.0, 1.3, 1.0, 1.3, 1.0]  # per-round ratios alternate 1.3 and 1/1.3
    opt = [1.0, 1.3, 0.0, 1.3, 1.0, 1.3]
    blocks = timing.round_ratios(ref, opt)
    assert len(blocks) == 2 and blocks == pytest.approx([1.0, 1.0])

def test_share_of_peak_is_clipped_and_flagged():
    assert timing.share_of_peak(150.0, 100.0) == timing.PeakShare(100.0, True)
    assert timing.share_of_peak(50.0, 100.0) == timing.PeakShare(50.0, False)
    assert timing.share_of_peak(50.0, None) == timing.PeakShare(None, False)


class SizeAwareTimer(timing.Timer):
    """Fake device whose matmul runs at 0.03 TFLOP/s at 512 and 0.05 at 1024: one size would under-measure it."""

    def block(self, fn, number):
        out = fn()
        if out.dim() == 2:
            n = out.shape[0]
            return 2 * n**3 / ({512: 0.03, 1024: 0.05}[n] * 1e12) * 1e3
        return 30.0


def test_matmul_ceiling_is_the_best_of_several_sizes(monkeypatch):
    cpu = Device(name="cpu", backend="cpu", torch_device="cpu", model="cpu", dtypes=("fp32",))
    monkeypatch.setattr(timing, "timer_for", SizeAwareTimer)
    got = timing.measure_ceilings(cpu, dtypes=("fp32",))
    assert got["matmul_n"] == {"fp32": 1024} and got["matmul_tflops"]["fp32"] == pytest.approx(0.05)


def test_the_fingerprint_records_how_fresh_memory_is_handed_out(monkeypatch, tmp_path):
    """The selected THP mode and a VM's free page reporting order go into the soft fingerprint (recorded, not
    compared: the hard key, and so which baselines compare, does not move); a setting the kernel lacks is left out."""
    thp, reporting = tmp_path / "enabled", tmp_path / "page_reporting_order"
    thp.write_text("always [madvise] never\n")
    reporting.write_text("9\n")
    monkeypatch.setattr(devices, "MEMORY_SETTINGS", {"transparent_hugepage": str(thp),
                                                     "free_page_reporting_order": str(reporting)})
    assert devices.memory_settings() == {"transparent_hugepage": "madvise", "free_page_reporting_order": "9"}
    cpu = devices.find("cpu")
    with_reporting = devices.fingerprint(cpu)
    assert with_reporting["soft"]["memory"] == {"transparent_hugepage": "madvise", "free_page_reporting_order": "9"}
    reporting.unlink()
    thp.write_text("[always] madvise never\n")
    without = devices.fingerprint(cpu)
    assert without["soft"]["memory"] == {"transparent_hugepage": "always"}
    assert without["id"] == with_reporting["id"]
