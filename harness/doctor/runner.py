"""The doctor's supervisor side: one worker process per device, its checks collected as they come.

A worker that dies or hangs during a check fails that check with the reason the process gives (signal,
exit code, log tail: docs/method.md §6); the checks it never reached are failed as "not reached", so the
report always lists every check of every device.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twinbench.harness import SOURCE_ROOT
from twinbench.harness.core.devices import Device
from twinbench.harness.run.process import (
    Begin,
    CaseDone,
    Fingerprint,
    Ready,
    RecordDone,
    WorkerFailed,
    WorkerKind,
    WorkerProcess,
    worker_environment,
)

# Every check's name, in the worker's order. Listed here (not imported from checks.py) so the supervisor
# does not import torch-heavy check code; tests/test_doctor.py asserts the two agree.
CHECK_NAMES = ("clock_state", "timer_resolution", "timer_linearity", "events_vs_wall", "l2_flush",
               "dtype_support", "ceilings", "parity_self_test", "clock_drift")
# Seconds one check may stay silent: the ceilings and the parity self-test are the slow ones (tens of
# seconds on a loaded 2-core CPU); a GPU that hangs a kernel is killed after this.
CHECK_TIMEOUT_S = 300.0


@dataclass
class DeviceReport:
    device: str
    backend: str
    fingerprint: dict[str, Any] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    log: str = ""

    @property
    def failed(self) -> bool:
        return any(c["status"] == "fail" for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "backend": self.backend, "fingerprint": self.fingerprint,
                "ok": not self.failed, "log": self.log, "checks": self.checks}


def _not_completed(name: str, reason: str) -> dict[str, Any]:
    return {"name": name, "status": "fail", "measured": {"error": reason[:500]}, "expected": "the check completes",
            "why": reason[:500]}


def run_doctor(device: Device, out: Path, *, threads: int | None = None, triton_interpret: bool = False,
               timeout: float = CHECK_TIMEOUT_S) -> DeviceReport:
    """Every check on ``device`` in a fresh worker; the log goes to ``out/doctor-<device>.log``."""
    setup = worker_environment(WorkerKind.RUN, device.backend, device.name, root=SOURCE_ROOT,
                               head_root=SOURCE_ROOT, threads=threads, triton_interpret=triton_interpret)
    log_path = out / f"doctor-{device.name.replace(':', '')}.log"
    report = DeviceReport(device=device.name, backend=device.backend, log=log_path.name)
    config = {"device": device.name, "backend": device.backend, "threads": setup.threads}
    worker = WorkerProcess([sys.executable, "-m", "twinbench.harness.doctor.worker"], config, cwd=SOURCE_ROOT,
                           env=setup.env, log_path=log_path, label="doctor worker")
    current = "start"
    try:
        while True:
            event = worker.next_event(timeout)
            if isinstance(event, Fingerprint):
                report.fingerprint = event.fingerprint
            elif isinstance(event, Begin):
                current = event.impl
            elif isinstance(event, RecordDone):
                report.checks.append(event.record)
            elif isinstance(event, CaseDone):
                break
            elif not isinstance(event, Ready):
                raise WorkerFailed(f"unexpected event {event.TYPE!r}")
    except WorkerFailed as exc:
        done = {c["name"] for c in report.checks}
        for name in CHECK_NAMES:
            if name not in done:
                reason = str(exc) if name == current or current == "start" else f"not reached: {current} failed"
                report.checks.append(_not_completed(name, reason))
    finally:
        worker.stop(grace=10.0)
    return report
