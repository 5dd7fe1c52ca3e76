"""The doctor's worker process: runs every check on one device and reports each as it finishes.

Started by :func:`twinbench.harness.doctor.runner.run_doctor` through the one worker class
(:class:`~twinbench.harness.run.process.WorkerProcess`) as ``python -m twinbench.harness.doctor.worker
CONFIG``, in the environment ``worker_environment`` decides, so a device that crashes takes down this
process, not the CLI. It speaks the run worker's vocabulary: ``Begin(impl=<check>, phase="doctor")`` before
each check (a death or hang is blamed on that check), ``RecordDone(record=<check JSON>)`` after it,
``CaseDone`` when all are done; then it waits for ``Stop``.
"""

from __future__ import annotations

import faulthandler
import json
import sys
import traceback
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from twinbench.harness.run.process import (
    Begin,
    CaseDone,
    EventWriter,
    Fingerprint,
    Ready,
    RecordDone,
    die_with_parent,
    exit_worker,
    requests,
)


@dataclass(frozen=True)
class DoctorWorkerConfig:
    device: str   # the name the user typed (cuda:1); the worker sees only that device (visibility narrowed)
    backend: str
    threads: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DoctorWorkerConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _device(config: DoctorWorkerConfig):
    from twinbench.harness.core import devices

    for dev in devices.detect():
        if dev.backend == config.backend:
            return replace(dev, name=config.device)
    raise RuntimeError(f"the doctor's worker sees no {config.backend} device")


def main() -> int:
    raw = json.loads(sys.argv[1])
    config = DoctorWorkerConfig.from_json(raw)
    faulthandler.enable(file=sys.stderr, all_threads=True)
    die_with_parent()
    import torch

    if config.threads:
        torch.set_num_threads(int(config.threads))
    from twinbench.harness.core import devices
    from twinbench.harness.doctor import checks
    from twinbench.harness.store.results import json_default

    events = EventWriter(int(raw["event_fd"]), default=json_default)
    device = _device(config)
    events.send(Fingerprint(fingerprint=devices.fingerprint(device)))
    events.send(Ready())
    ctx = checks.make_context(device)
    for check in checks.CHECKS:
        events.send(Begin(impl=check.__name__, phase="doctor"))
        try:
            result = check(ctx)
        except Exception as exc:  # a check that breaks is a failed check, with its reason
            traceback.print_exc()
            result = checks.failed_check(check.__name__, f"raised {type(exc).__name__}: {exc}")
        events.send(RecordDone(record=result.to_json()))
    events.send(CaseDone())
    for _ in requests(sys.stdin):
        pass
    return 0


if __name__ == "__main__":
    exit_worker(main())
