"""Find every accelerator (CUDA, ROCm/HIP, XPU, MPS) and the CPU; capabilities; fingerprints.

ROCm shares ``torch.cuda``: it is ROCm when ``torch.version.hip`` is set, and its arch is
``gcnArchName`` (docs/method.md §5). Nothing here assumes a GPU exists.
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

# AMD's last-level cache ("Infinity Cache", MALL) per gfx arch, the largest part of each arch; torch reports only
# the L2 (docs/method.md §2: the flush must be at least twice the last-level cache). Public AMD spec sheets.
INFINITY_CACHE_BYTES = {
    "gfx908": 0,             # MI100: none, the L2 is the last level
    "gfx90a": 0,             # MI200: none
    "gfx942": 256 * 2**20,   # MI300X / MI300A / MI325X
    "gfx950": 256 * 2**20,   # MI350X / MI355X
    "gfx1030": 128 * 2**20,  # RX 6800 / 6900
    "gfx1031": 96 * 2**20,   # RX 6700 XT
    "gfx1032": 32 * 2**20,   # RX 6600
    "gfx1100": 96 * 2**20,   # RX 7900 XTX
    "gfx1101": 64 * 2**20,   # RX 7800 XT
    "gfx1102": 32 * 2**20,   # RX 7600
    "gfx1200": 32 * 2**20,   # RX 9060 XT
    "gfx1201": 64 * 2**20,   # RX 9070 XT
}

# What users may type for the first device of a kind.
ALIASES = {"cuda": "cuda:0", "rocm": "cuda:0", "hip": "cuda:0", "xpu": "xpu:0", "gpu": "cuda:0"}

# Device-name prefixes whose run workers see only their own device (process.py's worker_environment narrows
# CUDA/HIP and Level Zero visibility): inside such a worker its device is index 0.
NARROWED_IN_RUN_WORKERS = ("cuda", "xpu")

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


# Where Linux says how fresh memory is handed out. Both change what a first touch of fresh memory costs, so timings
# of cases that allocate large buffers: transparent huge pages (always / madvise / never), and a VM's free page
# reporting (virtio-balloon hands free blocks of 2^order pages back to the host, which must back them again on
# their next use: on the project's VM, order 9, fresh-buffer system time per MoE fwd+bwd ranged 22-406 ms;
# docs/method.md, "Fresh memory on a VM").
MEMORY_SETTINGS = {"transparent_hugepage": "/sys/kernel/mm/transparent_hugepage/enabled",
                   "free_page_reporting_order": "/sys/module/page_reporting/parameters/page_reporting_order"}


def memory_settings() -> dict[str, str]:
    """The settings of :data:`MEMORY_SETTINGS` this kernel exposes (the selected THP mode, e.g. "madvise"); a
    setting it does not have is left out (free page reporting: not a VM with a balloon that reports)."""
    found = {}
    for name, path in MEMORY_SETTINGS.items():
        try:
            with open(path) as fh:
                text = fh.read().strip()
        except OSError:
            continue
        selected = [word[1:-1] for word in text.split() if word.startswith("[") and word.endswith("]")]
        found[name] = selected[0] if selected else text
    return found


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


def _bf16_native(props: Any, is_rocm: bool) -> bool:
    """What ``torch.cuda.is_bf16_supported(including_emulation=False)`` decides, for the device whose properties
    these are: the call itself reads only the *current* device, and making each GPU current in turn would create
    a CUDA context on every GPU in the supervisor. Emulated bf16 (pre-sm80) is not bf16 support: kernels fall
    back to slow paths or refuse."""
    return is_rocm or int(getattr(props, "major", 0)) >= 8


def device_uuid(props: Any) -> str:
    """The device's UUID as torch reports it (``str(props.uuid)``); empty when this torch has none."""
    uuid = getattr(props, "uuid", None)
    return str(uuid) if uuid is not None else ""


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
        if _bf16_native(p, is_rocm):
            dtypes.append("bf16")
        dtypes.append("fp64")
        l2 = int(getattr(p, "L2_cache_size", 0) or 0)
        # The largest cache level: L2 on NVIDIA; on AMD the Infinity Cache where the arch has one.
        last_level = max(l2, INFINITY_CACHE_BYTES.get(arch, 0) if is_rocm else 0)
        if is_rocm and arch not in INFINITY_CACHE_BYTES:
            last_level = 0  # an AMD arch not in the table may have an Infinity Cache: unknown, not L2
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
                    "l2_cache_bytes": l2,
                    "last_level_cache_bytes": last_level,  # 0: unknown
                    "uuid": device_uuid(p),
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


def _run_text(command: list[str]) -> str:
    """A helper tool's stdout; empty when it is missing, fails or hangs (a fingerprint field is then empty)."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=10, check=True).stdout
    except Exception:
        return ""


def _apple_gpu() -> tuple[str, int]:
    """The Apple chip's name (``Apple M2 Pro``) and its GPU core count (0 when unreadable): MPS reports neither,
    and ``platform.processor()`` says only ``arm``, so different M-series chips would share a hard key."""
    chip = _run_text(["sysctl", "-n", "machdep.cpu.brand_string"]).strip()
    cores = 0
    try:
        displays = json.loads(_run_text(["system_profiler", "SPDisplaysDataType", "-json"]) or "{}")
        for gpu in displays.get("SPDisplaysDataType", []):
            cores = max(cores, int(str(gpu.get("sppci_cores", "0")).strip() or 0))
    except (ValueError, AttributeError, TypeError):
        cores = 0
    return chip, cores


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
    chip, gpu_cores = _apple_gpu()
    return [Device(name="mps", backend="mps", torch_device="mps", model=chip or platform.processor() or "Apple GPU",
                   arch=platform.machine(), compute_units=gpu_cores, memory_bytes=_mem_total(),
                   dtypes=tuple(dtypes))]


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

    wanted = ALIASES.get(name, name)
    for dev in detect():
        if dev.name == wanted:
            return dev
    have = ", ".join(d.name for d in detect())
    raise UsageError(f"no device {name!r} on this machine (found: {have})")


def reference_device_in_worker(reference: str | None, worker_device: str) -> str | None:
    """``--reference-device`` as the run worker of ``worker_device`` must name it.

    The supervisor checks the name in its own view of every device, but a run worker on a GPU sees only its
    own device, as index 0 (``worker_environment``): there ``cuda:1`` is an invalid ordinal and ``cuda:0``
    silently means the worker's own GPU. The worker's own device becomes index 0; another device of the same
    kind is not visible to that worker (UsageError, one line); other kinds (``cpu``, ``mps``, another family)
    pass unchanged.
    """
    from twinbench.harness.core.errors import UsageError

    if reference is None:
        return None
    wanted, worker = ALIASES.get(reference, reference), ALIASES.get(worker_device, worker_device)
    family, _, index = wanted.partition(":")
    worker_family, _, worker_index = worker.partition(":")
    if family != worker_family or family not in NARROWED_IN_RUN_WORKERS:
        return wanted
    if index != worker_index:
        raise UsageError(f"--reference-device {reference} is not visible to the {worker_device} worker (a GPU "
                         f"worker sees only its own device): use cpu or {worker_device}")
    return f"{family}:0"


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


def _nvidia_smi(uuid: str) -> dict[str, str]:
    """Clocks, power limit, temperature, throttle reasons, driver (soft fields) of the GPU with this UUID; empty
    if unreadable. By UUID, never by torch's index: ``nvidia-smi --id=N`` ignores CUDA_VISIBLE_DEVICES, so inside
    a narrowed worker index 0 is another physical GPU."""
    if not uuid:
        return {}
    fields = "driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu,clocks_throttle_reasons.active"
    ident = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
    text = _run_text(["nvidia-smi", f"--id={ident}", f"--query-gpu={fields}", "--format=csv,noheader,nounits"])
    values = [v.strip() for v in text.strip().split(",")]
    if len(values) != len(fields.split(",")):
        return {}
    return dict(zip(fields.split(","), values))


def _rocm_unique_ids(uuid: str) -> set[str]:
    """The forms under which rocm-smi's "Unique ID" may name the GPU whose torch UUID this is: HIP's UUID holds
    the unique ID's hex digits as ASCII bytes (``35636162-...`` is ``5cab...``); compare both, lower-case."""
    digits = uuid.removeprefix("GPU-").replace("-", "").lower()
    forms = {digits}
    try:
        forms.add(bytes.fromhex(digits).decode("ascii").lower())
    except (ValueError, UnicodeDecodeError):
        pass
    return {f.removeprefix("0x") for f in forms if f}


def _rocm_smi(uuid: str) -> dict[str, str]:
    """ROCm driver (system-wide) and the clocks, power cap and temperature (soft fields) of the card whose unique
    ID matches the device's UUID; no card fields when none matches. ``rocm-smi -d N`` numbers cards ignoring the visibility masks,
    so the card is found by ID, never by torch's index."""
    if not uuid:
        return {}
    try:
        data = json.loads(_run_text(["rocm-smi", "--showuniqueid", "--showclocks", "--showmaxpower", "--showtemp",
                                     "--showdriverversion", "--json"]) or "{}")
    except ValueError:
        return {}
    wanted = _rocm_unique_ids(uuid)
    out: dict[str, str] = {}
    for section in data.values():
        if not isinstance(section, dict):
            continue
        driver = [str(v) for k, v in section.items() if "driver version" in k.lower()]
        if driver:  # reported once, in the "system" section
            out["driver"] = driver[0]
        ident = next((str(v).lower().removeprefix("0x") for k, v in section.items() if "unique id" in k.lower()), None)
        if ident is None or ident not in wanted:
            continue
        for key, value in section.items():
            low = key.lower()
            if "sclk" in low or "mclk" in low or "max graphics package power" in low or "temperature" in low:
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
        "memory": memory_settings(),
    }
    if device.backend == "cuda":
        smi = _nvidia_smi(str(device.extra.get("uuid", "")))
        hard["driver"] = smi.pop("driver_version", "")
        soft.update(smi)
    elif device.backend == "rocm":
        smi = _rocm_smi(str(device.extra.get("uuid", "")))
        hard["driver"] = smi.pop("driver", "")
        soft.update(smi)
    soft.update({k: v for k, v in device.extra.items() if k != "threads"})
    key = hashlib.sha256(json.dumps(hard, sort_keys=True).encode()).hexdigest()[:16]
    return {"id": key, "name": device.name, "hard": hard, "soft": soft}


def fingerprint_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Hard-key fields that differ, as 'field: a != b' lines (empty when comparable)."""
    ha, hb = a.get("hard", {}), b.get("hard", {})
    return [f"{k}: {ha.get(k)!r} != {hb.get(k)!r}" for k in sorted(set(ha) | set(hb)) if ha.get(k) != hb.get(k)]


# --- low-precision formats: which a device runs natively (docs/low_precision.md, docs/method.md §5) ----------

LOWP_FORMATS = ("e4m3", "e5m2", "e4m3fnuz", "e5m2fnuz", "mxfp8", "mxfp4", "nvfp4")
# Matrix units per AMD arch, from AMD's ISA guides: MI300 (gfx942) has the FNUZ FP8 variants only; MI350
# (gfx950) the OCP ones plus MX block scaling (MXFP8/MXFP6/MXFP4); RDNA4 (gfx1200/gfx1201) OCP FP8 in WMMA.
_ROCM_LOWP = {
    "gfx942": frozenset({"e4m3fnuz", "e5m2fnuz"}),
    "gfx950": frozenset({"e4m3", "e5m2", "mxfp8", "mxfp4"}),
    "gfx1200": frozenset({"e4m3", "e5m2"}),
    "gfx1201": frozenset({"e4m3", "e5m2"}),
}
# Why a format is not native where it is not, said the same way everywhere (`twinbench list`, records).
_WHY_NOT_NATIVE = {
    "e4m3": "OCP FP8: CUDA sm89+, ROCm gfx950/gfx12",
    "e5m2": "OCP FP8: CUDA sm89+, ROCm gfx950/gfx12",
    "e4m3fnuz": "fnuz: ROCm gfx942 only",
    "e5m2fnuz": "fnuz: ROCm gfx942 only",
    "mxfp8": "MXFP8 native: sm100+, gfx950",
    "mxfp4": "MXFP4 native: sm100+, gfx950",
    "nvfp4": "NVFP4 native: sm100+",
}


@dataclass(frozen=True)
class LowpSupport:
    """Whether a device's matrix units run a low-precision format (``native``), else why not: such a format
    still runs emulated (dequantise, then an fp32 GEMM)."""

    fmt: str
    native: bool
    why_not: str = ""

    @property
    def execution(self) -> str:
        return "native" if self.native else "emulated"


def _cuda_capability(device: Device) -> tuple[int, int]:
    major, _, minor = str(device.extra.get("capability", "0.0")).partition(".")
    try:
        return int(major), int(minor or 0)
    except ValueError:
        return 0, 0


def lowp_support(device: Device, fmt: str) -> LowpSupport:
    """The device's support for one of :data:`LOWP_FORMATS` (``mxfp8`` covers both MXFP8 element formats)."""
    if fmt not in LOWP_FORMATS:
        raise ValueError(f"unknown low-precision format {fmt!r} (known: {', '.join(LOWP_FORMATS)})")
    if device.backend == "cuda":
        capability = _cuda_capability(device)
        if fmt in ("e4m3", "e5m2"):
            native = capability >= (8, 9)
        else:
            native = fmt in ("mxfp8", "mxfp4", "nvfp4") and capability >= (10, 0)
    elif device.backend == "rocm":
        native = fmt in _ROCM_LOWP.get(device.arch, frozenset())
    else:
        native = False
    why = "" if native else f"{device.backend.upper() if device.backend != 'rocm' else device.arch}: emulated " \
                            f"({_WHY_NOT_NATIVE[fmt]})"
    return LowpSupport(fmt=fmt, native=native, why_not=why)


def lowp_summary(device: Device, formats: tuple[str, ...] = LOWP_FORMATS) -> str:
    """One line for `twinbench list`: the formats the device runs natively and the rest emulated, with why."""
    supports = [lowp_support(device, f) for f in formats]
    native = [s.fmt for s in supports if s.native]
    emulated = sorted({_WHY_NOT_NATIVE[s.fmt] for s in supports if not s.native})
    parts = [f"native: {', '.join(native)}"] if native else []
    if emulated:
        where = device.arch if device.backend == "rocm" else device.backend.upper()
        parts.append(f"{where}: emulated {', '.join(s.fmt for s in supports if not s.native)} "
                     f"({'; '.join(emulated)})")
    return "; ".join(parts)
