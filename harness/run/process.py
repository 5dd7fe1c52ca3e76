"""The one worker-process class and protocol behind `run`, `gate --against` and `calibrate`.

A worker is a child process in its own session (so killing its process group also kills whatever it
spawned: compiler jobs, data loaders). The supervisor writes requests as JSON lines on the worker's stdin;
the worker writes events as JSON lines on a pipe whose fd it gets as ``event_fd`` in its JSON config
(argv[1]). The worker's stdout and stderr go to a log file, because libraries print. Every message has one
``type`` field; the classes below are the whole vocabulary.

Workers import :class:`EventWriter` and the message classes from here. The gate worker runs as a script
from the head against an older tree, so this module imports nothing but the standard library: the gate
worker loads the head's copy by file path instead of the measured tree's.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any, ClassVar, NoReturn

# --- messages -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[str] = ""

    def to_json(self) -> dict[str, Any]:
        return {"type": self.TYPE, **asdict(self)}


# Requests (supervisor -> worker, on stdin).
@dataclass(frozen=True)
class Stop(Message):
    TYPE: ClassVar[str] = "stop"


@dataclass(frozen=True)
class RunCase(Message):
    """Run worker: parity, timing and memory of ``impls`` on one case; ``exclude`` is decided already."""

    TYPE: ClassVar[str] = "case"
    suite: str
    params: dict[str, Any]
    impls: list[str]
    exclude: dict[str, tuple[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Prepare(Message):
    """Gate worker: build the callable for (suite, case, impl, mode), warm it up, estimate one call."""

    TYPE: ClassVar[str] = "prepare"
    key: str
    suite: str
    params: dict[str, Any]
    impl: str
    mode: str
    seed: int = 0
    parity: bool = False


@dataclass(frozen=True)
class Time(Message):
    """Gate worker: one sample, ms per call of ``number`` calls (+ ``extra`` calls: a planted slowdown)."""

    TYPE: ClassVar[str] = "time"
    key: str
    number: int
    extra: int = 0
    clock: str = "wall"


# Events (worker -> supervisor, on the event pipe).
@dataclass(frozen=True)
class Fingerprint(Message):
    TYPE: ClassVar[str] = "fingerprint"
    fingerprint: dict[str, Any]
    import_failures: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Ceilings(Message):
    TYPE: ClassVar[str] = "ceilings"
    fingerprint: str
    ceilings: dict[str, Any]


@dataclass(frozen=True)
class Ready(Message):
    """The worker serves requests now; ``harness`` is the folder its engine was imported from."""

    TYPE: ClassVar[str] = "ready"
    harness: str = ""
    fingerprint: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Begin(Message):
    """Announced before every risky step, so a death or hang is blamed on ``impl`` during ``phase``."""

    TYPE: ClassVar[str] = "begin"
    impl: str
    phase: str


@dataclass(frozen=True)
class Heartbeat(Message):
    """The running step is alive (``twinbench.harness.core.progress.note``): resets the no-progress clock."""

    TYPE: ClassVar[str] = "heartbeat"
    text: str = ""


@dataclass(frozen=True)
class ProbeSuite(Message):
    """Run worker: ``available``/``supports`` of every impl of ``suite`` not in ``exclude`` (``twinbench list``)."""

    TYPE: ClassVar[str] = "probe_suite"
    suite: str
    exclude: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Probed(Message):
    TYPE: ClassVar[str] = "probed"
    impl: str
    ok: bool
    why: str = ""
    state_changed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RecordDone(Message):
    TYPE: ClassVar[str] = "record"
    record: dict[str, Any]


@dataclass(frozen=True)
class CaseError(Message):
    TYPE: ClassVar[str] = "case_error"
    reason: str
    traceback: str = ""


@dataclass(frozen=True)
class CaseDone(Message):
    TYPE: ClassVar[str] = "case_done"
    seconds: float = 0.0


@dataclass(frozen=True)
class Prepared(Message):
    TYPE: ClassVar[str] = "prepared"
    ok: bool
    why: str = ""
    missing: bool = False
    per_call_ms: float = 0.0
    parity: tuple[bool, str] | None = None
    traceback: str = ""


@dataclass(frozen=True)
class Timed(Message):
    TYPE: ClassVar[str] = "timed"
    ok: bool
    ms: float = 0.0
    why: str = ""
    traceback: str = ""


MESSAGES: dict[str, type[Message]] = {cls.TYPE: cls for cls in (
    Stop, RunCase, Prepare, Time, Fingerprint, Ceilings, Ready, Begin, Heartbeat, ProbeSuite, Probed, RecordDone,
    CaseError, CaseDone, Prepared, Timed)}


def parse(line: str) -> Message:
    """One JSON line into its message class; keys a newer peer added are ignored."""
    data = json.loads(line)
    cls = MESSAGES[data["type"]]
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


class EventWriter:
    """The worker's side of the event pipe: one JSON line per message, flushed at once.

    The fd is made non-inheritable: a process an impl starts (``os.system``, ``fork``) must not hold the
    pipe open, or the supervisor could not tell the worker's death from its silence.
    """

    def __init__(self, fd: int, default: Callable[[Any], Any] | None = None):
        with contextlib.suppress(OSError):
            os.set_inheritable(fd, False)
        self.fh = os.fdopen(fd, "w", buffering=1, encoding="utf-8")
        self.default = default
        self.lock = threading.Lock()  # heartbeats may come from an impl's own threads

    def send(self, message: Message) -> None:
        line = json.dumps(message.to_json(), default=self.default) + "\n"
        with self.lock:
            self.fh.write(line)
            self.fh.flush()


def requests(stream: IO[str]):
    """The worker's request loop: messages from stdin until Stop or end of input."""
    for line in stream:
        if not line.strip():
            continue
        message = parse(line)
        if isinstance(message, Stop):
            return
        yield message


# --- the environment policy ------------------------------------------------------------------------------


class WorkerKind(enum.Enum):
    RUN = "run"    # `twinbench run`: one worker per device, devices in parallel
    GATE = "gate"  # `gate --against` / `calibrate`: two workers taking turns on one device


# One thread per CPU gate/calibrate worker unless asked: on a shared box the A/A median ratio is far steadier
# with one (docs/method.md §6, numbers in §7).
DEFAULT_GATE_CPU_THREADS = 1
# glibc's malloc raises its mmap threshold (and the heap's trim threshold with it) as large blocks are freed, so
# two processes running the same code settle in different allocator states for their whole life: measured on
# `quant_linear reference fwdbwd` 1024x1024 batch 1, one thread, eight fresh processes: 280-1,230 page faults
# per call and 6-8 ms, or ~3,500 and 13-14 ms (docs/method.md §7). A gate reads that as a 2x difference
# between base and head. And the heap is trimmed by whichever free() finds its top over the trim threshold, so
# one impl's churn is paid inside the next one's timed call: `quant_linear` 4096x14336 batch 1 fp32, two threads,
# fused_cpu's fwd+bwd right after the reference's took 10-14 ms in half the calls (5-8 ms of it system time,
# the heap handed back) and 4 ms in the rest, where alone it takes 4 ms; with a 64 MiB trim threshold still in
# half of them (§7). Every worker therefore fixes the mmap threshold at the ceiling glibc's own adjustment stops
# at (32 MiB on 64-bit) and trims only above 1 GiB: it starts in the state of a process that has freed large
# blocks and keeps the heap it has grown, as a training process with steady shapes does. The CPU memory
# measurement hands freed heap back explicitly before its call (harness/core/memory.py). Other allocators
# ignore the variables; a value the user set is kept.
MALLOC_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
VISIBILITY_VARIABLES = {"cuda": "CUDA_VISIBLE_DEVICES", "rocm": "HIP_VISIBLE_DEVICES", "xpu": "ZE_AFFINITY_MASK"}


def _mask(value: str | None) -> list[str] | None:
    """A visibility variable's entries (indices or UUIDs); None when unset."""
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def narrowed_visibility(backend: str, index: int, env: Mapping[str, str]) -> dict[str, str | None]:
    """The visibility variables that make torch's device ``index`` (numbered in ``env``'s view) the worker's only
    device: name -> value, None to remove. Masks compose, they are never replaced: ``index`` is an index into
    the list that ``env`` already exposes.

    ROCm applies ``ROCR_VISIBLE_DEVICES`` first (the runtime's list), then ``HIP_VISIBLE_DEVICES`` indexes into
    that list, and ``CUDA_VISIBLE_DEVICES`` only when HIP's is unset (HIP's has precedence; torch's
    ``_parse_visible_devices`` reads them the same way). So ROCR's mask stays as it is, the HIP/CUDA mask in
    effect is indexed, the entry goes into ``HIP_VISIBLE_DEVICES`` and ``CUDA_VISIBLE_DEVICES`` is removed (a
    stale one could otherwise be read by a tool that ignores HIP's). CUDA and XPU have one variable each.
    """
    if backend == "rocm":
        effective = _mask(env.get("HIP_VISIBLE_DEVICES"))
        if effective is None:
            effective = _mask(env.get("CUDA_VISIBLE_DEVICES"))
        return {"HIP_VISIBLE_DEVICES": _entry(effective, index, "HIP/CUDA_VISIBLE_DEVICES"),
                "CUDA_VISIBLE_DEVICES": None}
    var = VISIBILITY_VARIABLES[backend]
    return {var: _entry(_mask(env.get(var)), index, var)}


def _entry(mask: list[str] | None, index: int, name: str) -> str:
    if mask is None:
        return str(index)
    if index >= len(mask):
        raise ValueError(f"device index {index} is not in {name}={','.join(mask)}")
    return mask[index]


def pin_worker_device(torch_device: str) -> None:
    """Make the worker's device the current one, before any work: events, streams, ``synchronize()`` and memory
    calls without a device argument mean the current device, so an unpinned gate worker on ``cuda:1`` would
    time ``cuda:0`` (docs/method.md §2). Imports torch here: this module stays standard-library at import."""
    import torch

    device = torch.device(torch_device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif device.type == "xpu":
        torch.xpu.set_device(device)


@dataclass(frozen=True)
class WorkerEnvironment:
    env: dict[str, str]
    threads: int | None  # torch.set_num_threads in the worker; None: torch's default


def user_triton_interpret() -> bool:
    """Whether the user started twinbench with TRITON_INTERPRET=1: then GPU workers interpret Triton too
    (read once by the CLI and passed in the worker config, never through another variable)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def worker_environment(kind: WorkerKind, backend: str, device_name: str, *, root: Path, head_root: Path,
                       threads: int | None = None, triton_interpret: bool = False,
                       base: Mapping[str, str] | None = None) -> WorkerEnvironment:
    """The environment and thread count of every worker; the one place that decides them (docs/method.md §6).

    - ``PYTHONPATH``: ``root`` (the tree the worker serves) first; entries naming the head's tree are dropped
      when they differ, so a base-tree worker never imports the head's modules. ``PYTHONUNBUFFERED=1`` so
      the log holds what a worker printed before it died.
    - ``TRITON_INTERPRET``: ``1`` on the CPU (Triton only runs there through its interpreter; set before any
      impl imports triton). On GPUs it is removed, so kernels compile, unless ``triton_interpret`` (the user
      started twinbench with ``TRITON_INTERPRET=1``; the CLI passes that in the options).
    - Device visibility (run workers on GPUs): ``CUDA_VISIBLE_DEVICES`` / ``HIP_VISIBLE_DEVICES`` /
      ``ZE_AFFINITY_MASK`` narrowed to the worker's device, so per-device workers in parallel cannot touch
      each other's device; existing masks are composed, not replaced (:func:`narrowed_visibility`, ROCm's
      three variables included). Gate workers are not narrowed: they find the device by name in the tree
      they serve, which may be an older commit, and pin it (:func:`pin_worker_device`).
    - Threads: gate/calibrate CPU workers default to one thread and ``OMP_WAIT_POLICY=PASSIVE`` (the idle
      side's OpenMP threads must not spin while the other side is timed); run workers keep torch's default
      unless ``threads`` is given.
    - Allocator: every worker (any backend: the host side's allocations too) gets glibc's malloc thresholds
      fixed (``MALLOC_ENVIRONMENT``), so base and head start in the same allocator state and no impl's timed
      call pays for handing back what another impl freed.
    """
    env = dict(os.environ if base is None else base)
    root, head_root = Path(root).resolve(), Path(head_root).resolve()
    drop = {root, head_root}
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() not in drop]
    env["PYTHONPATH"] = os.pathsep.join([str(root), *rest])
    env["PYTHONUNBUFFERED"] = "1"
    if backend == "cpu" or triton_interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    if kind is WorkerKind.RUN and backend in VISIBILITY_VARIABLES:
        for var, value in narrowed_visibility(backend, int(device_name.split(":")[1]), env).items():
            if value is None:
                env.pop(var, None)
            else:
                env[var] = value
    for var, value in MALLOC_ENVIRONMENT.items():
        env.setdefault(var, value)
    if kind is WorkerKind.GATE and backend == "cpu":
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        threads = threads or DEFAULT_GATE_CPU_THREADS
    return WorkerEnvironment(env=env, threads=threads)


# --- the supervisor's side -------------------------------------------------------------------------------


class WorkerFailed(Exception):
    """A worker that cannot serve any more; the message says why (exit code or signal, log tail)."""


class WorkerDied(WorkerFailed):
    pass


class WorkerHung(WorkerFailed):
    pass


SIGNAL_HINTS = {"SIGKILL": " (killed: out of memory?)", "SIGSEGV": " (segmentation fault)", "SIGABRT": " (aborted)"}


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, process group) of a live process from /proc; None when gone, a zombie, or no /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields_ = text.rsplit(")", 1)[1].split()
    if fields_[0] == "Z":
        return None
    return int(fields_[1]), int(fields_[2])


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children of children too) plus the other members of its process
    group, read from /proc (empty where there is none). A child that called ``setsid`` leaves the group but
    stays a descendant while its parent lives; that is why both are collected."""
    table: dict[int, tuple[int, int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and (found := _proc_stat(int(entry.name))) is not None:
                table[int(entry.name)] = found
    below = {p for p, (_, group) in table.items() if group == pid and p != pid}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for p, (ppid, _) in table.items():
            if ppid == parent and p not in below and p != pid:
                below.add(p)
                frontier.append(p)
    return sorted(below)


def kill_pids(pids: list[int]) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)


def die_with_parent(poll_s: float = 1.0) -> None:
    """In a worker: when the process that started it is gone, kill this worker's whole family and exit.

    A supervisor killed by SIGKILL (a CI job's timeout, the OOM killer) cannot kill its workers, and a worker
    stuck inside a hung impl never reads the end of its stdin: without this it would run on, orphaned, for
    ever. A daemon thread compares the parent pid every ``poll_s`` seconds (an orphan is re-parented, so the
    pid changes); polling rather than PR_SET_PDEATHSIG, which fires when the *thread* that started the worker
    ends — a Ray actor's or a pytest session's thread may end long before the supervisor process does.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        kill_pids(descendants(os.getpid()))  # children that left the group too (collected while we live)
        if os.getpgid(0) == os.getpid():  # its own session (WorkerProcess): the group is only its family
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(os.getpid(), signal.SIGKILL)
        os._exit(1)

    threading.Thread(target=watch, name="twinbench-die-with-parent", daemon=True).start()


# Every started worker until it is killed: `kill_all` (at interpreter exit, and from the runner on SIGINT /
# SIGTERM) ends them, because a worker in its own session never sees the terminal's Ctrl-C.
_LIVE: set[WorkerProcess] = set()


def kill_all() -> None:
    """Kill every worker this process started and everything they spawned (any exit path)."""
    for worker in list(_LIVE):
        with contextlib.suppress(Exception):
            worker.kill()


atexit.register(kill_all)


class WorkerProcess:
    """One worker: started in its own session, JSON lines both ways, killed with its whole process group."""

    def __init__(self, command: list[str], config: dict[str, Any], *, cwd: Path, env: dict[str, str],
                 log_path: Path, label: str = "worker"):
        self.label = label
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        read_fd, write_fd = os.pipe()
        self.log = open(self.log_path, "a", encoding="utf-8")
        self.log.write(f"\n==== {label} start {time.strftime('%Y-%m-%dT%H:%M:%S')} ====\n")
        self.log.flush()
        self.log_start = os.fstat(self.log.fileno()).st_size  # the log is shared by the device's workers: quote only this one's lines
        try:
            self.proc = subprocess.Popen([*command, json.dumps(dict(config, event_fd=write_fd))],
                                         stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT,
                                         pass_fds=(write_fd,), env=env, cwd=str(cwd), text=True,
                                         start_new_session=True)
        except BaseException:
            os.close(read_fd)
            self.log.close()
            raise
        finally:
            os.close(write_fd)
        self.events = os.fdopen(read_fd, "rb")
        self.buffer = b""
        _LIVE.add(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, message: Message) -> None:
        try:
            self.proc.stdin.write(json.dumps(message.to_json()) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as exc:
            self._reap()
            raise WorkerDied(self.death_reason()) from exc

    def next_event(self, timeout: float) -> Message:
        """The next event; WorkerHung (after killing the worker) when none comes within ``timeout`` seconds.

        Death is read from the process itself (polled every second), not from the pipe's end: a process the
        worker started may still hold the pipe open after the worker crashed.
        """
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise WorkerHung(f"{self.label} sent nothing for {timeout:g}s")
            exited = self.proc.poll() is not None
            ready, _, _ = select.select([self.events], [], [], 0 if exited else min(left, 1.0))
            if ready:
                chunk = os.read(self.events.fileno(), 65536)
                if chunk:
                    self.buffer += chunk
                    continue
            if exited or (ready and not chunk):  # gone, and everything it wrote before dying is read
                self._reap()
                raise WorkerDied(self.death_reason())
        line, self.buffer = self.buffer.split(b"\n", 1)
        return parse(line.decode("utf-8", "replace"))

    def request(self, message: Message, timeout: float) -> Message:
        self.send(message)
        return self.next_event(timeout)

    def death_reason(self) -> str:
        """Why the worker is gone, from the process itself: its exit code or signal, and its log's last lines."""
        code = self.proc.poll()
        if code is None:
            text = f"{self.label} stopped answering"
        elif code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            text = f"{self.label} died with {name}{SIGNAL_HINTS.get(name, '')}"
        else:
            text = f"{self.label} exited with code {code}"
        tail = self.log_tail()
        return f"{text}; log: {tail}" if tail else f"{text} (log: {self.log_path})"

    def log_tail(self, lines: int = 3) -> str:
        """The last lines this worker wrote (never an earlier worker's, which share the log file)."""
        try:
            self.log.flush()
            with open(self.log_path, "rb") as fh:
                fh.seek(self.log_start)
                text = fh.read().decode("utf-8", "replace").strip().splitlines()
        except (OSError, ValueError):
            return ""
        keep = [line.strip() for line in text if line.strip() and not line.startswith("====")][-lines:]
        return " | ".join(keep)[-500:]

    def _reap(self) -> None:
        """The event pipe closed: the worker is exiting; wait for its status (or kill it)."""
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the group's id is its pid

    def kill(self) -> None:
        """SIGKILL to the worker, its whole process group and its descendants (collected before the kill: a
        child that left the group is found only while its parent lives), then reap it."""
        spawned = descendants(self.proc.pid)
        self._kill_group()
        if self.proc.poll() is None:
            self.proc.kill()
        kill_pids(spawned)
        self.proc.wait()
        self.close()
        _LIVE.discard(self)

    def stop(self, grace: float = 30.0) -> None:
        """Ask it to stop; kill the group if it does not within ``grace`` seconds. Leftover children go too."""
        if self.proc.poll() is None:
            try:
                self.send(Stop())
                self.proc.wait(timeout=grace)
            except (WorkerFailed, subprocess.TimeoutExpired):
                pass
        self.kill()

    def close(self) -> None:
        for fh in (self.events, self.proc.stdin, self.log):
            with contextlib.suppress(Exception):
                fh.close()


@dataclass(frozen=True)
class RunWorkerConfig:
    """What the supervisor tells a run worker (argv[1], JSON); the environment is already set (process.py)."""

    device: str
    backend: str
    plugins: list[str] = field(default_factory=list)
    threads: int | None = None
    memory_limit_bytes: int = 0
    ceilings: dict[str, Any] | None = None  # cached from a --resume'd journal; None: measure them
    measure_ceilings: bool = True
    trials: int | None = None
    seed: int = 0
    reference_device: str | None = None
    timing: bool = True
    plan: dict[str, Any] = field(default_factory=dict)  # TimingPlan fields

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunWorkerConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def exit_worker(code: int) -> NoReturn:
    """End a worker process at once, skipping the interpreter's teardown.

    Everything a worker owes its supervisor is already written (events go out synchronously, records with
    them); what teardown would still do is unload torch, dynamo and the compile pools, which took ~2.5 s of
    wall time per worker here (2026-12-05), paid by every run, gate and doctor worker at its stop.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
