"""`twinbench run`: suites x devices x cases x impls, one isolated worker process per device.

A worker that segfaults, aborts, hangs past ``timeout`` or is killed for memory takes only the impl it
was running with it (:mod:`.supervisor`). Every finished record is appended (fsync'd) to ``journal.jsonl``
(:mod:`.journal`), so ``--resume`` finishes an interrupted run without redoing what is recorded.

One run at a time per folder: the folder is locked (``flock`` on the folder itself, so nothing is written
for it), and a second run into it is a usage error. On every way out (finished, error, Ctrl-C, SIGTERM)
the run's workers and everything they started are killed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from twinbench.harness.core import devices as devices_mod
from twinbench.harness.core import registry
from twinbench.harness.core.errors import UsageError
from twinbench.harness.run.journal import Journal, assemble, finished_keys
from twinbench.harness.run.plan import RunOptions, Task, check_dtypes, plan_tasks
from twinbench.harness.run.supervisor import DeviceRun, Progress
from twinbench.harness.store.record import FAILED
from twinbench.harness.store.results import provenance


def run(options: RunOptions, on_device_done: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the selection; returns the results document (also written to ``options.out/results.json``)."""
    registry.load_plugins(options.plugins)
    planned = plan_tasks(options)
    devices = [devices_mod.find(d) for d in options.devices] if options.devices else list(devices_mod.detect())
    if options.reference_device:
        devices_mod.find(options.reference_device)
        for dev in devices:  # as each device's worker will see it (GPU workers see only their own device)
            devices_mod.reference_device_in_worker(options.reference_device, dev.name)
    check_dtypes(planned, devices)
    with run_folder(options) as journal:
        return _run_locked(options, planned, devices, journal)


@contextlib.contextmanager
def run_folder(options: RunOptions) -> Iterator[Journal]:
    """The run's journal in ``options.out``, locked for this run and with SIGTERM unwinding like Ctrl-C;
    a folder that holds another run's journal is a usage error unless ``--resume``."""
    out = options.out
    journal = Journal(out / "journal.jsonl")
    if journal.path.exists() and not options.resume:
        raise UsageError(f"{out} already holds a run (journal.jsonl); pass --resume to finish it or choose "
                         f"another --out")
    out.mkdir(parents=True, exist_ok=True)
    with locked_folder(out), sigterm_ends_run():
        if journal.path.exists() and not options.resume:  # another run finished there while we waited to lock
            raise UsageError(f"{out} already holds a run (journal.jsonl); pass --resume to finish it or choose "
                             f"another --out")
        yield journal


def _run_locked(options: RunOptions, planned, devices, journal: Journal) -> dict[str, Any]:
    out = options.out
    previous = journal.read()
    prov = next((e["provenance"] for e in previous if e.get("type") == "start"), None)
    if prov is None:
        prov = provenance()
        journal.append({"type": "start", "provenance": prov})
    done = finished_keys(previous)
    cached_ceilings = {e["device"]: e["ceilings"] for e in previous if e.get("type") == "ceilings"}

    runs = []
    total = 0
    reference = {suite.name: suite.reference for suite, _ in planned}
    for dev in devices:
        tasks = pending_tasks(planned, dev.name, done)
        total += len(tasks)
        runs.append(DeviceRun(dev, tasks, options, journal, None, cached_ceilings.get(dev.name), reference))
    progress = Progress(total)
    for r in runs:
        r.progress = progress
    try:
        gpu_runs = [r for r in runs if r.device.is_gpu]
        threads = [threading.Thread(target=r.run, daemon=True) for r in gpu_runs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in runs:  # the CPU last and alone: GPU workers' host threads would disturb its timings
            if not r.device.is_gpu:
                r.run()
    except BaseException:  # Ctrl-C reaches this thread only: the device threads' workers are killed here
        for r in runs:
            r.cancel()
        raise
    finally:
        progress.close()
    return assemble(out, journal, prov)


def pending_tasks(planned, device: str, done: set[tuple]) -> list[Task]:
    """The tasks still to run on ``device``: impls without a record in ``done`` (record keys), with the
    reference kept whenever another impl of the case runs (it is what they are judged against)."""
    tasks = []
    for suite, suite_tasks in planned:
        for t in suite_tasks:
            missing = [n for n in t.impls if (t.suite, t.case_id, n, device) not in done]
            if missing:
                keep = missing if suite.reference in missing else [suite.reference, *missing]
                tasks.append(Task(t.suite, t.params, t.case_id, [n for n in t.impls if n in keep]))
    return tasks


@contextlib.contextmanager
def locked_folder(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run folder; a second run into it is a usage error (one line, exit 2),
    since both would run the missing cases and write duplicate records."""
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another twinbench run is writing to {out}; wait for it to finish or choose "
                             f"another --out") from None
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def sigterm_ends_run() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C (exit 143), so the workers are killed on the way out instead of being
    left running in their own sessions; outside the main thread signals cannot be handled, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_code(doc: dict[str, Any]) -> int:
    """1 when any record is wrong, crashed or timed out."""
    return 1 if any(r["status"] in FAILED for r in doc["results"]) else 0
