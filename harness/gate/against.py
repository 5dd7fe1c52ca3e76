"""`gate --against GIT_REF`: the base commit's and the working tree's implementations, interleaved.

The base is checked out in a temporary ``git worktree`` (removed afterwards). Two gate workers serve
one tree each (cwd and PYTHONPATH at that tree); the supervisor alternates them round by round
(A B, B A, ...) with the same number of calls per sample, so machine drift hits both sides alike and
the per-round ratio new/base of the *same* implementation is what the gate tests (METHOD.md 2-3).
Flagged cases are re-run on the same workers and must regress again.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twinbench.harness import SOURCE_ROOT as ROOT
from twinbench.harness.core.errors import UsageError

# Paired signed-rank test on per-round log ratios: on this box (calibrate, 200 A/A comparisons each) it
# caught 60% of 5% slowdowns vs Mann-Whitney's 37%, both with 0 confirmed false alarms.
DEFAULT_TEST = "wilcoxon"
DEFAULT_THRESHOLD = 0.02
DEFAULT_ROUNDS = 41        # the median ratio's noise falls as 1/sqrt(rounds); see docs/reports-and-gate.md
DEFAULT_BLOCK_MS = 5.0
# Flagged cases are re-measured with this many times the rounds: the re-run decides, corrected across
# every compared case, so it needs the power (docs/reports-and-gate.md, "two stages").
CONFIRM_ROUNDS_FACTOR = 3
# One thread per CPU worker by default: measured on the shared 2-core box (load ~8), the A/A median
# ratio of 10 comparisons had CV 0.16 with 2 threads and 0.038 with 1 (docs/reports-and-gate.md).
DEFAULT_CPU_THREADS = 1


class WorkerError(Exception):
    pass


class GateWorker:
    """One gate_worker process serving the tree at ``root``."""

    def __init__(self, root: Path, device: str, plugins: list[str], log_path: Path, timeout: float,
                 threads: int | None = None, cpus: list[int] | None = None):
        self.root = Path(root).resolve()
        self.timeout = timeout
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(self.root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                                if p and Path(p).resolve() != ROOT])
        env["PYTHONUNBUFFERED"] = "1"
        backend = "cpu" if device == "cpu" else "gpu"
        if backend == "cpu":
            # The idle side's OpenMP threads must not spin-wait while the other side is timed.
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            threads = threads or DEFAULT_CPU_THREADS
        elif os.environ.get("TWINBENCH_USER_TRITON_INTERPRET") != "1":
            env.pop("TRITON_INTERPRET", None)  # compiled Triton on GPUs, as the run workers
        self.threads, self.cpus = threads, cpus
        config = {"device": device, "backend": backend, "plugins": plugins, "threads": threads, "cpus": cpus}
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "a", encoding="utf-8")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "harness" / "gate" / "worker.py"), json.dumps(config)],
                                     cwd=str(self.root), env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, start_new_session=True)
        self.buffer = ""
        self.fingerprint: dict[str, Any] = {}

    def ready(self) -> GateWorker:
        """Wait for the worker's hello (started separately so both sides import torch in parallel)."""
        hello = self._read()
        self.fingerprint = hello.get("fingerprint") or {}
        served = Path(hello.get("harness", "")).resolve()
        if served.parent != self.root:
            self.stop()
            raise WorkerError(f"the worker for {self.root} imported harness from {served.parent}")
        return self

    def _read(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while "\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                raise WorkerError(f"worker for {self.root} sent nothing for {self.timeout:g}s")
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536).decode("utf-8", "replace")
                if not chunk:
                    code = self.proc.wait(timeout=30)
                    raise WorkerError(f"worker for {self.root} exited with code {code} (log: {self.log.name})")
                self.buffer += chunk
        line, self.buffer = self.buffer.split("\n", 1)
        return json.loads(line)

    def request(self, **msg: Any) -> dict[str, Any]:
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise WorkerError(f"worker for {self.root} is gone (log: {self.log.name})") from exc
        return self._read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "stop"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except Exception:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


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

    def prepare(self, item: Item, *, parity: bool = False, granularity: int = 1) -> dict[str, Any]:
        """Prepare both sides; returns {"ok", "why", "missing", "parity"} (parity judged on the head)."""
        msg = {"op": "prepare", "key": item.key, "suite": item.suite, "params": item.params, "impl": item.impl,
               "mode": item.mode, "seed": self.seed}
        head = self.head.request(**msg, parity=parity)
        base = self.base.request(**msg, parity=False)
        out = {"ok": bool(head.get("ok") and base.get("ok")), "parity": head.get("parity"),
               "missing": bool(base.get("missing")), "why": ""}
        if not head.get("ok"):
            out["why"] = f"new: {head.get('why')}"
        elif not base.get("ok"):
            out["why"] = f"base: {base.get('why')}"
        if out["ok"]:
            per_call = max(head["per_call_ms"], base["per_call_ms"], 1e-6)
            n = max(1, math.ceil(self.block_ms / per_call))
            self.numbers[item.key] = granularity * math.ceil(n / granularity)
        return out

    def measure(self, item: Item, *, extra_fraction: float = 0.0,
                rounds: int | None = None) -> tuple[list[float], list[float]]:
        """Interleaved samples (base, head); ``extra_fraction`` of extra calls on the head = a planted slowdown."""
        number = self.numbers[item.key]
        extra = round(extra_fraction * number)
        base_ms: list[float] = []
        head_ms: list[float] = []
        for r in range(rounds or self.rounds):
            sides = [(self.base, base_ms, 0), (self.head, head_ms, extra)]
            for worker, sink, add in (sides if r % 2 == 0 else reversed(sides)):
                reply = worker.request(op="time", key=item.key, number=number, extra=add, clock=self.clock)
                if not reply.get("ok"):
                    raise WorkerError(f"{item.key}: {reply.get('why')}")
                sink.append(reply["ms"])
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


def resolve_ref(ref: str) -> str:
    done = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0 or not done.stdout.strip():
        raise UsageError(f"--against {ref!r}: not a commit in {ROOT}")
    return done.stdout.strip()


@contextlib.contextmanager
def base_worktree(ref: str) -> Iterator[tuple[Path, str]]:
    """Check out ``ref`` in a temporary worktree; always removed, even on errors."""
    sha = resolve_ref(ref)
    tmp = Path(tempfile.mkdtemp(prefix="twinbench-base-"))
    path = tmp / "tree"
    added = subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(path), sha], cwd=ROOT,
                           capture_output=True, text=True)
    if added.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"cannot check out {ref} in a worktree: {added.stderr.strip()[:200]}")
    try:
        yield path, sha
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True)


def plan_items(args, modes: tuple[str, ...] = ("fwd", "fwdbwd")) -> list[Item]:
    """The working tree's selection (suites, --impl, --case, --profile); untimed suites are left out."""
    from twinbench.harness.core import devices, registry
    from twinbench.harness.run.runner import RunOptions, plan_tasks

    registry.load_plugins([str(Path(p).resolve()) for p in args.plugin])
    device = devices.find(args.device)
    options = RunOptions(suites=list(args.suites), impls=list(args.impl), cases=list(args.case),
                         profile=args.profile)
    items = []
    for suite, tasks in plan_tasks(options):
        if not suite.timed:
            continue
        for task in tasks:
            for name in task.impls:
                if args.impl and name not in args.impl:
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


def shared_cpus(args, threads: int | None) -> list[int] | None:
    """The CPUs both workers are pinned to (the same ones), or None (not pinned).

    Why: unpinned, each worker migrates between vCPUs on its own, and on a VM the vCPUs run at different
    speeds (neighbours, frequency): each worker's samples jump between levels ~20% apart for ~10 rounds at a
    time, independently, so the per-round ratio does not cancel them. Measured on the idle 2-core box
    (attention/sdpa, 4 cases x 20 comparisons of 31 rounds): SD of the median log ratio 0.06-0.12 unpinned,
    0.006-0.016 with both workers on one CPU. The workers take turns, so sharing CPUs costs nothing.
    """
    if getattr(args, "no_pin", False) or args.device != "cpu" or not hasattr(os, "sched_getaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    want = max(1, threads or DEFAULT_CPU_THREADS)
    return allowed[-want:] if len(allowed) >= want else allowed


def clock_for(args) -> str:
    """CPU: process CPU time by default (a shared box's scheduling noise drops out); GPUs: device events."""
    clock = getattr(args, "clock", None) or ("process" if args.device == "cpu" else "wall")
    if clock not in ("process", "wall"):
        raise UsageError("--clock must be process or wall")
    return clock


def _check_rounds(args) -> int:
    rounds = args.rounds or DEFAULT_ROUNDS
    if rounds < 7:
        raise UsageError("--rounds must be >= 7 (the exact Mann-Whitney test needs 7 samples per side)")
    return rounds


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


def run_gate(args, config) -> dict[str, Any]:
    from twinbench.harness.gate import stats as gate

    rounds = _check_rounds(args)
    resolve_ref(args.against)  # a bad ref fails before anything is loaded
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="twinbench-gate-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    with terminate_as_interrupt(), base_worktree(args.against) as (base_root, sha):
        plugins = [str(Path(p).resolve()) for p in args.plugin]
        cpus = shared_cpus(args, args.threads)
        base = GateWorker(base_root, args.device, [_in_tree(p, base_root) for p in plugins],
                          out_dir / "gate-base.log", args.timeout, args.threads, cpus)
        head = GateWorker(ROOT, args.device, plugins, out_dir / "gate-head.log", args.timeout, args.threads, cpus)
        pair = Pair(base, head, rounds, args.block_ms or DEFAULT_BLOCK_MS, clock=clock_for(args))
        try:
            items = plan_items(args)  # while the workers import torch
            base.ready()
            head.ready()
            diff = _fingerprint_note(base.fingerprint, head.fingerprint)
            cases, parity_failures = compare_items(pair, items, config, parity=not getattr(args, "no_parity", False))
            gate.screen(cases, config)
            flagged = [c for c in cases if c["verdict"] == "regression"]
            by_key = {i.key: i for i in items}
            rerun = []
            for c in flagged:
                item = by_key[f"{c['suite']}|{c['case']}|{c['impl']}|{c['mode']}"]
                base_ms, head_ms = pair.measure(item, rounds=CONFIRM_ROUNDS_FACTOR * rounds)
                rerun.append(dict(c, **gate.compare_samples(base_ms, head_ms, paired=True, test=config.test,
                                                            n_boot=config.n_boot, seed=config.seed + 1,
                                                            name=item.key)))
            gate.confirm(cases, rerun, config, family=sum(c.get("p_value") is not None for c in cases))
        finally:
            pair.stop()
    note = (f"base {args.against} = {sha[:12]}, head = working tree; {rounds} interleaved rounds per case, "
            f"{pair.clock} clock, " + (f"both workers pinned to CPU(s) {cpus}" if cpus else "workers not pinned"))
    if flagged:
        note += (f"; {len(flagged)} flagged case(s) re-run for confirmation with {CONFIRM_ROUNDS_FACTOR * rounds} "
                 f"rounds, corrected across all compared cases")
    if diff:
        note += f"; {diff}"
    return gate.summarize(cases, parity_failures, config, mode="against",
                          mode_text=f"--against {args.against} (interleaved)", note=note)


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
