"""Whether a kernel library can run on a device here, and why not: the one answer every impl uses.

An impl's ``available(device) -> (ok, why_not)`` must be cheap and must not raise (harness/core/registry.py),
so nothing here builds or compiles a kernel, and on the CPU nothing imports triton (``find_spec`` only): the
planner asks from the parent process, which never runs a kernel. Triton reaches the CPU only through its
interpreter (``TRITON_INTERPRET=1``, set by the CPU worker before any impl is imported, and by
tests/conftest.py): parity only, never timed (docs/method.md §5).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
from pathlib import Path

import torch

# twinbench backend -> the name of Triton's driver plugin for it (``triton.backends.backends``).
TRITON_BACKENDS = {"cuda": "nvidia", "rocm": "amd", "xpu": "intel"}
TRITON_INSTALL_HINT = "pip install 'twinbench[triton]'"


def installed(module: str) -> bool:
    """The module can be found (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing or half-imported
        return False


def torchao_available(device) -> tuple[bool, str]:
    """torchao's low-precision peers (fp8_linear, mx_linear). Cheap: found, not imported (torchao takes
    seconds to import); a broken install fails at run time, with its reason."""
    if not installed("torchao"):
        return False, "torchao not installed (pip install twinbench[lowp])"
    return True, "" if device.backend != "cpu" else "CPU: emulated"


def interpreting() -> bool:
    """Triton kernels defined from now on run through the interpreter (``@triton.jit`` reads it when a kernel
    is defined, so it must be settled before the kernel modules are imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_drivers() -> tuple[frozenset[str], str]:
    """Triton's driver plugins in this build, or why they cannot be read (a broken install)."""
    try:
        from triton.backends import backends
    except Exception as exc:  # a broken triton install is a reason, not a crash
        return frozenset(), f"triton backends unreadable: {type(exc).__name__}: {exc}"
    return frozenset(backends), ""


def triton_status(backend: str) -> tuple[bool, str]:
    """(usable, why not) for Triton kernels on a twinbench backend ('cpu', 'cuda', 'rocm', 'xpu', 'mps', ...)."""
    if not installed("triton"):
        return False, f"triton not installed ({TRITON_INSTALL_HINT})"
    if backend == "cpu":
        if not interpreting():
            return False, "Triton runs on the CPU only through its interpreter (TRITON_INTERPRET=1)"
        return True, ""
    if backend not in TRITON_BACKENDS:
        return False, f"Triton has no driver for {backend}"
    drivers, why = _triton_drivers()
    if why:
        return False, why
    if TRITON_BACKENDS[backend] not in drivers:
        return False, f"this triton build has no {TRITON_BACKENDS[backend]!r} backend for {backend}"
    return True, ""


def triton_available(device) -> tuple[bool, str]:
    """``Impl.available`` of every Triton impl (``device`` None: the CPU, as in the case-filter tests)."""
    return triton_status(getattr(device, "backend", "cpu"))


@functools.cache
def cpu_info() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():  # the end of the first processor's block
            break
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``avx512f``, ...; on aarch64 its ``Features``: ``asimd``, ...), as the kernel
    reports them."""
    info = cpu_info()
    return set((info.get("flags") or info.get("Features", "")).split())


def cpu_vendor() -> str:
    """``GenuineIntel``, ``AuthenticAMD``, ... ('' where unknown)."""
    return cpu_info().get("vendor_id", "")


def c_compiler() -> str | None:
    """The C compiler our native kernels are built with: ``$CC``, else ``cc``, else ``gcc`` (None: none)."""
    return shutil.which(os.environ.get("CC", "")) or shutil.which("cc") or shutil.which("gcc")


def torch_backend(device: torch.device) -> str:
    """The twinbench backend of a torch device (ROCm builds of torch name their GPUs "cuda")."""
    if device.type == "cuda" and torch.version.hip:
        return "rocm"
    return device.type
