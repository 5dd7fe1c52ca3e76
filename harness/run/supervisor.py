"""One device's worker, supervised through its tasks: a crash or hang costs only the impl that caused it.

The worker announces each risky step (``Begin``); when it dies or goes silent the supervisor records that
impl (crashed / timeout, with the reason the process gave), starts a fresh worker and re-runs the rest of
the case with the culprit excluded. A reference or case-setup failure ends the case: nothing else can be
compared without it. An impl's probe (``available``/``supports``) is its own phase with its own, shorter
time limit, so a probe that hangs or crashes costs only its impl; :func:`probe_impls` runs the probes of
`twinbench list` the same way.
"""

from __future__ import annotations

import sys
import tempfile
import threading
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

from twinbench.harness import SOURCE_ROOT as ROOT
from twinbench.harness.core import devices as devices_mod
from twinbench.harness.core import registry
from twinbench.harness.run.journal import Journal
from twinbench.harness.run.plan import RunOptions, Task
from twinbench.harness.run.process import (
    Begin,
    CaseDone,
    CaseError,
    Ceilings,
    Fingerprint,
    Heartbeat,
    Probed,
    ProbeSuite,
    Ready,
    RecordDone,
    RunWorkerConfig,
    WorkerDied,
    WorkerHung,
    WorkerKind,
    WorkerProcess,
    user_triton_interpret,
    worker_environment,
)
from twinbench.harness.store.record import FAILED, Record, Status

# A probe must be cheap (registry.Impl); one silent this long is hung, whatever --timeout allows a kernel.
PROBE_TIMEOUT_S = 60.0
# Starting a worker (importing torch and every impl, measuring ceilings) is no impl's step: a short --timeout
# meant for kernels must not fail the start on a loaded machine.
START_TIMEOUT_S = 120.0


def phase_timeout(phase: str, timeout: float) -> float:
    """The no-progress limit while the worker is in ``phase`` (measuring ceilings, which a case may ask for
    mid-run, is no impl's step: it gets the start's allowance, not a --timeout meant for kernels)."""
    if phase == "ceilings":
        return max(timeout, START_TIMEOUT_S)
    return min(timeout, PROBE_TIMEOUT_S) if phase == "probe" else timeout


class Progress:
    """A rich progress bar on a terminal; one plain line per finished case otherwise (CI logs)."""

    def __init__(self, total: int):
        self.total = total
        self.done = 0
        self.lock = threading.Lock()
        self.live = None
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.live = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), transient=True)
            self.task = self.live.add_task("starting", total=total)
            self.live.start()

    def status(self, text: str) -> None:
        if self.live:
            self.live.update(self.task, description=text[:90])

    def case_done(self, device: str, task: Task, records: list[dict[str, Any]]) -> None:
        with self.lock:
            self.done += 1
            counts: dict[str, int] = {}
            for rec in records:
                counts[rec["status"]] = counts.get(rec["status"], 0) + 1
            summary = " ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            if self.live:
                self.live.update(self.task, advance=1)
                if any(r["status"] in FAILED for r in records):
                    self.live.console.print(f"[red]{task.suite} {device} {task.case_id}: {summary}")
            else:
                print(f"[{self.done}/{self.total}] {task.suite} {device} {task.case_id}: {summary}", flush=True)

    def close(self) -> None:
        if self.live:
            self.live.stop()


class DeviceRun:
    """Supervises one device's worker through its tasks, surviving crashes and hangs."""

    def __init__(self, device: devices_mod.Device, tasks: list[Task], options: RunOptions, journal: Journal,
                 progress: Progress | None, ceilings: dict[str, Any] | None, reference: dict[str, str]):
        self.device = device
        self.tasks = deque(tasks)
        self.options = options
        self.journal = journal
        self.progress = progress
        self.ceilings = ceilings
        self.reference = reference  # suite -> reference impl name
        self.fingerprint: dict[str, Any] | None = None
        self.records: list[dict[str, Any]] = []
        self.log_path = options.out / f"worker-{device.name.replace(':', '')}.log"
        self.worker: WorkerProcess | None = None
        self.cancelled = False

    def cancel(self) -> None:
        """Stop now (Ctrl-C, SIGTERM, an error elsewhere): kill the worker and start no other."""
        self.cancelled = True
        worker = self.worker
        if worker is not None:
            worker.kill()

    def _start(self) -> WorkerProcess:
        o, dev = self.options, self.device
        setup = worker_environment(WorkerKind.RUN, dev.backend, dev.name, root=ROOT, head_root=ROOT,
                                   threads=o.threads, triton_interpret=o.triton_interpret)
        mem = o.memory_limit_gb
        limit = int(mem * 2**30) if mem else int(0.85 * dev.memory_bytes) if dev.backend == "cpu" else 0
        config = RunWorkerConfig(device=dev.name, backend=dev.backend, plugins=o.plugins, threads=setup.threads,
                                 memory_limit_bytes=limit, ceilings=self.ceilings, measure_ceilings=o.timing,
                                 trials=o.trials, seed=o.seed, reference_device=o.reference_device,
                                 timing=o.timing, plan=asdict(o.plan))

        def journal_start_event(event) -> None:
            if isinstance(event, Fingerprint):
                self.fingerprint = event.fingerprint
                self.journal.append({"type": "fingerprint", "fingerprint": event.fingerprint,
                                     "import_failures": event.import_failures})
            elif isinstance(event, Ceilings):
                self._journal_ceilings(event)

        return start_run_worker(config, setup.env, self.log_path, max(o.timeout, START_TIMEOUT_S),
                                on_event=journal_start_event, started=self._started)

    def _journal_ceilings(self, event: Ceilings) -> None:
        """Ceilings come at the worker's start and again mid-case (another thread count, or a re-measurement
        after a share above 100%): each is journaled; the last is what a restarted worker reuses."""
        self.ceilings = event.ceilings
        self.journal.append({"type": "ceilings", "device": self.device.name, "fingerprint": event.fingerprint,
                             "ceilings": event.ceilings})

    def _started(self, worker: WorkerProcess) -> None:
        self.worker = worker  # visible to cancel() while the worker is still starting

    def _emit(self, rec: dict[str, Any]) -> None:
        self.journal.append({"type": "record", "record": rec})
        self.records.append(rec)

    def _blame(self, task: Task, culprit: str, status: Status, reason: str, got: set[str]) -> None:
        """Record what the dead/hung worker was running; re-queue the rest of the case."""
        ref = self.reference[task.suite]
        if culprit in ("", None) or culprit == ref:
            who = "reference" if culprit == ref else "case setup"
            for name in task.impls:
                if name in got:
                    continue
                rec_status = status if name == culprit or not culprit else Status.SKIPPED
                why = reason if rec_status == status else f"{who} {status.value}: {reason}"
                self._emit(self._bare_record(task, name, rec_status, why))
            self._case_done(task)
            return
        task.exclude[culprit] = (status.value, reason)

    def _bare_record(self, task: Task, impl: str, status: Status, reason: str) -> dict[str, Any]:
        """The record of an impl the worker could not finish: status and reason, nothing measured."""
        found = registry.IMPLS.get((task.suite, impl))
        return Record.new(suite=task.suite, case=task.case_id, params=task.params, device=self.device.name,
                          fingerprint=(self.fingerprint or {}).get("id", ""), impl=impl,
                          tags=found.tags if found else [], status=status, reason=reason).to_json()

    def _case_done(self, task: Task) -> None:
        self.progress.case_done(self.device.name, task, [r for r in self.records if r["suite"] == task.suite
                                                         and r["case"] == task.case_id])
        self.tasks.popleft()

    def run(self, *, keep_worker: bool = False) -> None:
        """Run the queued tasks; ``keep_worker`` leaves the worker running for the next call's tasks (a
        cluster node's actor is handed one case at a time and must not restart torch for each)."""
        try:
            self._run()
        except BaseException:
            self.cancel()
            raise
        if self.worker is not None and not keep_worker:
            self.worker.stop()
            self.worker = None

    def _run(self) -> None:
        worker: WorkerProcess | None = self.worker  # kept from an earlier run(keep_worker=True), or None
        timeout = self.options.timeout
        while self.tasks and not self.cancelled:
            task = self.tasks[0]
            if worker is None:
                try:
                    worker = self._start()
                except WorkerDied as exc:
                    for t in list(self.tasks):
                        for name in t.impls:
                            self._emit(self._bare_record(t, name, Status.CRASHED, f"worker failed to start: {exc}"))
                        self.progress.case_done(self.device.name, t, [])
                    self.tasks.clear()
                    return
            got = {r["impl"] for r in self.records if r["suite"] == task.suite and r["case"] == task.case_id}
            task.impls = [n for n in task.impls if n not in got or n == self.reference[task.suite]]
            current = ("", "setup")
            self.progress.status(f"{self.device.name} {task.suite} {task.case_id}")
            try:
                worker.send(task.request())
                while True:
                    event = worker.next_event(phase_timeout(current[1], timeout))
                    if isinstance(event, Heartbeat):  # alive: the wait above already restarted the clock
                        self.progress.status(f"{self.device.name} {task.suite} {task.case_id} {current[0]} "
                                             f"{event.text}")
                    elif isinstance(event, Begin):
                        current = (event.impl, event.phase)
                        self.progress.status(f"{self.device.name} {task.suite} {task.case_id} {event.impl} "
                                             f"{event.phase}")
                    elif isinstance(event, Ceilings):
                        self._journal_ceilings(event)
                    elif isinstance(event, RecordDone):
                        if event.record["impl"] not in got:
                            got.add(event.record["impl"])
                            self._emit(event.record)
                    elif isinstance(event, CaseError):
                        for name in task.impls:
                            if name not in got:
                                self._emit(self._bare_record(task, name, Status.CRASHED,
                                                             f"case failed: {event.reason}"))
                        self._case_done(task)
                        break
                    elif isinstance(event, CaseDone):
                        self._case_done(task)
                        break
            except WorkerHung:  # already killed, with its process group
                worker = self.worker = None
                self._blame(task, current[0], Status.TIMEOUT,
                            f"no progress for {phase_timeout(current[1], timeout):g}s during {current[1]}", got)
            except WorkerDied as exc:
                worker.kill()
                worker = self.worker = None
                if self.cancelled:
                    return
                self._blame(task, current[0], Status.CRASHED, f"{exc} (during {current[1]})", got)


def probe_impls(device: devices_mod.Device, suites: list[str], plugins: list[str], *,
                timeout: float = PROBE_TIMEOUT_S, start_timeout: float = START_TIMEOUT_S) -> dict[tuple[str, str], tuple[bool, str]]:
    """`twinbench list`: (ok, why not) of every impl of ``suites`` on ``device``, probed in a run worker.

    Each probe is its own phase: one that hangs past ``timeout`` is "probe timed out", one that kills the
    worker "probe crashed: <signal, log>"; a fresh worker probes the rest, so the list always returns.
    """
    setup = worker_environment(WorkerKind.RUN, device.backend, device.name, root=ROOT, head_root=ROOT,
                               triton_interpret=user_triton_interpret())
    config = RunWorkerConfig(device=device.name, backend=device.backend, plugins=plugins, threads=setup.threads,
                             measure_ceilings=False, timing=False)
    found: dict[tuple[str, str], tuple[bool, str]] = {}
    pending = deque(suites)
    worker: WorkerProcess | None = None
    with tempfile.TemporaryDirectory(prefix="twinbench-list-") as scratch:
        try:
            while pending:
                suite = pending[0]
                names = [i.name for i in registry.impls_for(suite)]
                if worker is None:
                    try:
                        worker = _start_probe_worker(config, setup.env, Path(scratch) / "probe.log", start_timeout)
                    except WorkerDied as exc:
                        for rest in pending:
                            for impl in registry.impls_for(rest):
                                found.setdefault((rest, impl.name), (False, f"probe worker failed to start: {exc}"))
                        break
                current = ""
                try:
                    worker.send(ProbeSuite(suite=suite, exclude={n: "" for n in names if (suite, n) in found}))
                    while True:
                        event = worker.next_event(timeout)
                        if isinstance(event, Begin):
                            current = event.impl
                        elif isinstance(event, Probed):
                            found[(suite, event.impl)] = (event.ok, event.why)
                        elif isinstance(event, (CaseDone, CaseError)):
                            why = f"probe failed: {event.reason}" if isinstance(event, CaseError) else "not probed"
                            for n in names:
                                found.setdefault((suite, n), (False, why))
                            pending.popleft()
                            break
                except WorkerHung:
                    worker = None
                    if current:
                        found[(suite, current)] = (False, f"probe timed out (no answer in {timeout:g}s)")
                except WorkerDied as exc:
                    worker.kill()
                    worker = None
                    if current:
                        found[(suite, current)] = (False, f"probe crashed: {exc}")
                if current == "" and pending and pending[0] == suite and worker is None:
                    for n in names:  # died before any probe began: nothing to blame, do not loop
                        found.setdefault((suite, n), (False, "probe worker died before probing"))
                    pending.popleft()
        finally:
            if worker is not None:
                worker.stop()
    return found


def start_run_worker(config: RunWorkerConfig, env: dict[str, str], log_path: Path, timeout: float, *,
                     label: str = "worker", on_event=None, started=None) -> WorkerProcess:
    """Start a run worker and wait for its Ready; events before it (fingerprint, ceilings) go to ``on_event``,
    the process to ``started`` as soon as it exists. Silence past ``timeout`` is a failed start."""
    worker = WorkerProcess([sys.executable, "-m", "twinbench.harness.run.worker"], config.to_json(), cwd=ROOT,
                           env=env, log_path=log_path, label=label)
    if started:
        started(worker)
    while True:
        try:
            event = worker.next_event(timeout)
        except WorkerHung:
            raise WorkerDied(f"{label} did not start within {timeout:.0f}s") from None
        if isinstance(event, Ready):
            return worker
        if on_event:
            on_event(event)


def _start_probe_worker(config: RunWorkerConfig, env: dict[str, str], log_path: Path, timeout: float) -> WorkerProcess:
    return start_run_worker(config, env, log_path, timeout, label="probe worker")
