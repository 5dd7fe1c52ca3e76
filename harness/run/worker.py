"""The per-device worker process: parity, interleaved timing and memory for one case at a time.

Started by :mod:`twinbench.harness.run.runner` through :class:`~twinbench.harness.run.process.WorkerProcess`
as ``python -m twinbench.harness.run.worker CONFIG``. It reads :class:`RunCase` requests on stdin and sends
events on the pipe named in the config (the protocol in :mod:`twinbench.harness.run.process`). Before every
risky step it announces :class:`Begin` (impl, phase), so when this process segfaults, aborts or hangs the
supervisor knows whom to blame. Its stdout/stderr go to a log file (libraries print).

Hostile impls are contained here too: every impl call (probe, parity, timing, backward, memory) runs
inside :func:`~twinbench.harness.run.torch_state.kept`, so process-global torch state an impl changes is
put back before anything else runs and named on its record (``state_changed``); processes an impl leaves
behind are killed after its case (docs/method.md §6).
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import json
import os
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from twinbench.harness.core.errors import failure_reason
from twinbench.harness.run.process import (
    Begin,
    CaseDone,
    CaseError,
    Ceilings,
    EventWriter,
    Fingerprint,
    Heartbeat,
    Probed,
    ProbeSuite,
    Ready,
    RecordDone,
    RunCase,
    RunWorkerConfig,
    descendants,
    die_with_parent,
    exit_worker,
    kill_pids,
    pin_worker_device,
    requests,
)


class CeilingBook:
    """The device's ceilings per CPU thread count, measured in this worker under the thread count the cases
    they divide run with (a case's ``threads`` parameter, else the worker's), when first needed and again on
    request (a share above 100%: :func:`measure_timing`); each measurement goes to the journal
    (docs/method.md §2)."""

    def __init__(self, device: Any, fingerprint: str, events: EventWriter | None, enabled: bool,
                 cached: dict[str, Any] | None = None, measure: Any = None):
        from twinbench.harness.core.timing import measure_ceilings

        self.device, self.fingerprint, self.events, self.enabled = device, fingerprint, events, enabled
        self.measure = measure or measure_ceilings
        self.fixed: dict[str, Any] | None = None  # given ceilings, used whatever the thread count (fixed_ceilings)
        self.by_threads: dict[int, dict[str, Any]] = {}
        if cached:  # from a --resume'd journal: valid for the thread count it was measured under
            self.by_threads[int(cached.get("threads") or 0)] = cached

    @classmethod
    def fixed_ceilings(cls, device: Any, fingerprint: str, ceilings: dict[str, Any]) -> CeilingBook:
        """Ceilings given by the caller (a test, an embedding tool), never measured."""
        book = cls(device, fingerprint, None, False)
        book.fixed = ceilings
        return book

    def current(self) -> dict[str, Any]:
        """The ceilings for torch's current thread count (measured now if not yet)."""
        import torch

        if self.fixed is not None:
            return self.fixed
        threads = torch.get_num_threads()
        if threads not in self.by_threads:
            if not self.enabled:
                return {}
            return self.remeasure()
        return self.by_threads[threads]

    def remeasure(self) -> dict[str, Any]:
        import torch

        if self.fixed is not None:
            return self.fixed
        if not self.enabled:
            return {}
        if self.events is not None:
            self.events.send(Begin(impl="", phase="ceilings"))
        found = self.measure(self.device)
        self.by_threads[torch.get_num_threads()] = found
        if self.events is not None:
            self.events.send(Ceilings(fingerprint=self.fingerprint, ceilings=found))
        return found


@contextlib.contextmanager
def case_threads(case: Any) -> Iterator[None]:
    """Run a case under its ``threads`` parameter (torch's CPU thread count; 0 or absent: the worker's)."""
    import torch

    wanted = int(case.get("threads") or 0) if hasattr(case, "get") else 0
    before = torch.get_num_threads()
    if not wanted or wanted == before:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class CaseContext:
    """What every case of this worker shares."""

    device: Any
    fingerprint: str
    ceilings: CeilingBook  # a plain dict given here is used as fixed ceilings
    config: RunWorkerConfig

    def __post_init__(self) -> None:
        if not isinstance(self.ceilings, CeilingBook):
            object.__setattr__(self, "ceilings",
                               CeilingBook.fixed_ceilings(self.device, self.fingerprint, dict(self.ceilings)))


def _limit_memory(limit_bytes: int) -> None:
    """Cap the CPU worker's address space so a runaway allocation fails here instead of the machine."""
    if limit_bytes <= 0:
        return
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    except (ImportError, ValueError, OSError):
        pass


class StateLedger:
    """Which process-global torch state each impl changed; every impl call goes through it, so no impl's
    change reaches the next impl or case (an impl that set one thread made the reference 40x slower)."""

    def __init__(self) -> None:
        self.changed: dict[str, set[str]] = {}

    @contextlib.contextmanager
    def kept(self, impl_name: str) -> Iterator[None]:
        from twinbench.harness.run.torch_state import kept

        with kept(self.changed.setdefault(impl_name, set())):
            yield

    def guarded(self, impl):
        """A copy of ``impl`` whose every call restores the state it found (used where the harness calls an
        impl and the reference alternately, as the parity check does)."""
        fn, changed = impl.fn, self.changed.setdefault(impl.name, set())
        from twinbench.harness.run.torch_state import kept

        @functools.wraps(fn)
        def call(*args, **kwargs):
            with kept(changed):
                return fn(*args, **kwargs)

        return replace(impl, fn=call)

    def names(self, impl_name: str) -> list[str] | None:
        return sorted(self.changed[impl_name]) if self.changed.get(impl_name) else None


class RoundKeeper:
    """Timing's state guard: the snapshot is restored between blocks (outside the timed region), never
    around each call, so the guard adds nothing to what is timed; a change is blamed on the block's impl."""

    def __init__(self, ledger: StateLedger, events: EventWriter, mode: str):
        from twinbench.harness.run.torch_state import capture

        self.ledger, self.events, self.mode = ledger, events, mode
        self.before = capture()
        self.current: str | None = None

    def switch(self, impl_name: str | None) -> None:
        from twinbench.harness.run.torch_state import restore

        changed = restore(self.before)
        if self.current is not None:
            self.ledger.changed.setdefault(self.current, set()).update(changed)
        self.current = impl_name
        if impl_name is not None:
            self.events.send(Begin(impl=impl_name, phase=f"time-{self.mode}"))


# Helpers torch keeps for the whole process, not an impl's leftovers: inductor's compile-worker pool starts
# once and serves every later torch.compile; killing it after a case would break the next case's compiles.
KEEP_ACROSS_CASES = ("torch/_inductor/compile_worker",)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def leftover_processes() -> list[int]:
    """Processes this worker's impls started and left running (its descendants and process-group members),
    except torch's own long-lived helpers (KEEP_ACROSS_CASES) and theirs."""
    found = descendants(os.getpid())
    keep: set[int] = set()
    for pid in found:
        if any(marker in _cmdline(pid) for marker in KEEP_ACROSS_CASES):
            keep.add(pid)
            keep.update(descendants(pid))
    return [p for p in found if p not in keep]




def _device(config: RunWorkerConfig):
    """The one device this worker sees (visibility narrowed by the supervisor), under the name users typed."""
    from twinbench.harness.core import devices

    backend = config.backend
    for dev in devices.detect():
        if dev.backend == backend:
            return replace(dev, name=config.device)
    raise RuntimeError(f"worker sees no {backend} device")


def time_callables(impl, inputs, device, with_backward: bool, ledger: StateLedger | None = None):
    """fwd and (optionally) fwd+bwd callables over fixed inputs, as a training step would call them."""
    import torch
    from twinbench.harness.core.parity import leaves, make_grad_outputs, normalize_outputs, split_metrics

    prepared = leaves(inputs, None, None)
    leaves = [prepared.tensors[n] for n in prepared.grad]

    def fwd():
        return impl.fn(**prepared.tensors, **prepared.static)

    calls = {"fwd": fwd}
    if with_backward and leaves:
        with ledger.kept(impl.name) if ledger else contextlib.nullcontext():
            outs = normalize_outputs(split_metrics(fwd())[0])
        grads = make_grad_outputs(outs, 0)
        names = [n for n, o in outs.items() if n in grads and o.requires_grad]

        def fwdbwd():
            o = normalize_outputs(split_metrics(fwd())[0])
            torch.autograd.grad([o[n] for n in names], leaves, grad_outputs=[grads[n] for n in names],
                                allow_unused=True)

        if names:
            calls["fwdbwd"] = fwdbwd
    return calls


def run_case(task: RunCase, ctx: CaseContext, events: EventWriter) -> None:
    """One case: probe every wanted impl, check each runnable one's parity, time those that passed (with the
    reference), then send every record. Training loops (experiments) take their own path."""
    from twinbench.harness.core import registry

    if task.suite in registry.EXPERIMENTS:  # training loops: no inputs, no harness timing
        from twinbench.harness.run.experiment_case import run_experiment_case

        return run_experiment_case(task, ctx, events)
    started = time.perf_counter()
    kernel_case = KernelCase(task, ctx, events)
    with case_threads(kernel_case.case):
        runnable = kernel_case.runnable_impls()
        passed = kernel_case.check_parity_of(runnable)
        kernel_case.time(passed)
    kernel_case.send_records()
    events.send(CaseDone(seconds=time.perf_counter() - started))


class KernelCase:
    """The state of one kernel case in the worker: its impls, the records made so far, and the torch-state
    ledger (docs/method.md §6) that every impl call goes through."""

    def __init__(self, task: RunCase, ctx: CaseContext, events: EventWriter):
        from twinbench.harness.core import registry
        from twinbench.harness.core.case import Case

        self.task, self.ctx, self.events = task, ctx, events
        self.device, self.config = ctx.device, ctx.config
        self.suite = registry.get_suite(task.suite)
        self.case = Case.of(task.params)
        all_impls = registry.impls_for(self.suite.name)
        self.ref = next((i for i in all_impls if i.name == self.suite.reference), None)
        self.wanted = [i for i in all_impls if i.name in task.impls]
        self.records: dict[str, Any] = {}
        self.ledger = StateLedger()
        self.probed: dict[str, tuple[bool, str]] = {}

    def record(self, impl, status, reason: str = "", **measured: Any) -> None:
        from twinbench.harness.store.record import Record

        if impl.origin is not None:  # where the impl's code came from (registry.ImplOrigin)
            measured["meta"] = {**(measured.get("meta") or {}), "origin": impl.origin.to_json()}
        self.records[impl.name] = Record.new(
            suite=self.suite.name, case=self.case.id, params=self.case.as_dict(), device=self.device.name,
            fingerprint=self.ctx.fingerprint, impl=impl.name, tags=impl.tags, status=status, reason=reason,
            **measured)

    def probe(self, impl) -> tuple[bool, str]:
        """``available``/``supports`` announced as their own phase: a probe that hangs or crashes the worker
        is blamed on its impl alone (the supervisor bounds the phase, PROBE_TIMEOUT_S)."""
        if impl.name not in self.probed:
            self.events.send(Begin(impl=impl.name, phase="probe"))
            with self.ledger.kept(impl.name):
                self.probed[impl.name] = impl.can_run(self.case, self.device)
        return self.probed[impl.name]

    def runnable_impls(self) -> list:
        """The wanted impls that can run here; the others get their skipped (or excluded) record now."""
        from twinbench.harness.store.record import Status

        runnable = []
        for impl in self.wanted:
            if impl.name in self.task.exclude:  # decided by the supervisor after this impl killed a worker
                status, reason = self.task.exclude[impl.name]
                self.record(impl, Status(status), reason)
                continue
            ok, why = self.probe(impl)
            dtype = self.case.get("dtype")
            if not ok:
                self.record(impl, Status.SKIPPED, why)
            elif dtype and not self.device.supports_dtype(dtype):
                self.record(impl, Status.SKIPPED, f"{self.device.name} cannot compute in {dtype}")
            else:
                runnable.append(impl)
        ref = self.ref
        if ref is None:
            return self._skip_all(runnable, f"suite {self.suite.name} has no reference impl {self.suite.reference!r}")
        ref_ok, ref_why = self.probe(ref) if ref.name not in self.task.exclude else (False, "")
        if not ref_ok:
            return self._skip_all(runnable, f"reference cannot run here: {ref_why}")
        return runnable

    def _skip_all(self, impls: list, reason: str) -> list:
        from twinbench.harness.store.record import Status

        for impl in impls:
            self.record(impl, Status.SKIPPED, reason)
        return []

    def check_parity_of(self, runnable: list) -> list:
        """Each runnable impl against the reference (the reference itself first in the list); returns those
        that passed. A reference that fails takes the case's other impls with it, as skipped."""
        from twinbench.harness.core.devices import reference_device_in_worker
        from twinbench.harness.core.parity import check_parity
        from twinbench.harness.store.record import Status

        config = self.config
        reference_device = reference_device_in_worker(config.reference_device, config.device)
        passed = []
        for impl in runnable:
            self.events.send(Begin(impl=impl.name, phase="parity"))
            t0 = time.perf_counter()
            try:
                with self.ledger.kept(impl.name):  # also catches what a custom backward changed
                    verdict = check_parity(self.suite, self.ledger.guarded(impl), self.ledger.guarded(self.ref),
                                           self.case, self.device.torch_device, trials=config.trials,
                                           seed=config.seed, reference_device=reference_device)
            except Exception as exc:
                if impl.name == self.ref.name:
                    self._skip_all(runnable, f"reference failed: {failure_reason(exc)}")
                    self.record(impl, Status.CRASHED, failure_reason(exc))
                    return []
                self.record(impl, Status.CRASHED, failure_reason(exc),
                            meta={"traceback": traceback.format_exc()[-2000:]})
                continue
            self.record(impl, Status.OK if verdict.ok else Status.WRONG, "" if verdict.ok else verdict.reason(),
                        parity=verdict.to_json(), metrics=verdict.metrics or None,
                        duration_s=time.perf_counter() - t0)
            if verdict.ok:
                passed.append(impl)
        return passed

    def time(self, passed: list) -> None:
        """Interleaved timing of the impls that passed, with the reference (docs/method.md §2)."""
        from twinbench.harness.core.timing import TimingPlan

        config = self.config
        if not (config.timing and self.suite.timed and self.ref in passed):
            return
        job = TimingJob(suite=self.suite, case=self.case, device=self.device, reference=self.ref,
                        passed=tuple(passed), seed=config.seed, plan=TimingPlan(**config.plan),
                        ceilings=self.ctx.ceilings.current(), remeasure=self.ctx.ceilings.remeasure)
        for name, measured in measure_timing(job, self.events, self.ledger).items():
            self.records[name] = replace(self.records[name], **measured.fields())

    def send_records(self) -> None:
        """Every record, with the case's input metadata (judged records) and the torch state each impl changed."""
        from twinbench.harness.store.record import Status

        meta = None
        try:
            meta = self.suite.make_inputs(self.case, "cpu", self.config.seed).meta or None
        except Exception:
            pass
        for rec in self.records.values():
            if meta and rec.status in (Status.OK, Status.WRONG):
                rec = replace(rec, meta={**(rec.meta or {}), **{k: v for k, v in meta.items() if k != "metrics"}})
            rec = replace(rec, state_changed=self.ledger.names(rec.impl))
            self.events.send(RecordDone(record=rec.to_json()))


def probe_suite(task: ProbeSuite, ctx: CaseContext, events: EventWriter) -> None:
    """`twinbench list` in a worker: each impl's probe as its own phase, its answer as one event."""
    from twinbench.harness.core import registry

    ledger = StateLedger()
    for impl in registry.impls_for(task.suite):
        if impl.name in task.exclude:
            continue
        events.send(Begin(impl=impl.name, phase="probe"))
        with ledger.kept(impl.name):
            ok, why = impl.can_run(None, ctx.device)
        events.send(Probed(impl=impl.name, ok=ok, why=why, state_changed=ledger.names(impl.name) or []))
    events.send(CaseDone())


@dataclass(frozen=True)
class TimingJob:
    """One case's timing: the impls that passed parity, timed interleaved with the reference."""

    suite: Any
    case: Any
    device: Any
    reference: Any
    passed: tuple[Any, ...]
    seed: int
    plan: Any  # TimingPlan
    ceilings: dict[str, Any]  # measured under the thread count the case runs with
    remeasure: Any = None  # () -> fresh ceilings: called once when a share would read above 100%


@dataclass(frozen=True)
class Measured:
    """What timing adds to one impl's record."""

    timing: dict[str, Any]
    derived: dict[str, float | None] | None = None
    memory: dict[str, Any] | None = None

    def fields(self) -> dict[str, Any]:
        return {"timing": self.timing, "derived": self.derived, "memory": self.memory}




def measure_timing(job: TimingJob, events: EventWriter, ledger: StateLedger | None = None) -> dict[str, Measured]:
    """Interleaved fwd (and fwd+bwd) timing, derived throughput and peak memory per impl (docs/method.md §2-3)."""
    import torch
    from twinbench.harness.core.memory import peak_memory
    from twinbench.harness.core.timing import flops_ceiling, interleaved, round_ratios, throughput, timer_for

    suite, case, device, ref = job.suite, job.case, job.device, job.reference
    timer = timer_for(device)
    timed = [i for i in job.passed if not i.timing_excluded(device)]
    out = {impl.name: Measured(timing={"mode": timer.mode, "excluded": impl.timing_excluded(device)})
           for impl in job.passed if impl not in timed}
    if ref not in timed:
        return out
    ledger = ledger or StateLedger()
    inputs = suite.make_inputs(case, device.torch_device, job.seed)
    calls = {}
    for impl in timed:
        events.send(Begin(impl=impl.name, phase="timing-setup"))
        calls[impl.name] = time_callables(impl, inputs, device, impl.backward and ref.backward, ledger)
    flops = suite.flops(case) if suite.flops else {}
    nbytes = suite.bytes(case) if suite.bytes else {}
    dtype = case.get("dtype", "fp32")
    per_mode: dict[str, dict[str, Any]] = {}
    for mode in ("fwd", "fwdbwd"):
        fns = {name: c[mode] for name, c in calls.items() if mode in c}
        if ref.name not in fns:
            continue
        keeper = RoundKeeper(ledger, events, mode)
        per_mode[mode] = interleaved(timer, fns, job.plan, on_round=keeper.switch)
        keeper.switch(None)
    ceilings = job.ceilings

    def shares(impl_name: str):
        medians = {mode: stats[impl_name]["median_ms"] for mode, stats in per_mode.items() if impl_name in stats}
        return throughput(medians, flops, nbytes, dtype, ceilings)

    # A share above 100% means the ceiling under-measured (docs/method.md §2): measure again, next to this
    # case, once; what still exceeds the new ceilings is clipped and named in ``ceiling_too_low``.
    if job.remeasure is not None and any(shares(impl.name).ceiling_too_low for impl in timed):
        ceilings = job.remeasure() or ceilings
    for impl in timed:
        timing: dict[str, Any] = {"mode": timer.mode, "excluded": "", "ratio_vs_reference": {}}
        for mode, stats in per_mode.items():
            if impl.name not in stats:
                continue
            timing[mode] = stats[impl.name]
            timing["ratio_vs_reference"][mode] = _ratio(round_ratios(stats[ref.name]["samples_ms"],
                                                                     stats[impl.name]["samples_ms"]))
        got = shares(impl.name)
        derived = dict(got.derived)
        if derived:  # the ceilings this record was divided by, next to it
            derived.update({"ceiling_copy_gbps": ceilings.get("copy_gbps"),
                            "ceiling_read_gbps": ceilings.get("read_gbps"),
                            "ceiling_tflops": flops_ceiling(ceilings, dtype)})
        if got.ceiling_too_low:
            timing["ceiling_too_low"] = list(got.ceiling_too_low)
        if "fwd" in timing and "fwdbwd" in timing:
            timing["bwd_median_ms"] = max(0.0, timing["fwdbwd"]["median_ms"] - timing["fwd"]["median_ms"])
        events.send(Begin(impl=impl.name, phase="memory"))
        fn = calls[impl.name].get("fwdbwd") or calls[impl.name]["fwd"]
        try:
            with ledger.kept(impl.name):
                memory = peak_memory(device, fn)
        except Exception as exc:
            memory = {"peak_bytes": None, "method": f"failed: {failure_reason(exc)}"}
        out[impl.name] = Measured(timing=timing, derived=derived or None, memory=memory)
        if device.is_gpu:
            torch.cuda.empty_cache() if device.backend in ("cuda", "rocm") else None
    return out


def _ratio(ratios: list[float]) -> dict[str, Any] | None:
    from twinbench.harness.core.timing import summarize_ratio

    return summarize_ratio(ratios) if ratios else None


def main() -> int:
    raw = json.loads(sys.argv[1])
    config = RunWorkerConfig.from_json(raw)
    faulthandler.enable(file=sys.stderr, all_threads=True)
    die_with_parent()
    if config.backend == "cpu":
        _limit_memory(config.memory_limit_bytes)
    import torch

    if config.threads:
        torch.set_num_threads(int(config.threads))
    from twinbench.harness.core import devices, progress, registry
    from twinbench.harness.store.results import json_default

    events = EventWriter(int(raw["event_fd"]), default=json_default)
    progress.set_sink(lambda text: events.send(Heartbeat(text=text)))
    registry.load_plugins(config.plugins)
    device = _device(config)
    pin_worker_device(device.torch_device)
    fp = devices.fingerprint(device)
    events.send(Fingerprint(fingerprint=fp, import_failures=dict(registry.import_failures)))
    ceilings = CeilingBook(device, fp["id"], events, config.measure_ceilings, config.ceilings)
    if config.measure_ceilings:
        ceilings.current()  # the worker's own thread count, before the first case (cases may ask for others)
    ctx = CaseContext(device=device, fingerprint=fp["id"], ceilings=ceilings, config=config)
    events.send(Ready())
    for task in requests(sys.stdin):
        try:
            if isinstance(task, ProbeSuite):
                probe_suite(task, ctx, events)
            else:
                run_case(task, ctx, events)
        except Exception as exc:  # a suite-level failure (bad inputs factory...): report, keep serving
            events.send(CaseError(reason=failure_reason(exc), traceback=traceback.format_exc()[-3000:]))
        kill_pids(leftover_processes())  # what an impl started and left running dies with its case
    return 0


if __name__ == "__main__":
    exit_worker(main())
