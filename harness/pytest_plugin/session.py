"""What ``pytest --twinbench`` collects and where its verdicts come from: the run engine, never a copy of it.

- **Parity items**, one per (suite, case, impl, device) of the selection, the case's reference included (the run
  judges it too, and a failing reference skips the case's impls). Their records are made by ``harness.run``
  exactly as ``twinbench run --no-timing`` makes them, a case at a time: by default by the device's run worker
  (:class:`~twinbench.harness.run.supervisor.DeviceRun`, its worker kept between cases: a kernel that segfaults,
  aborts or hangs costs its own items, a fresh worker takes over and pytest goes on); with
  ``--twinbench-in-process`` by the same case code (:func:`~twinbench.harness.run.worker.run_case`) called in the
  pytest process: no worker start, no protection from a crash, no ``--twinbench-timeout``.
- **Timing items** (``--twinbench-benchmark``), one per (suite, case, impl, device, fwd/fwdbwd), timed
  by pytest-benchmark's ``benchmark`` fixture in the pytest process, so ``--benchmark-autosave`` and
  ``pytest-benchmark compare`` work on them; only an impl whose parity passed is timed.
- **The case fixture** (:class:`CaseInputs`): a suite's inputs for one case, the reference's outputs on them and
  the parity rule for any callable, for a vendor's own tests.

The default selection is the impls that plugins register (entry points ``twinbench.impls``/``twinbench.suites``
outside twinbench itself, and ``--twinbench-plugin`` files); ``--twinbench-suite``/``--twinbench-impl`` name others.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest
from twinbench.harness.core import devices as devices_mod
from twinbench.harness.core import registry
from twinbench.harness.core.case import Case, select_cases
from twinbench.harness.core.errors import UsageError, failure_reason
from twinbench.harness.run.journal import Journal, assemble
from twinbench.harness.run.plan import RunOptions, Task, check_dtypes, plan_tasks
from twinbench.harness.run.process import user_triton_interpret
from twinbench.harness.store.record import Record, Status
from twinbench.harness.store.results import Output, check_outputs, dumps_strict, provenance, record_key

TIMING_MODES = ("fwd", "fwdbwd")


@dataclass(frozen=True)
class Selection:
    """The ``--twinbench-*`` options, as typed data."""

    suites: tuple[str, ...] = ()
    impls: tuple[str, ...] = ()
    profile: str = "quick"
    devices: tuple[str, ...] = ()
    cases: tuple[str, ...] = ()
    plugins: tuple[str, ...] = ()  # absolute paths
    in_process: bool = False
    benchmark: bool = False
    timeout: float = 600.0
    trials: int | None = None  # parity trials per case (None: the suite's own number)
    out: Path | None = None  # keep journal.jsonl, worker logs and results.json here (default: a temporary folder)


@dataclass(frozen=True)
class Target:
    """One impl on one case on one device: what one parity item judges (and one timing item times)."""

    suite: str
    case_id: str
    params: dict[str, Any] = field(hash=False, compare=False)
    impl: str
    device: str

    @property
    def key(self) -> tuple[str, str, str, str]:
        """The key of its record (``harness.store.results.record_key``)."""
        return self.suite, self.case_id, self.impl, self.device

    @property
    def id(self) -> str:
        return f"{self.suite}/{self.case_id}/{self.impl}/{self.device}"


@dataclass(frozen=True)
class Plan:
    """The selection resolved against the registry and the devices: every item's target."""

    # Each case's reference first: the run judges it too (against its own high-precision run), and when it fails
    # the case's impls are skipped with "reference failed: ...", so its own item is where that failure shows.
    parity: tuple[Target, ...]
    reference_of: dict[str, str]  # suite -> its reference impl
    devices: dict[str, devices_mod.Device]
    import_failures: dict[str, str]  # plugin modules (not twinbench's own) that failed to import


def is_builtin(impl: registry.Impl) -> bool:
    """Registered by twinbench's own packages (``impl.source`` is the function's module and name)."""
    return impl.source.startswith("twinbench.")


def plugin_import_failures() -> dict[str, str]:
    """Modules that plugins name (entry points, not twinbench's own) and that failed to import, with why."""
    return {k: v for k, v in registry.import_failures.items() if k.split(":")[0].split(".")[0] != "twinbench"}


def plan(selection: Selection) -> Plan:
    """Load the plugins and resolve the selection; a selection that names nothing is a UsageError."""
    devices = [devices_mod.find(d) for d in selection.devices] if selection.devices else list(devices_mod.detect())
    if selection.in_process and all(d.backend == "cpu" for d in devices):
        # On the CPU Triton runs only through its interpreter, chosen when a kernel module is imported
        # (load_plugins, below; docs/method.md §6); a worker gets it from worker_environment instead.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    registry.load_plugins(selection.plugins)
    suites, impls = list(selection.suites), list(selection.impls)
    if not suites and not impls:
        found = [i for i in registry.IMPLS.values()
                 if not is_builtin(i) and i.suite in registry.SUITES and i.name != registry.SUITES[i.suite].reference]
        if not found:
            failures = "; ".join(f"{m}: {why}" for m, why in sorted(plugin_import_failures().items()))
            raise UsageError("no installed plugin registers a twinbench impl (entry point group twinbench.impls, "
                             "or --twinbench-plugin FILE.py); name built-in ones with --twinbench-suite/"
                             "--twinbench-impl" + (f" (plugins that failed to import: {failures})" if failures else ""))
        suites = sorted({i.suite for i in found})
        impls = sorted({i.name for i in found})
    planned = plan_tasks(RunOptions(suites=suites, impls=impls, cases=list(selection.cases),
                                    profile=selection.profile, plugins=list(selection.plugins)))
    check_dtypes(planned, devices)
    parity = [Target(suite.name, task.case_id, task.params, name, dev.name)
              for suite, tasks in planned for task in tasks if task.impls != [suite.reference]
              for dev in devices for name in task.impls]
    return Plan(parity=tuple(parity), reference_of={suite.name: suite.reference for suite, _ in planned},
                devices={d.name: d for d in devices}, import_failures=plugin_import_failures())


def tasks_for(targets: Iterable[Target], reference_of: dict[str, str]) -> list[Task]:
    """The run's tasks that produce every target's record: one per case, the reference first when its own item
    is among the targets (as in `twinbench run`). When it is not (deselected), the impls are still judged against
    it but it is not judged itself: a broken reference then fails every impl of the case as crashed, instead of
    failing its own item and skipping theirs; nothing passes that the run would fail."""
    tasks: dict[tuple[str, str], Task] = {}
    for t in sorted(targets, key=lambda t: t.impl != reference_of[t.suite]):
        task = tasks.setdefault((t.suite, t.case_id), Task(t.suite, dict(t.params), t.case_id, []))
        if t.impl not in task.impls:
            task.impls.append(t.impl)
    return list(tasks.values())


class ParityRecords:
    """The records behind the items, made case by case the first time an item of the case asks, for that case's
    targets that pytest will run in this process: in the device's run worker (started at the first case and kept
    for the next, as a cluster node keeps it) or in process. Every record also goes to
    ``journal.jsonl`` in ``folder``, from which :meth:`write_results` assembles ``results.json`` (the run's own
    document: ``twinbench report`` reads it)."""

    def __init__(self, plan_: Plan, selection: Selection, folder: Path, command: str):
        self.plan, self.selection, self.folder = plan_, selection, folder
        self.journal = Journal(folder / "journal.jsonl")
        self.provenance = dict(provenance(), command=command)
        self.journal.append({"type": "start", "provenance": self.provenance})
        self.records: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        self.ran: set[tuple[str, str, str]] = set()  # (suite, case, device) run already
        self.contexts: dict[str, Any] = {}  # in process: device -> CaseContext
        self.device_runs: dict[str, Any] = {}  # in a worker: device -> its DeviceRun, worker kept between cases

    def record(self, target: Target, scheduled: Iterable[Target]) -> dict[str, Any] | None:
        """The record of ``target``; runs what it needs first, with the ``scheduled`` targets that share it."""
        unit = (target.suite, target.case_id, target.device)
        if unit not in self.ran:
            self.ran.add(unit)
            same = [t for t in scheduled if (t.suite, t.case_id, t.device) == unit]
            tasks = tasks_for([*same, target], self.plan.reference_of)
            run = self._run_in_process if self.selection.in_process else self._run_in_worker
            run(self.plan.devices[target.device], tasks)
        return self.records.get(target.key)

    def _keep(self, rec: dict[str, Any]) -> None:
        self.records[record_key(rec)] = rec

    def _run_in_worker(self, device: devices_mod.Device, tasks: list[Task]) -> None:
        from twinbench.harness.run.supervisor import DeviceRun, Progress

        run = self.device_runs.get(device.name)
        if run is None:
            options = RunOptions(out=self.folder, plugins=list(self.selection.plugins), timeout=self.selection.timeout,
                                 trials=self.selection.trials, timing=False, triton_interpret=user_triton_interpret())
            run = self.device_runs[device.name] = DeviceRun(device, [], options, self.journal, None, None,
                                                             self.plan.reference_of)
        run.progress = Progress(len(tasks))
        run.tasks.extend(tasks)
        try:
            run.run(keep_worker=True)
        finally:
            run.progress.close()
        for rec in run.records:
            self._keep(rec)

    def close(self) -> None:
        """Stop the kept workers (and whatever they started)."""
        for run in self.device_runs.values():
            if run.worker is not None:
                run.worker.stop()
                run.worker = None

    def _context(self, device: devices_mod.Device):
        from twinbench.harness.run.process import RunWorkerConfig
        from twinbench.harness.run.worker import CaseContext

        if device.name not in self.contexts:
            fp = devices_mod.fingerprint(device)
            self.journal.append({"type": "fingerprint", "fingerprint": fp,
                                 "import_failures": dict(registry.import_failures)})
            config = RunWorkerConfig(device=device.name, backend=device.backend, plugins=list(self.selection.plugins),
                                     measure_ceilings=False, timing=False, trials=self.selection.trials)
            self.contexts[device.name] = CaseContext(device=device, fingerprint=fp["id"], ceilings={}, config=config)
        return self.contexts[device.name]

    def _run_in_process(self, device: devices_mod.Device, tasks: list[Task]) -> None:
        from twinbench.harness.run.process import RecordDone
        from twinbench.harness.run.worker import run_case

        ctx = self._context(device)
        for task in tasks:
            sent = _Collected()
            try:
                run_case(task.request(), ctx, sent)
            except Exception as exc:  # as the worker reports a case-level failure (CaseError) and the supervisor records it
                sent.messages += [RecordDone(record=Record.new(
                    suite=task.suite, case=task.case_id, params=task.params, device=device.name,
                    fingerprint=ctx.fingerprint, impl=name, tags=[], status=Status.CRASHED,
                    reason=f"case failed: {failure_reason(exc)}").to_json()) for name in task.impls]
            for message in sent.messages:
                if isinstance(message, RecordDone):
                    rec = json.loads(dumps_strict(message.record, indent=None))  # as the worker's pipe delivers it
                    self.journal.append({"type": "record", "record": rec})
                    self._keep(rec)

    def write_results(self) -> Path:
        assemble(self.folder, self.journal, self.provenance)
        return self.folder / "results.json"


class _Collected:
    """Stands in for the worker's event pipe when a case runs in the pytest process: keeps the messages."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    def send(self, message: Any) -> None:
        self.messages.append(message)


def skip(reason: str) -> NoReturn:
    """Skip the running item, reported at the item (``twinbench::parity[...]``, or the test using the fixture),
    not at a line of this module."""
    raise pytest.skip.Exception(reason, _use_item_location=True)


def judge(record: dict[str, Any] | None, target: Target) -> None:
    """A record as a pytest outcome: ok passes; skipped skips with the run's reason; wrong, crashed and timeout
    fail with the status and reason the run prints (``twinbench run``'s table and results.json)."""
    if record is None:
        pytest.fail(f"no record for {target.id}: the engine did not run this impl (is it registered in the worker? "
                    f"a plugin module it cannot import, or one only on the pytest process's path?)", pytrace=False)
    status = Status(record["status"])
    if status is Status.SKIPPED:
        skip(record["reason"])
    if status.failed:
        pytest.fail(f"{status.value}: {record['reason']}", pytrace=False)


# --- pytest's side: the collected items ----------------------------------------------------------------------


class TwinbenchSession:
    """One pytest session's twinbench state: the plan, its records, the output folder."""

    def __init__(self, selection: Selection, command: str):
        self.selection = selection
        self.stack = contextlib.ExitStack()
        self.plan = plan(selection)
        folder = selection.out
        if folder is None:
            folder = Path(tempfile.mkdtemp(prefix="twinbench-pytest-"))
            self.stack.callback(shutil.rmtree, folder, ignore_errors=True)
        else:
            prepare_out(folder)
            from twinbench.harness.run.runner import locked_folder

            self.stack.enter_context(locked_folder(folder))
        self.records = ParityRecords(self.plan, selection, folder, command)
        self.timers: dict[str, Any] = {}
        self._scheduled: list[Target] | None = None

    def finish(self) -> Path | None:
        """results.json, when asked for an output folder and something ran."""
        return self.records.write_results() if self.selection.out is not None and self.records.records else None

    def close(self) -> None:
        """Stop the workers; release the output folder, or remove the temporary one (idempotent)."""
        self.records.close()
        self.stack.close()

    def collect(self, session: pytest.Session) -> list[pytest.Item]:
        """The items, reported as one collector's result (so "collected N items" counts them)."""
        collector = TwinbenchCollector.from_parent(session, name="twinbench", nodeid="twinbench")
        items = list(collector.collect())
        session.ihook.pytest_collectreport(report=pytest.CollectReport(collector.nodeid, "passed", None, items))
        return items

    def scheduled(self, session: pytest.Session) -> list[Target]:
        """The targets of the twinbench items pytest runs in this process (after -k/-m deselection)."""
        if self._scheduled is None:
            self._scheduled = [item.target for item in session.items if isinstance(item, TwinbenchItem)
                               and hasattr(item, "target")]
        return self._scheduled

    def parity_item(self, target: Target) -> Callable[..., None]:
        def parity(request) -> None:
            judge(self.records.record(target, self.scheduled(request.session)), target)

        return parity

    def timing_item(self, target: Target, mode: str) -> Callable[..., None]:
        def timing(request, benchmark) -> None:
            rec = self.records.record(target, self.scheduled(request.session))
            if rec is None or rec["status"] != Status.OK.value:
                status = rec["status"] if rec else "not run"
                skip(f"not timed: parity {status}" + (f": {rec['reason']}" if rec and rec["reason"] else ""))
            self._benchmark(benchmark, target, mode)

        return timing

    def _benchmark(self, benchmark, target: Target, mode: str) -> None:
        from twinbench.harness.core.timing import timer_for
        from twinbench.harness.run.worker import StateLedger, time_callables

        suite = registry.get_suite(target.suite)
        impl = registry.IMPLS[(target.suite, target.impl)]
        ref = registry.IMPLS[(target.suite, suite.reference)]
        device = self.plan.devices[target.device]
        if not suite.timed:
            skip(f"{target.suite} is a training loop: it measures its own steps (metrics), not timed here")
        if why := impl.timing_excluded(device):
            skip(f"not timed: {why}")
        inputs = suite.make_inputs(Case.of(target.params), device.torch_device, 0)
        ledger = StateLedger()
        calls = time_callables(impl, inputs, device, impl.backward and ref.backward, ledger)
        if mode not in calls:
            skip(f"no {mode} call: {target.impl} or its reference has no backward here")
        fn = calls[mode]
        timer = self.timers.setdefault(device.name, timer_for(device))  # its sync(): the device's work is done

        def call() -> None:
            fn()
            timer.sync()

        benchmark.group = f"{target.suite}/{target.case_id}/{target.device}/{mode}"
        benchmark.extra_info.update(suite=target.suite, case=target.case_id, impl=target.impl, device=target.device,
                                    mode=mode, params=target.params)
        with ledger.kept(impl.name):  # what the impl changes in global torch state does not reach the next item
            benchmark(call)


def prepare_out(folder: Path) -> None:
    """``--twinbench-out``: a new folder or an empty one; a folder holding a run is refused (nothing overwritten)."""
    check_outputs([Output("--twinbench-out", folder, folder=True),
                   *(Output("--twinbench-out", folder / n) for n in ("results.json", "journal.jsonl"))])
    for name in ("results.json", "journal.jsonl"):
        if (folder / name).exists():
            raise UsageError(f"--twinbench-out {folder} already holds {name}; choose another folder "
                             f"(it is not overwritten)")
    folder.mkdir(parents=True, exist_ok=True)


class TwinbenchItem(pytest.Function):
    """A parity or timing item: a function with fixtures (``benchmark``), its target kept for the records."""

    target: Target

    def reportinfo(self):
        return self.config.rootpath / "twinbench", 0, self.name


class TwinbenchCollector(pytest.Collector):
    """The items of the session's plan, under one node (``twinbench::parity[...]``, ``twinbench::benchmark[...]``)."""

    def collect(self) -> Iterator[pytest.Item]:
        tb: TwinbenchSession = self.config.stash[SESSION_KEY]
        for module, why in sorted(tb.plan.import_failures.items()):
            yield self._item(f"import[{module}]", _failed_import(module, why), None)
        for target in tb.plan.parity:
            yield self._item(f"parity[{target.id}]", tb.parity_item(target), target)
        if tb.selection.benchmark:
            for target in tb.plan.parity:
                for mode in TIMING_MODES:
                    yield self._item(f"benchmark[{target.id}/{mode}]", tb.timing_item(target, mode), target)

    def _item(self, name: str, fn: Callable[..., None], target: Target | None) -> pytest.Item:
        item = TwinbenchItem.from_parent(self, name=name, callobj=fn)
        item.add_marker("twinbench")
        if target is not None:
            item.target = target
            item.user_properties += [("twinbench_suite", target.suite), ("twinbench_case", target.case_id),
                                     ("twinbench_impl", target.impl), ("twinbench_device", target.device)]
        return item


def _failed_import(module: str, why: str) -> Callable[[], None]:
    def import_plugin() -> None:
        pytest.fail(f"plugin module {module} failed to import: {why}", pytrace=False)

    return import_plugin


SESSION_KEY = pytest.StashKey[TwinbenchSession]()


def command_line(config: pytest.Config) -> str:
    return shlex.join(["pytest", *config.invocation_params.args])


# --- the case fixture ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseSpec:
    """One parameter of a test marked ``@pytest.mark.twinbench_case(SUITE, ...)``: a case on a device."""

    suite: str
    case_id: str
    params: dict[str, Any] = field(hash=False, compare=False)
    device: str

    @property
    def id(self) -> str:
        return f"{self.suite}/{self.case_id}/{self.device}"


def case_specs(suite_name: str, profile: str, cases: Iterable[str], device_names: Iterable[str],
               plugins: Iterable[str]) -> list[CaseSpec]:
    """The cases of ``suite_name``'s ``profile`` (filtered or built by ``cases``, as ``run --case``) on each device."""
    registry.load_plugins(list(plugins))
    suite = registry.get_suite(suite_name)
    chosen = select_cases(suite.cases(profile), list(cases), suite.name, params=suite.params, rules=suite.rules)
    names = list(device_names) or [d.name for d in devices_mod.detect()]
    found = [devices_mod.find(n).name for n in names]
    return [CaseSpec(suite.name, c.id, c.as_dict(), dev) for c in chosen for dev in found]


@dataclass
class CaseInputs:
    """What the ``twinbench_case`` fixture gives a test: the suite's inputs for one case on one device.

    ``inputs`` are the ones the parity check's first trial draws (seed 0): call an impl as ``fn(**case.kwargs)``.
    """

    suite: registry.Suite
    case: Case
    device: devices_mod.Device
    inputs: registry.Inputs
    seed: int = 0

    @classmethod
    def build(cls, spec: CaseSpec, seed: int = 0) -> CaseInputs:
        suite = registry.get_suite(spec.suite)
        device = devices_mod.find(spec.device)
        case = Case.of(spec.params)
        dtype = case.get("dtype")
        if dtype and not device.supports_dtype(dtype):
            skip(f"{device.name} cannot compute in {dtype}")
        ok, why = registry.IMPLS[(suite.name, suite.reference)].can_run(case, device)
        if not ok:
            skip(f"reference cannot run here: {why}")
        return cls(suite=suite, case=case, device=device, inputs=suite.make_inputs(case, device.torch_device, seed),
                   seed=seed)

    @property
    def kwargs(self) -> dict[str, Any]:
        """The call's arguments: tensors and static arguments."""
        return {**self.inputs.tensors, **self.inputs.static}

    def reference(self) -> dict[str, Any]:
        """The reference impl's outputs on these inputs, in the case's dtype, by name (a single tensor is "out")."""
        from twinbench.harness.core.parity import call_impl, leaves

        outs, _ = call_impl(registry.IMPLS[(self.suite.name, self.suite.reference)], leaves(self.inputs, None, None),
                            None)
        return outs

    def tolerance(self, output: str) -> registry.Tolerance:
        """The suite's tolerance policy for one output (``grad:NAME`` for a gradient)."""
        return self.suite.tolerance(self.case, output)

    def check(self, fn: Callable[..., Any], *, backward: bool = True, deterministic: bool = True,
              trials: int | None = None):
        """twinbench's whole parity rule (docs/method.md §1) for ``fn`` on this case, in this process: the
        verdict (``.ok``, ``.reason()``, per-tensor error and bound). Its ``trials`` (default: the suite's) draw
        inputs from seeds 0, 1, ..."""
        from twinbench.harness.core.parity import check_parity

        impl = registry.Impl(name=getattr(fn, "__name__", "under_test"), suite=self.suite.name, fn=fn,
                             backward=backward, deterministic=deterministic)
        ref = registry.IMPLS[(self.suite.name, self.suite.reference)]
        return check_parity(self.suite, impl, ref, self.case, self.device.torch_device, trials=trials, seed=self.seed)


def usage_error(exc: UsageError) -> pytest.UsageError:
    return pytest.UsageError(f"twinbench: {exc}")
