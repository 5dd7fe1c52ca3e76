"""Process-global torch state, kept the same for every impl a worker runs.

An impl that calls ``torch.set_num_threads(1)``, turns mkldnn off, enables deterministic algorithms, seeds
the RNG or changes the default dtype would otherwise change every later impl and case in that worker (the
fingerprint would still claim the old thread count). The worker snapshots this state before each impl call
and restores it afterwards; what an impl changed is recorded on its record (``state_changed``), so a
vendor sees that their kernel touches global state. RNG streams are restored without being reported: an
impl may legitimately draw random numbers (dropout), and drawing and seeding look the same from outside.

Interop threads can be set only once per process, before any inter-op work, so they cannot be restored:
a change is reported, never undone. See docs/method.md §6.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


@dataclass(frozen=True)
class Setting:
    """One piece of global state: how to read it and how to put a read value back (None: read-only)."""

    name: str
    read: Callable[[], Any]
    write: Callable[[Any], None] | None


def _backend_flag(prefix: str, module: Any, attr: str) -> Setting | None:
    if not hasattr(module, attr):
        return None
    return Setting(f"{prefix}.{attr}", lambda: getattr(module, attr), lambda value: setattr(module, attr, value))


def _sdp_flag(kind: str) -> Setting | None:
    read = getattr(torch.backends.cuda, f"{kind}_sdp_enabled", None)
    write = getattr(torch.backends.cuda, f"enable_{kind}_sdp", None)
    return Setting(f"cuda.{kind}_sdp", read, write) if read and write else None


def _autocast(device: str) -> list[Setting]:
    try:
        torch.is_autocast_enabled(device)
        torch.get_autocast_dtype(device)
    except (RuntimeError, TypeError, AttributeError):  # an older torch or an unknown device type
        return []
    return [Setting(f"autocast.{device}.enabled", lambda: torch.is_autocast_enabled(device),
                    lambda value: torch.set_autocast_enabled(device, value)),
            Setting(f"autocast.{device}.dtype", lambda: torch.get_autocast_dtype(device),
                    lambda value: torch.set_autocast_dtype(device, value))]


def _deterministic() -> tuple[bool, bool]:
    return torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()


def _settings() -> list[Setting]:
    found: list[Setting | None] = [
        Setting("threads", torch.get_num_threads, torch.set_num_threads),
        Setting("interop_threads", torch.get_num_interop_threads, None),
        Setting("default_dtype", torch.get_default_dtype, torch.set_default_dtype),
        Setting("default_device", lambda: str(torch.get_default_device()), torch.set_default_device),
        Setting("grad_enabled", torch.is_grad_enabled, torch.set_grad_enabled),
        Setting("anomaly_detection", torch.is_anomaly_enabled, torch.set_anomaly_enabled),
        Setting("deterministic_algorithms", _deterministic,
                lambda value: torch.use_deterministic_algorithms(value[0], warn_only=value[1])),
        Setting("float32_matmul_precision", torch.get_float32_matmul_precision,
                torch.set_float32_matmul_precision),
        _backend_flag("mkldnn", torch.backends.mkldnn, "enabled"),
        _backend_flag("cudnn", torch.backends.cudnn, "enabled"),
        _backend_flag("cudnn", torch.backends.cudnn, "benchmark"),
        _backend_flag("cudnn", torch.backends.cudnn, "deterministic"),
        _backend_flag("cudnn", torch.backends.cudnn, "allow_tf32"),
        _backend_flag("cuda.matmul", torch.backends.cuda.matmul, "allow_tf32"),
        _backend_flag("cuda.matmul", torch.backends.cuda.matmul, "allow_fp16_reduced_precision_reduction"),
        _backend_flag("cuda.matmul", torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction"),
        _backend_flag("opt_einsum", torch.backends.opt_einsum, "enabled"),
        *(_sdp_flag(kind) for kind in ("flash", "mem_efficient", "math", "cudnn")),
    ]
    for device in AUTOCAST_DEVICES:
        found.extend(_autocast(device))
    return [s for s in found if s is not None]


SETTINGS = _settings()


@dataclass
class Snapshot:
    values: dict[str, Any]
    cpu_rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None
    python_rng: Any


def capture() -> Snapshot:
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return Snapshot(values={s.name: s.read() for s in SETTINGS}, cpu_rng=torch.get_rng_state(), cuda_rng=cuda_rng,
                    python_rng=random.getstate())


def restore(before: Snapshot) -> list[str]:
    """Put ``before`` back; returns the names of the settings that had changed (RNG streams not included)."""
    changed = []
    for setting in SETTINGS:
        now = setting.read()
        if now == before.values[setting.name]:
            continue
        changed.append(setting.name)
        if setting.write is not None:
            with contextlib.suppress(RuntimeError, ValueError, TypeError):
                setting.write(before.values[setting.name])
    torch.set_rng_state(before.cpu_rng)
    if before.cuda_rng is not None:
        torch.cuda.set_rng_state_all(before.cuda_rng)
    random.setstate(before.python_rng)
    return changed


@contextlib.contextmanager
def kept(changed: set[str]) -> Iterator[None]:
    """Run the block, then restore the state it found; names of what the block changed are added to ``changed``."""
    before = capture()
    try:
        yield
    finally:
        changed.update(restore(before))
