"""`gate --against GIT_REF`: the base commit's and the working tree's implementations, interleaved.

The base is checked out in a temporary ``git worktree`` (removed afterwards). Two gate workers serve
one tree each (cwd and PYTHONPATH at that tree); the supervisor alternates them round by round
(A B, B A, ...) with the same number of calls per sample, so machine drift hits both sides alike and
the per-round ratio new/base of the *same* implementation is what the gate tests (docs/method.md §2, §4).
Flagged cases are re-measured in looks, each on a fresh pair of worker processes, and must regress on the
look means (harness/gate/stats.py, confirm_sequentially).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from twinbench.harness import SOURCE_ROOT as ROOT
from twinbench.harness.core.errors import UsageError
from twinbench.harness.gate.worker import GateWorkerConfig
from twinbench.harness.run.process import (
    DEFAULT_GATE_CPU_THREADS,
    Message,
    Prepare,
    Prepared,
    Ready,
    Time,
    Timed,
    WorkerFailed,
    WorkerKind,
    WorkerProcess,
    worker_environment,
)

# Paired signed-rank test on per-round log ratios: in calibration it caught more planted 5% slowdowns than
# Mann-Whitney at the same (zero) confirmed false alarms (docs/method.md §4; numbers in §7).
DEFAULT_TEST = "wilcoxon"
DEFAULT_THRESHOLD = 0.02
DEFAULT_ROUNDS = 42        # the median ratio's noise falls as 1/sqrt(rounds); see docs/reports-and-gate.md
# (even: the ratio is taken over two-round blocks, stats.balanced_log_ratios, and an odd last round is unused)
DEFAULT_BLOCK_MS = 5.0
CLOCKS = ("process", "wall")


@dataclass(frozen=True)
class Selection:
    """What to compare: the working tree's suites, impls and cases on one device."""

    suites: list[str] = field(default_factory=list)
    impls: list[str] = field(default_factory=list)
    cases: list[str] = field(default_factory=list)
    profile: str = "quick"
    device: str = "cpu"
    plugins: list[str] = field(default_factory=list)  # absolute paths


@dataclass(frozen=True)
class Measurement:
    """How the two workers measure; validated by the CLI (rounds >= 7, a known clock)."""

    rounds: int = DEFAULT_ROUNDS
    block_ms: float = DEFAULT_BLOCK_MS
    threads: int | None = None
    clock: str = "process"
    pin: bool = True
    timeout: float = 300.0
    triton_interpret: bool = False  # the user asked for the Triton interpreter on GPUs too


@dataclass(frozen=True)
class GateOptions:
    """`gate --against`'s options; built by the CLI only."""

    against: str
    selection: Selection
    measurement: Measurement
    out: Path | None = None
    parity: bool = True
    calibration: Path | None = None  # default: <calibration_dir>/<head fingerprint>.calibration.json, if any
    calibration_dir: Path = Path("baselines")


def check_rounds(rounds: int | None) -> int:
    rounds = rounds or DEFAULT_ROUNDS
    if rounds < 7:
        raise UsageError("--rounds must be >= 7 (the exact Mann-Whitney test needs 7 samples per side)")
    return rounds


def all_threads() -> int:
    """`--threads all`: every CPU this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def clock_for(device: str, clock: str | None, threads: int | None = None) -> str:
    """CPU, one thread: process CPU time by default (a shared box's scheduling noise drops out).
    CPU, several threads, and GPUs: the wall clock (device events on GPUs).

    Why the wall clock with threads: CPU time sums over threads, so a kernel that stops splitting its work
    across threads costs the same CPU time and the process clock cannot see it; the wall clock can."""
    several = device == "cpu" and (threads or DEFAULT_GATE_CPU_THREADS) > 1
    clock = clock or ("process" if device == "cpu" and not several else "wall")
    if clock not in CLOCKS:
        raise UsageError("--clock must be process or wall")
    if clock == "process" and several:
        raise UsageError("--clock process sums CPU time over threads and cannot see lost parallelism: "
                         "use the wall clock (the default) with --threads > 1")
    return clock


def device_backend(name: str) -> str:
    """The backend behind a device name; the CPU needs no detection, so its workers start without torch here."""
    if name == "cpu":
        return "cpu"
    from twinbench.harness.core import devices

    return devices.find(name).backend


class GateWorker:
    """One gate worker (harness/gate/worker.py from the head) serving the tree at ``root``."""

    def __init__(self, root: Path, device: str, plugins: list[str], log_path: Path, measurement: Measurement,
                 cpus: list[int] | None = None):
        self.root = Path(root).resolve()
        self.timeout = measurement.timeout
        setup = worker_environment(WorkerKind.GATE, device_backend(device), device, root=self.root, head_root=ROOT,
                                   threads=measurement.threads, triton_interpret=measurement.triton_interpret)
        self.threads, self.cpus, self.env, self.log_path = setup.threads, cpus, setup.env, log_path
        self.config = GateWorkerConfig(device=device, plugins=plugins, threads=setup.threads, cpus=cpus)
        self.fingerprint: dict[str, Any] = {}
        self.layout = random.Random()  # the environment pad of each process (see _spawn), seeded by the OS
        self.process = self._spawn(hash_seed=0)

    def _spawn(self, hash_seed: int) -> WorkerProcess:
        # Both workers of a pair get the same hash seed: string hashing, and with it the layout of every dict
        # and set, is then the same in both processes instead of a random per-process difference.
        # Each process gets an environment padded by a random 0-4095 bytes: the environment's size moves the
        # initial stack, and the stack's alignment can make one process steadily faster on a kernel than its
        # twin (Mytkowicz et al., "Producing wrong data without doing anything obviously wrong", 2009). The
        # base and head trees differ in paths, so without the pad such an offset would be the same on every
        # fresh pair (no number of looks averages it out); with it, it is a per-process bias drawn anew for
        # each process, which the looks of the confirmation are built to average (stats.MIN_LOOKS).
        pad = "x" * self.layout.randrange(4096)
        return WorkerProcess([sys.executable, str(ROOT / "harness" / "gate" / "worker.py")],
                             self.config.to_json(), cwd=self.root,
                             env=dict(self.env, PYTHONHASHSEED=str(hash_seed), TWINBENCH_LAYOUT_PAD=pad),
                             log_path=self.log_path, label=f"worker for {self.root}")

    def restart(self, hash_seed: int) -> None:
        """Stop this worker and start a fresh process on the same tree (call :meth:`ready` next)."""
        self.stop()
        self.process = self._spawn(hash_seed)

    def ready(self) -> GateWorker:
        """Wait for the worker's hello (started separately so both sides import torch in parallel)."""
        hello = self.process.next_event(self.timeout)
        if not isinstance(hello, Ready):
            self.stop()
            raise WorkerFailed(f"worker for {self.root} sent {hello.TYPE!r} before it was ready")
        self.fingerprint = hello.fingerprint
        served = Path(hello.harness).resolve()
        if served.parent != self.root:
            self.stop()
            raise WorkerFailed(f"the worker for {self.root} imported harness from {served.parent}")
        return self

    def request(self, message: Message) -> Any:
        return self.process.request(message, self.timeout)

    def prepare(self, message: Prepare) -> Prepared:
        return self.request(message)

    def time(self, message: Time) -> Timed:
        return self.request(message)

    def stop(self) -> None:
        self.process.stop(grace=10)


@dataclass
class Item:
    """One (suite, case, impl, mode) to compare."""

    suite: str
    case: str
    params: dict[str, Any]
    impl: str
    mode: str
    key: str = field(init=False)

    def __post_init__(self) -> None:
        self.key = f"{self.suite}|{self.case}|{self.impl}|{self.mode}"

    def as_case(self) -> dict[str, Any]:
        return {"suite": self.suite, "case": self.case, "impl": self.impl, "mode": self.mode}


class Pair:
    """Base and head workers timed alternately: A B, B A, A B ... with equal calls per sample."""

    def __init__(self, base: GateWorker, head: GateWorker, rounds: int, block_ms: float, seed: int = 0,
                 clock: str = "wall"):
        self.base, self.head = base, head
        self.rounds, self.block_ms, self.seed, self.clock = rounds, block_ms, seed, clock
        self.numbers: dict[str, int] = {}
        self.look: int | None = None  # the confirmation look the workers were started for (None: the first run)
        self.ready_keys: set[str] = set()  # items prepared on the workers' current processes

    def prepare(self, item: Item, *, parity: bool = False, granularity: int = 1) -> dict[str, Any]:
        """Prepare both sides; returns {"ok", "why", "missing", "parity"} (parity judged on the head)."""
        msg = self._prepare_message(item)
        head = self.head.prepare(replace(msg, parity=parity))
        base = self.base.prepare(msg)
        out = {"ok": head.ok and base.ok, "parity": head.parity, "missing": base.missing, "why": ""}
        if not head.ok:
            out["why"] = f"new: {head.why}"
        elif not base.ok:
            out["why"] = f"base: {base.why}"
        if out["ok"]:
            self.ready_keys.add(item.key)
            per_call = max(head.per_call_ms, base.per_call_ms, 1e-6)
            n = max(1, math.ceil(self.block_ms / per_call))
            self.numbers[item.key] = granularity * math.ceil(n / granularity)
        return out

    def _prepare_message(self, item: Item) -> Prepare:
        return Prepare(key=item.key, suite=item.suite, params=item.params, impl=item.impl, mode=item.mode,
                       seed=self.seed)

    def refresh(self, item: Item, look: int) -> None:
        """Before confirmation look ``look`` at ``item``: a fresh pair of worker processes for the look (the
        first call of a look restarts both, with the hash seed ``look + 1`` on both sides), ``item`` prepared
        on them. A process can be a few percent slower than its twin on a case for its whole life
        (stats.MIN_LOOKS): on fresh processes such a bias is drawn anew, so each look is one independent
        observation of the difference."""
        if look != self.look:
            for worker in (self.base, self.head):
                worker.restart(hash_seed=look + 1)
            for worker in (self.base, self.head):  # both import torch at once
                worker.ready()
            self.look, self.ready_keys = look, set()
        self._ensure_prepared(item)

    def _ensure_prepared(self, item: Item) -> None:
        """Prepare ``item`` again on processes started since it was prepared (same inputs, calls per sample
        unchanged): after a look's restart, any later measurement (calibrate's next group) finds it ready."""
        if item.key in self.ready_keys:
            return
        msg = self._prepare_message(item)
        for worker in (self.head, self.base):
            reply = worker.prepare(msg)
            if not reply.ok:
                raise WorkerFailed(f"{item.key}: {reply.why}")
        self.ready_keys.add(item.key)

    def sample(self, worker: GateWorker, item: Item, extra: int = 0) -> float:
        """One sample of ``item`` on one side: ms per call (``extra`` calls on top: a planted slowdown)."""
        reply = worker.time(Time(key=item.key, number=self.numbers[item.key], extra=extra, clock=self.clock))
        if not reply.ok:
            raise WorkerFailed(f"{item.key}: {reply.why}")
        return reply.ms

    def measure(self, item: Item, *, extra_fraction: float = 0.0,
                rounds: int | None = None) -> tuple[list[float], list[float]]:
        """Interleaved samples (base, head); ``extra_fraction`` of extra calls on the head = a planted slowdown."""
        self._ensure_prepared(item)
        extra = round(extra_fraction * self.numbers[item.key])
        base_ms: list[float] = []
        head_ms: list[float] = []
        for r in range(rounds or self.rounds):
            sides = [(self.base, base_ms, 0), (self.head, head_ms, extra)]
            for worker, sink, add in (sides if r % 2 == 0 else reversed(sides)):
                sink.append(self.sample(worker, item, add))
        return base_ms, head_ms

    def stop(self) -> None:
        self.base.stop()
        self.head.stop()


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a CI timeout) unwinds like Ctrl-C, so workers are stopped and the worktree removed."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def resolve_ref(ref: str, repo: Path = ROOT, option: str = "--against") -> str:
    done = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], cwd=repo,
                          capture_output=True, text=True)
    if done.returncode != 0 or not done.stdout.strip():
        raise UsageError(f"{option} {ref!r}: not a commit in {repo}")
    return done.stdout.strip()


@contextlib.contextmanager
def base_worktree(ref: str, repo: Path = ROOT) -> Iterator[tuple[Path, str]]:
    """Check out ``ref`` of ``repo`` in a temporary worktree; always removed, even on errors (and Ctrl-C)."""
    sha = resolve_ref(ref, repo)
    tmp = Path(tempfile.mkdtemp(prefix="twinbench-base-"))
    path = tmp / "tree"
    added = subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(path), sha], cwd=repo,
                           capture_output=True, text=True)
    if added.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"cannot check out {ref} in a worktree: {added.stderr.strip()[:200]}")
    try:
        yield path, sha
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=repo, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=repo, capture_output=True)


def plan_items(selection: Selection, modes: tuple[str, ...] = ("fwd", "fwdbwd")) -> list[Item]:
    """The working tree's selection (suites, --impl, --case, --profile); untimed suites are left out."""
    from twinbench.harness.core import devices, registry
    from twinbench.harness.run.plan import RunOptions, plan_tasks

    registry.load_plugins(selection.plugins)
    device = devices.find(selection.device)
    options = RunOptions(suites=list(selection.suites), impls=list(selection.impls), cases=list(selection.cases),
                         profile=selection.profile)
    items = []
    for suite, tasks in plan_tasks(options):
        if not suite.timed:
            continue
        for task in tasks:
            for name in task.impls:
                if selection.impls and name not in selection.impls:
                    continue
                impl = registry.IMPLS[(suite.name, name)]
                if impl.timing_excluded(device):
                    continue
                for mode in modes:
                    if mode == "fwdbwd" and not impl.backward:
                        continue
                    items.append(Item(suite.name, task.case_id, task.params, name, mode))
    if not items:
        raise UsageError("nothing to gate: the selection has no timed implementation on this device")
    return items


def shared_cpus(device: str, pin: bool, threads: int | None) -> list[int] | None:
    """The CPUs both workers are pinned to (the same ones), or None (not pinned).

    Why: unpinned, each worker migrates between vCPUs on its own, and on a VM the vCPUs run at different
    speeds (neighbours, frequency): each worker's samples jump between levels for rounds at a time,
    independently, so the per-round ratio does not cancel them; pinned, the spread of the median log ratio
    falls several-fold (docs/method.md §6; numbers in §7). The workers take turns, so sharing CPUs costs nothing.
    """
    if not pin or device != "cpu" or not hasattr(os, "sched_getaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    want = max(1, threads or DEFAULT_GATE_CPU_THREADS)
    return allowed[-want:] if len(allowed) >= want else allowed


def compare_items(pair: Pair, items: list[Item], config, *, parity: bool) -> tuple[list[dict], list[dict]]:
    """Prepare and measure every item; returns (gate cases, parity failures)."""
    from twinbench.harness.gate import stats as gate

    cases, parity_failures, parity_seen = [], [], set()
    for item in items:
        check = parity and (item.suite, item.case, item.impl) not in parity_seen
        prep = pair.prepare(item, parity=check)
        if check:
            parity_seen.add((item.suite, item.case, item.impl))
            ok, why = prep.get("parity") or (True, "")
            if not ok:
                parity_failures.append({"suite": item.suite, "case": item.case, "impl": item.impl,
                                        "status": "wrong", "reason": why})
        c = dict(item.as_case(), device=pair.head.fingerprint.get("name", ""))
        if not prep["ok"]:
            c.update(verdict="new" if prep["missing"] else "not compared", note=prep["why"])
            cases.append(c)
            continue
        base_ms, head_ms = pair.measure(item)
        c.update(gate.compare_samples(base_ms, head_ms, paired=True, test=config.test, n_boot=config.n_boot,
                                      seed=config.seed, name=item.key),
                 base_samples_ms=base_ms, head_samples_ms=head_ms, calls_per_sample=pair.numbers[item.key])
        cases.append(c)
    return cases, parity_failures


def gate_items(pair: Pair, items: list[Item], config, *, parity: bool,
               pair_noise: dict[str, float] | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """The interleaved gate on one pair of workers: compare, screen, then confirm the flagged cases
    sequentially, each look on a fresh pair of processes (stats.confirm_sequentially; docs/method.md §4).
    ``pair_noise``: per-item between-pair sd priors from a calibration (stats.DEFAULT_PAIR_SD otherwise).
    Returns (gate cases with their final verdicts, parity failures, the cases the screen flagged)."""
    from twinbench.harness.gate import stats as gate

    cases, parity_failures = compare_items(pair, items, config, parity=parity)
    gate.screen(cases, config, pair_noise)
    flagged = [c for c in cases if c["verdict"] == "regression"]
    by_key = {i.key: i for i in items}

    def rerun(c: dict[str, Any], look: int) -> tuple[list[float], list[float]]:
        item = by_key[f"{c['suite']}|{c['case']}|{c['impl']}|{c['mode']}"]
        pair.refresh(item, look)
        return pair.measure(item)

    gate.confirm_sequentially(cases, config, rerun, pair_noise=pair_noise)
    return cases, parity_failures, flagged


def calibrated_pair_noise(given: dict[str, Any] | None, fingerprint: dict[str, Any], *, path: Path | None = None,
                          folder: Path = Path("baselines")) -> tuple[dict[str, float] | None, str]:
    """Per-item between-pair sd priors for the gate from a `calibrate --save` file, and a note saying where
    they came from. ``given``: the file the user named (loaded and validated before anything started, at
    ``path``); else ``<folder>/<fingerprint id>.calibration.json`` when it exists. A file of another
    fingerprint (another machine, thread count or clock) is not used: its priors describe other processes.
    The gate works without one (stats.DEFAULT_PAIR_SD for every item)."""
    from twinbench.harness.gate import stats as gate
    from twinbench.harness.gate.stored import load_calibration

    fp_id = str(fingerprint.get("id", ""))
    assumed = f"between-pair sd assumed {gate.DEFAULT_PAIR_SD:.0%} for every item"
    if given is None:
        path = folder / f"{fp_id or 'unknown'}.calibration.json"
        given = load_calibration(path)
        if given is None:
            return None, f"no calibration: {assumed}"
    if str((given.get("fingerprint") or {}).get("id", "")) != fp_id:
        return None, f"calibration {path} is for another fingerprint: {assumed}"
    priors = ((given.get("against") or {}).get("pair_noise") or {}).get("items") or {}
    if not priors:
        return None, f"calibration {path} has no between-pair sd priors: {assumed}"
    return ({str(k): float(v) for k, v in priors.items()},
            f"between-pair sd priors for {len(priors)} item(s) from {path} (others {gate.DEFAULT_PAIR_SD:.0%})")


def run_gate(options: GateOptions, config) -> dict[str, Any]:
    from twinbench.harness.gate import stats as gate

    sel, m = options.selection, options.measurement
    resolve_ref(options.against)  # a bad ref fails before anything is loaded
    given = None
    if options.calibration is not None:  # a named calibration must be readable before anything starts
        from twinbench.harness.gate.stored import load_calibration

        given = load_calibration(options.calibration)
        if given is None:
            raise UsageError(f"--calibration {options.calibration}: no such file")
    out_dir = options.out or Path(tempfile.mkdtemp(prefix="twinbench-gate-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    with terminate_as_interrupt(), base_worktree(options.against) as (base_root, sha):
        cpus = shared_cpus(sel.device, m.pin, m.threads)
        base = GateWorker(base_root, sel.device, [_in_tree(p, base_root) for p in sel.plugins],
                          out_dir / "gate-base.log", m, cpus)
        head = GateWorker(ROOT, sel.device, sel.plugins, out_dir / "gate-head.log", m, cpus)
        pair = Pair(base, head, m.rounds, m.block_ms, clock=m.clock)
        try:
            items = plan_items(sel)  # while the workers import torch
            base.ready()
            head.ready()
            diff = _fingerprint_note(base.fingerprint, head.fingerprint)
            pair_noise, prior_note = calibrated_pair_noise(given, head.fingerprint, path=options.calibration,
                                                             folder=options.calibration_dir)
            cases, parity_failures, flagged = gate_items(pair, items, config, parity=options.parity,
                                                         pair_noise=pair_noise)
        finally:
            pair.stop()
    note = (f"base {options.against} = {sha[:12]}, head = working tree; {m.rounds} interleaved rounds per case, "
            f"{pair.clock} clock, " + (f"both workers pinned to CPU(s) {cpus}" if cpus else "workers not pinned"))
    if flagged:
        looks = sum(len(c.get("looks", [])) for c in cases)
        note += (f"; {len(flagged)} flagged case(s) re-run for confirmation in {looks} look(s) of {m.rounds} "
                 f"rounds (at most {len(gate.SPENDING)} per case, each on a fresh pair of processes; one-sided "
                 f"test on the look means, alpha spent over looks and split over the flagged cases)")
    note += f"; {prior_note}"
    if diff:
        note += f"; {diff}"
    return gate.summarize(cases, parity_failures, config, mode="against",
                          mode_text=f"--against {options.against} (interleaved)", note=note)


def _in_tree(plugin: str, base_root: Path) -> str:
    """A plugin file inside the repository is the base's own version in the base (when it exists there)."""
    path = Path(plugin)
    try:
        inside = base_root / path.relative_to(ROOT)
    except ValueError:
        return plugin
    return str(inside) if inside.exists() else plugin


def _fingerprint_note(a: dict[str, Any], b: dict[str, Any]) -> str:
    from twinbench.harness.core.devices import fingerprint_diff

    diff = fingerprint_diff(a, b)
    return f"base and head workers differ in {'; '.join(diff)}" if diff else ""
