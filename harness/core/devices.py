"""Find every accelerator (CUDA, ROCm/HIP, XPU, MPS) and the CPU; capabilities; fingerprints.

ROCm shares ``torch.cuda``: it is ROCm when ``torch.version.hip`` is set, and its arch is
``gcnArchName`` (METHOD.md section 4). Nothing here assumes a GPU exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

# Environment variables that change which kernels run; recorded in the fingerprint's soft part.
RELEVANT_ENV = (
    "TRITON_INTERPRET",
    "TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL",
    "FLASH_ATTENTION_TRITON_AMD_ENABLE",
    "CUDA_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
    "ZE_AFFINITY_MASK",
    "OMP_NUM_THREADS",
    "PYTORCH_CUDA_ALLOC_CONF",
    "HSA_OVERRIDE_GFX_VERSION",
)


@dataclass(frozen=True)
class Device:
    """One device a worker can run on. ``name`` is what users type (``cpu``, ``cuda:0``, ``mps``)."""

    name: str
    backend: str  # cpu | cuda | rocm | xpu | mps
    torch_device: str
    model: str
    arch: str = ""
    compute_units: int = 0
    memory_bytes: int = 0
    dtypes: tuple[str, ...] = ("fp32",)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_gpu(self) -> bool:
        return self.backend != "cpu"

    def supports_dtype(self, dtype: str) -> bool:
        return dtype in self.dtypes

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _cpu_device() -> Device:
    import torch

    dtypes = ["fp32", "fp64", "bf16", "fp16"]
    return Device(
        name="cpu",
        backend="cpu",
        torch_device="cpu",
        model=_cpu_model(),
        arch=platform.machine(),
        compute_units=os.cpu_count() or 1,
        memory_bytes=_mem_total(),
        dtypes=tuple(dtypes),
        extra={"threads": torch.get_num_threads()},
    )


def _cuda_devices() -> list[Device]:
    import torch

    if not torch.cuda.is_available():
        return []
    is_rocm = getattr(torch.version, "hip", None) is not None
    found = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        if is_rocm:
            arch = str(getattr(p, "gcnArchName", "")).split(":")[0]
        else:
            arch = f"sm_{p.major}{p.minor}"
        dtypes = ["fp32", "fp16"]
        if torch.cuda.is_bf16_supported() if not is_rocm else True:
            dtypes.append("bf16")
        dtypes.append("fp64")
        found.append(
            Device(
                name=f"cuda:{i}",
                backend="rocm" if is_rocm else "cuda",
                torch_device=f"cuda:{i}",
                model=p.name,
                arch=arch,
                compute_units=int(p.multi_processor_count),
                memory_bytes=int(p.total_memory),
                dtypes=tuple(dtypes),
                extra={
                    "capability": f"{p.major}.{p.minor}",
                    "l2_cache_bytes": int(getattr(p, "L2_cache_size", 0) or 0),
                },
            )
        )
    return found


def _xpu_devices() -> list[Device]:
    import torch

    xpu = getattr(torch, "xpu", None)
    if xpu is None or not xpu.is_available():
        return []
    found = []
    for i in range(xpu.device_count()):
        p = xpu.get_device_properties(i)
        dtypes = ["fp32", "fp16", "bf16"] + (["fp64"] if getattr(p, "has_fp64", False) else [])
        found.append(
            Device(
                name=f"xpu:{i}",
                backend="xpu",
                torch_device=f"xpu:{i}",
                model=str(getattr(p, "name", "xpu")),
                arch=str(getattr(p, "device_id", "")),
                compute_units=int(getattr(p, "gpu_eu_count", 0) or 0),
                memory_bytes=int(getattr(p, "total_memory", 0) or 0),
                dtypes=tuple(dtypes),
                extra={"driver": str(getattr(p, "driver_version", ""))},
            )
        )
    return found


def _mps_devices() -> list[Device]:
    import torch

    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        return []
    # MPS has no fp64; bf16 needs macOS 14+, which torch reports by letting the allocation succeed.
    dtypes = ["fp32", "fp16"]
    try:
        torch.zeros(1, dtype=torch.bfloat16, device="mps")
        dtypes.append("bf16")
    except Exception:
        pass
    return [Device(name="mps", backend="mps", torch_device="mps", model=platform.processor() or "Apple GPU",
                   arch=platform.machine(), memory_bytes=_mem_total(), dtypes=tuple(dtypes))]


@lru_cache(maxsize=1)
def detect() -> tuple[Device, ...]:
    """Every device in this process's view: accelerators first, the CPU last."""
    devices: list[Device] = []
    for probe in (_cuda_devices, _xpu_devices, _mps_devices):
        try:
            devices.extend(probe())
        except Exception:  # a broken driver must not hide the CPU
            continue
    devices.append(_cpu_device())
    return tuple(devices)


def find(name: str) -> Device:
    from twinbench.harness.core.errors import UsageError

    aliases = {"cuda": "cuda:0", "rocm": "cuda:0", "hip": "cuda:0", "xpu": "xpu:0", "gpu": "cuda:0"}
    wanted = aliases.get(name, name)
    for dev in detect():
        if dev.name == wanted:
            return dev
    have = ", ".join(d.name for d in detect())
    raise UsageError(f"no device {name!r} on this machine (found: {have})")


def _versions() -> dict[str, str]:
    import torch

    out = {"torch": torch.__version__, "python": platform.python_version()}
    out["cuda"] = str(torch.version.cuda or "")
    out["hip"] = str(getattr(torch.version, "hip", "") or "")
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = ""
    return out


def _nvidia_smi(index: int) -> dict[str, str]:
    """Clocks, power limit, temperature, throttle reasons, driver (soft fields); empty if unreadable."""
    fields = "driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu,clocks_throttle_reasons.active"
    try:
        text = subprocess.run(
            ["nvidia-smi", f"--id={index}", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except Exception:
        return {}
    return dict(zip(fields.split(","), (v.strip() for v in text.split(","))))


def _rocm_smi(index: int) -> dict[str, str]:
    """ROCm clocks, power cap, temperature and driver from rocm-smi's JSON (soft fields); empty if absent."""
    try:
        text = subprocess.run(["rocm-smi", "-d", str(index), "--showclocks", "--showmaxpower", "--showtemp",
                               "--showdriverversion", "--json"], capture_output=True, text=True, timeout=10,
                              check=True).stdout
        data = json.loads(text)
    except Exception:
        return {}
    out: dict[str, str] = {}
    for section in data.values():
        for key, value in section.items():
            low = key.lower()
            if "driver version" in low:
                out["driver"] = str(value)
            elif "sclk" in low or "mclk" in low or "max graphics package power" in low or "temperature" in low:
                out[key] = str(value)
    return out


def timing_mode(device: Device) -> str:
    return {
        "cuda": "cuda-events+l2-flush",
        "rocm": "hip-events+l2-flush",
        "xpu": "xpu-events",
        "mps": "mps-events",
        "cpu": "cpu-wallclock",
    }[device.backend]


def fingerprint(device: Device) -> dict[str, Any]:
    """Hard key (comparable only when equal) and soft fields (recorded, not compared)."""
    import torch

    versions = _versions()
    hard = {
        "backend": device.backend,
        "device": device.model,
        "arch": device.arch,
        "compute_units": device.compute_units,
        "memory_gb": round(device.memory_bytes / 2**30, 1),
        "torch": versions["torch"],
        "cuda": versions["cuda"] if device.backend == "cuda" else "",
        "hip": versions["hip"] if device.backend == "rocm" else "",
        "triton": versions["triton"],
        "driver": "",
        "cpu": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "timing_mode": timing_mode(device),
        # The CPU worker always runs Triton through the interpreter: say so here too, so `twinbench devices`
        # prints the same fingerprint that the run's results carry.
        "triton_interpreter": device.backend == "cpu" or os.environ.get("TRITON_INTERPRET", "0") == "1",
    }
    soft: dict[str, Any] = {
        "python": versions["python"],
        "platform": platform.platform(),
        "hostname": platform.node(),
        "env": {k: os.environ[k] for k in RELEVANT_ENV if k in os.environ},
    }
    if device.backend == "cuda":
        smi = _nvidia_smi(int(device.name.split(":")[1]))
        hard["driver"] = smi.pop("driver_version", "")
        soft.update(smi)
    elif device.backend == "rocm":
        smi = _rocm_smi(int(device.name.split(":")[1]))
        hard["driver"] = smi.pop("driver", "")
        soft.update(smi)
    soft.update({k: v for k, v in device.extra.items() if k != "threads"})
    key = hashlib.sha256(json.dumps(hard, sort_keys=True).encode()).hexdigest()[:16]
    return {"id": key, "name": device.name, "hard": hard, "soft": soft}


def fingerprint_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Hard-key fields that differ, as 'field: a != b' lines (empty when comparable)."""
    ha, hb = a.get("hard", {}), b.get("hard", {})
    return [f"{k}: {ha.get(k)!r} != {hb.get(k)!r}" for k in sorted(set(ha) | set(hb)) if ha.get(k) != hb.get(k)]
