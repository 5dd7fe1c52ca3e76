"""suites x devices x cases x impls, one isolated worker process per device, a journal for --resume.

A worker that segfaults, aborts, hangs past ``timeout`` or is killed for memory takes only the impl it
was running with it: the supervisor records that impl's result with the reason, starts a fresh worker
and re-runs the rest of the case. Every finished record is appended (fsync'd) to ``journal.jsonl``.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from twinbench.harness import SOURCE_ROOT as ROOT
from twinbench.harness.core import devices as devices_mod
from twinbench.harness.core import registry
from twinbench.harness.core.case import select_cases
from twinbench.harness.core.errors import UsageError
from twinbench.harness.core.timing import TimingPlan
from twinbench.harness.store.results import atomic_write_json, new_document, now_iso, provenance, record_key


@dataclass
class RunOptions:
    suites: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    impls: list[str] = field(default_factory=list)
    cases: list[str] = field(default_factory=list)
    profile: str = "quick"
    out: Path = Path("runs/latest")
    plugins: list[str] = field(default_factory=list)
    resume: bool = False
    timeout: float = 600.0
    trials: int | None = None
    seed: int = 0
    reference_device: str | None = None
    timing: bool = True
    plan: TimingPlan = field(default_factory=TimingPlan)
    threads: int | None = None
    memory_limit_gb: float | None = None
    report: bool = True


@dataclass
class Task:
    suite: str
    params: dict[str, Any]
    case_id: str
    impls: list[str]
    exclude: dict[str, tuple[str, str]] = field(default_factory=dict)

    def message(self) -> str:
        return json.dumps({"suite": self.suite, "params": self.params, "impls": self.impls,
                           "exclude": self.exclude})


class Journal:
    """Append-only JSON lines, fsync'd per line; a torn last line (killed mid-write) is ignored on read."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()

    def append(self, entry: dict[str, Any]) -> None:
        with self.lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        entries = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return entries


class WorkerDied(Exception):
    pass


class Worker:
    """One ``python -m twinbench.harness.run.worker`` process; events come back on a pipe, its output goes to a log."""

    def __init__(self, device: devices_mod.Device, config: dict[str, Any], log_path: Path):
        self.device = device
        self.log_path = log_path
        read_fd, write_fd = os.pipe()
        config = dict(config, event_fd=write_fd)
        env = _worker_env(device)
        self.log = open(log_path, "a", encoding="utf-8")
        self.log.write(f"\n==== worker start {now_iso()} ====\n")
        self.log.flush()
        self.proc = subprocess.Popen([sys.executable, "-m", "twinbench.harness.run.worker", json.dumps(config)],
                                     stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT,
                                     pass_fds=(write_fd,), env=env, cwd=str(ROOT), text=True,
                                     start_new_session=True)
        os.close(write_fd)
        self.events = os.fdopen(read_fd, "r", encoding="utf-8")
        self.buffer = ""

    def send(self, line: str) -> None:
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise WorkerDied(self.death_reason()) from exc

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        """The next event, or None when nothing arrives within ``timeout`` seconds (a hang)."""
        deadline = time.monotonic() + timeout
        while "\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.events], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self.events.fileno(), 65536).decode("utf-8", "replace")
                if not chunk:
                    self.proc.wait(timeout=30)
                    raise WorkerDied(self.death_reason())
                self.buffer += chunk
        line, self.buffer = self.buffer.split("\n", 1)
        return json.loads(line)

    def death_reason(self) -> str:
        code = self.proc.poll()
        if code is None:
            return "worker stopped answering"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            why = {"SIGKILL": " (killed: out of memory?)", "SIGSEGV": " (segmentation fault)",
                   "SIGABRT": " (aborted)"}.get(name, "")
            text = f"worker died with {name}{why}"
        else:
            text = f"worker exited with code {code}"
        tail = self.log_tail()
        return f"{text}; log: {tail}" if tail else text

    def log_tail(self, lines: int = 3) -> str:
        try:
            self.log.flush()
            text = self.log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        except OSError:
            return ""
        keep = [line.strip() for line in text if line.strip() and not line.startswith("====")][-lines:]
        return " | ".join(keep)[-500:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
        self.proc.wait()
        self.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(json.dumps({"type": "stop"}))
                self.proc.wait(timeout=30)
            except (WorkerDied, subprocess.TimeoutExpired):
                self.kill()
        self.close()

    def close(self) -> None:
        for fh in (self.events, self.proc.stdin, self.log):
            try:
                fh.close()
            except Exception:
                pass


def _worker_env(device: devices_mod.Device) -> dict[str, str]:
    """Pin the worker to its device (CUDA_VISIBLE_DEVICES style) and put this tree first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    if device.backend in ("cuda", "rocm", "xpu"):
        index = device.name.split(":")[1]
        var = {"cuda": "CUDA_VISIBLE_DEVICES", "rocm": "HIP_VISIBLE_DEVICES", "xpu": "ZE_AFFINITY_MASK"}[device.backend]
        visible = [v for v in env.get(var, "").split(",") if v.strip()]
        env[var] = visible[int(index)] if visible and int(index) < len(visible) else index
        if os.environ.get("TWINBENCH_USER_TRITON_INTERPRET") != "1":
            env.pop("TRITON_INTERPRET", None)  # compiled Triton on GPUs
    return env


def plan_tasks(options: RunOptions) -> list[tuple[registry.Suite, list[Task]]]:
    """Validate the selection (unknown suite/impl, malformed case: UsageError) and build the task list."""
    names = options.suites or sorted(registry.SUITES)
    explicit = bool(options.suites)
    planned = []
    for name in names:
        suite = registry.get_suite(name)
        if options.profile not in suite.profiles:
            if explicit:
                suite.cases(options.profile)  # raises the clear usage error
            continue
        impl_names = [i.name for i in registry.impls_for(name)]
        chosen = impl_names
        if options.impls:
            chosen = [n for n in impl_names if n in options.impls or n == suite.reference]
        cases = select_cases(suite.cases(options.profile), options.cases, name, params=suite.params, rules=suite.rules)
        for case in cases:
            suite.check_choices(case)
        planned.append((suite, [Task(name, c.as_dict(), c.id, list(chosen)) for c in cases]))
    if options.impls:
        every = {i.name for i in registry.IMPLS.values() if i.suite in [s.name for s, _ in planned]}
        unknown = sorted(set(options.impls) - every)
        if unknown:
            raise UsageError(f"unknown impl {', '.join(unknown)} for suites {', '.join(s.name for s, _ in planned)} "
                             f"(known: {', '.join(sorted(every))})")
    if not planned:
        raise UsageError(f"no suite has a {options.profile!r} profile")
    return planned


def _check_dtypes(planned: list[tuple[registry.Suite, list[Task]]], devices: list[devices_mod.Device]) -> None:
    """A dtype no selected device can compute is a usage error (per-device gaps are recorded as skips)."""
    from twinbench.harness.core.case import torch_dtype

    for _, tasks in planned:
        for t in tasks:
            name = t.params.get("dtype")
            if name is None:
                continue
            torch_dtype(str(name))  # unknown names raise UsageError
            if not any(d.supports_dtype(name) for d in devices):
                raise UsageError(f"case {t.case_id}: no selected device computes in {name} "
                                 f"({', '.join(f'{d.name}: {chr(44).join(d.dtypes)}' for d in devices)})")


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
                if any(r["status"] in ("wrong", "crashed", "timeout") for r in records):
                    self.live.console.print(f"[red]{task.suite} {device} {task.case_id}: {summary}")
            else:
                print(f"[{self.done}/{self.total}] {task.suite} {device} {task.case_id}: {summary}", flush=True)

    def close(self) -> None:
        if self.live:
            self.live.stop()


class DeviceRun:
    """Supervises one device's worker through its tasks, surviving crashes and hangs."""

    def __init__(self, device: devices_mod.Device, tasks: list[Task], options: RunOptions, journal: Journal,
                 progress: Progress, ceilings: dict[str, Any] | None, reference: dict[str, str]):
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

    def config(self) -> dict[str, Any]:
        o = self.options
        mem = o.memory_limit_gb
        limit = int(mem * 2**30) if mem else int(0.85 * self.device.memory_bytes) if self.device.backend == "cpu" else 0
        return {"device": self.device.name, "backend": self.device.backend, "plugins": o.plugins,
                "threads": o.threads, "memory_limit_bytes": limit, "ceilings": self.ceilings,
                "measure_ceilings": o.timing,
                "options": {"trials": o.trials, "seed": o.seed, "reference_device": o.reference_device,
                            "timing": o.timing, "plan": asdict(o.plan)}}

    def _start(self) -> Worker:
        worker = Worker(self.device, self.config(), self.log_path)
        while True:
            event = worker.next_event(self.options.timeout)
            if event is None:
                worker.kill()
                raise WorkerDied(f"worker did not start within {self.options.timeout:.0f}s")
            if event["type"] == "fingerprint":
                self.fingerprint = event["fingerprint"]
                self.journal.append({"type": "fingerprint", "fingerprint": event["fingerprint"],
                                     "import_failures": event.get("import_failures", {})})
            elif event["type"] == "ceilings":
                self.ceilings = event["ceilings"]
                self.journal.append({"type": "ceilings", "device": self.device.name,
                                     "fingerprint": event["fingerprint"], "ceilings": event["ceilings"]})
            elif event["type"] == "ready":
                return worker

    def _emit(self, rec: dict[str, Any]) -> None:
        self.journal.append({"type": "record", "record": rec})
        self.records.append(rec)

    def _blame(self, task: Task, culprit: str, status: str, reason: str, got: set[str]) -> None:
        """Record what the dead/hung worker was running; re-queue the rest of the case."""
        ref = self.reference[task.suite]
        if culprit in ("", None) or culprit == ref:
            who = "reference" if culprit == ref else "case setup"
            for name in task.impls:
                if name in got:
                    continue
                rec_status = status if name == culprit or not culprit else "skipped"
                why = reason if rec_status == status else f"{who} {status}: {reason}"
                self._emit(self._bare_record(task, name, rec_status, why))
            self.progress.case_done(self.device.name, task, [r for r in self.records if r["case"] == task.case_id
                                                             and r["suite"] == task.suite])
            self.tasks.popleft()
            return
        task.exclude[culprit] = (status, reason)

    def _bare_record(self, task: Task, impl: str, status: str, reason: str) -> dict[str, Any]:
        found = registry.IMPLS.get((task.suite, impl))
        return {"suite": task.suite, "case": task.case_id, "params": task.params, "impl": impl,
                "device": self.device.name, "fingerprint": (self.fingerprint or {}).get("id", ""),
                "tags": list(found.tags) if found else [], "status": status, "reason": reason,
                "parity": None, "timing": None, "memory": None, "derived": None, "meta": None,
                "metrics": None, "duration_s": None}

    def run(self) -> None:
        worker: Worker | None = None
        while self.tasks:
            task = self.tasks[0]
            if worker is None:
                try:
                    worker = self._start()
                except WorkerDied as exc:
                    for t in list(self.tasks):
                        for name in t.impls:
                            self._emit(self._bare_record(t, name, "crashed", f"worker failed to start: {exc}"))
                        self.progress.case_done(self.device.name, t, [])
                    self.tasks.clear()
                    return
            got: set[str] = {r["impl"] for r in self.records if r["suite"] == task.suite and r["case"] == task.case_id}
            task.impls = [n for n in task.impls if n not in got or n == self.reference[task.suite]]
            current = ("", "setup")
            self.progress.status(f"{self.device.name} {task.suite} {task.case_id}")
            try:
                worker.send(task.message())
                while True:
                    event = worker.next_event(self.options.timeout)
                    if event is None:
                        worker.kill()
                        worker = None
                        self._blame(task, current[0], "timeout",
                                    f"no progress for {self.options.timeout:g}s during {current[1]}", got)
                        break
                    kind = event["type"]
                    if kind == "begin":
                        current = (event["impl"], event["phase"])
                        self.progress.status(f"{self.device.name} {task.suite} {task.case_id} {current[0]} {current[1]}")
                    elif kind == "record":
                        if event["record"]["impl"] not in got:
                            got.add(event["record"]["impl"])
                            self._emit(event["record"])
                    elif kind == "case_error":
                        for name in task.impls:
                            if name not in got:
                                self._emit(self._bare_record(task, name, "crashed", f"case failed: {event['reason']}"))
                        self.progress.case_done(self.device.name, task, self._case_records(task))
                        self.tasks.popleft()
                        break
                    elif kind == "case_done":
                        self.progress.case_done(self.device.name, task, self._case_records(task))
                        self.tasks.popleft()
                        break
            except WorkerDied as exc:
                worker.close()
                worker = None
                self._blame(task, current[0], "crashed", f"{exc} (during {current[1]})", got)
        if worker is not None:
            worker.stop()

    def _case_records(self, task: Task) -> list[dict[str, Any]]:
        return [r for r in self.records if r["suite"] == task.suite and r["case"] == task.case_id]


def run(options: RunOptions, on_device_done: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the selection; returns the results document (also written to ``options.out/results.json``)."""
    registry.load_plugins(options.plugins)
    planned = plan_tasks(options)
    devices = [devices_mod.find(d) for d in options.devices] if options.devices else list(devices_mod.detect())
    if options.reference_device:
        devices_mod.find(options.reference_device)
    _check_dtypes(planned, devices)
    out = options.out
    journal = Journal(out / "journal.jsonl")
    if journal.path.exists() and not options.resume:
        raise UsageError(f"{out} already holds a run (journal.jsonl); pass --resume to finish it or choose "
                         f"another --out")
    out.mkdir(parents=True, exist_ok=True)
    previous = journal.read()
    prov = next((e["provenance"] for e in previous if e.get("type") == "start"), None)
    if prov is None:
        prov = provenance()
        journal.append({"type": "start", "provenance": prov})
    done = {record_key(e["record"]) for e in previous if e.get("type") == "record"}
    cached_ceilings = {e["device"]: e["ceilings"] for e in previous if e.get("type") == "ceilings"}

    runs = []
    total = 0
    reference = {suite.name: suite.reference for suite, _ in planned}
    for dev in devices:
        tasks = []
        for suite, suite_tasks in planned:
            for t in suite_tasks:
                missing = [n for n in t.impls if (t.suite, t.case_id, n, dev.name) not in done]
                if missing:
                    keep = missing if suite.reference in missing else [suite.reference, *missing]
                    tasks.append(Task(t.suite, t.params, t.case_id, [n for n in t.impls if n in keep]))
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
    finally:
        progress.close()
    return assemble(out, journal, prov)


def assemble(out: Path, journal: Journal, prov: dict[str, Any]) -> dict[str, Any]:
    """Results document from the journal (last record per key wins); written atomically."""
    doc = new_document(dict(prov, finished=now_iso()))
    by_key: dict[tuple, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    for entry in journal.read():
        kind = entry.get("type")
        if kind == "fingerprint":
            fp = entry["fingerprint"]
            doc["fingerprints"][fp["id"]] = fp
            failures.update(entry.get("import_failures") or {})
        elif kind == "ceilings":
            doc["ceilings"][entry["fingerprint"]] = entry["ceilings"]
        elif kind == "record":
            by_key[record_key(entry["record"])] = entry["record"]
    doc["results"] = list(by_key.values())
    if failures:
        doc["import_failures"] = failures
    atomic_write_json(out / "results.json", doc)
    return doc


def exit_code(doc: dict[str, Any]) -> int:
    return 1 if any(r["status"] in ("wrong", "crashed", "timeout") for r in doc["results"]) else 0
