"""One case of an experiment (a training loop) in the worker: the reference loop once as the baseline, then
every impl, the reference included, under poisoned allocations, judged output by output against it.

The records have the run's usual JSON (status, parity checks per output with error and bound, metrics):
no gradients are seeded (``backward_checked`` false), the reference runs in its own dtype (``hi_dtype``
"as-given"), one trial, no stability re-run, and the harness times nothing (the loop reports its own
step time and memory in ``metrics``).
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import replace
from typing import Any

from twinbench.harness.core import registry
from twinbench.harness.core.case import Case
from twinbench.harness.core.errors import failure_reason
from twinbench.harness.core.experiment import Experiment, Outcome
from twinbench.harness.core.parity import ParityVerdict, PoisonedAllocations, TensorCheck, compare_tensor
from twinbench.harness.core.registry import Impl
from twinbench.harness.run.process import Begin, CaseDone, EventWriter, RecordDone, RunCase
from twinbench.harness.store.record import Record, Status


def run_impl(impl: Impl, arguments: dict[str, Any], poisoned: bool) -> Outcome:
    """One loop, end to end; ``poisoned``: uninitialised allocations come back full of NaN (an output element
    never written cannot pass)."""
    if not poisoned:
        return impl.fn(**arguments)
    with PoisonedAllocations():
        return impl.fn(**arguments)






def judge_outcome(experiment: Experiment, case: Case, opt: Outcome, ref: Outcome, arguments: dict[str, Any],
                  reference_device: str) -> ParityVerdict:
    """Every reference output against the impl's: integer ones by the experiment's ``judge`` (or equality),
    floating-point ones under the experiment's fixed bound."""
    verdict = ParityVerdict(ok=True, trials=1, backward_checked=False, reference_device=reference_device,
                            hi_dtype="as-given", metrics=dict(opt.metrics))
    policies: set[str] = set()
    floats = []
    for name, ref_out in ref.outputs.items():
        opt_out = opt.outputs.get(name)
        if opt_out is None:
            verdict.problems.append(f"output {name!r} missing")
        elif ref_out.is_floating_point():
            floats.append((name, opt_out, ref_out))
        else:
            ok, why = (experiment.judge(case, name, opt_out, ref_out, arguments) if experiment.judge
                       else (bool(opt_out.cpu().equal(ref_out.cpu())), "differs from the reference"))
            verdict.checks[name] = (
                TensorCheck(name=name, ok=True, error=0, bound=0, ratio=0, mean_error=0, ref_lo_error=None,
                            scale=0, metric="exact") if ok else
                TensorCheck(name=name, ok=False, error=1, bound=0, ratio=math.inf, mean_error=1, ref_lo_error=None,
                            scale=0, metric="exact", detail=why))
    for name, opt_out, ref_out in floats:
        bound = experiment.bound(case, name)
        policies.add(bound.why)
        verdict.checks[name] = compare_tensor(name, opt_out, ref_out, None, bound, False)
    verdict.problems = sorted(set(verdict.problems))
    verdict.tolerance = "; ".join(sorted(policies))
    verdict.ok = not verdict.problems and all(c.ok for c in verdict.checks.values())
    return verdict


def run_experiment_case(task: RunCase, ctx: Any, events: EventWriter) -> None:
    """The worker's ``run_case`` for an experiment (``ctx``: the worker's ``CaseContext``): one
    ``RecordDone`` per impl, then ``CaseDone``."""
    experiment: Experiment = registry.EXPERIMENTS[task.suite]
    case = Case.of(task.params)
    device, seed = ctx.device, ctx.config.seed
    all_impls = registry.impls_for(experiment.name)
    ref = next((i for i in all_impls if i.name == experiment.reference), None)
    wanted = [i for i in all_impls if i.name in task.impls]
    records: dict[str, Record] = {}
    started = time.perf_counter()

    def record(impl: Impl, status: Status, reason: str = "", **measured: Any) -> None:
        records[impl.name] = Record.new(suite=experiment.name, case=case.id, params=case.as_dict(),
                                        device=device.name, fingerprint=ctx.fingerprint, impl=impl.name,
                                        tags=impl.tags, status=status, reason=reason, **measured)

    runnable = []
    for impl in wanted:
        if impl.name in task.exclude:  # decided by the supervisor after this impl killed a worker
            status, reason = task.exclude[impl.name]
            record(impl, Status(status), reason)
            continue
        ok, why = impl.can_run(case, device)
        if not ok:
            record(impl, Status.SKIPPED, why)
        elif (dtype := case.get("dtype")) and not device.supports_dtype(dtype):
            record(impl, Status.SKIPPED, f"{device.name} cannot compute in {dtype}")
        else:
            runnable.append(impl)
    ref_ok, ref_why = ref.can_run(case, device) if ref else (False, "")
    for impl in runnable if not ref_ok else []:
        record(impl, Status.SKIPPED, f"reference cannot run here: {ref_why}" if ref else
               f"experiment {experiment.name} has no reference impl {experiment.reference!r}")

    if ref_ok and runnable:
        where = str(device.torch_device)
        arguments = experiment.arguments(case, where, seed)
        baseline: Outcome | None = None
        for impl in runnable:
            events.send(Begin(impl=impl.name, phase="parity"))
            t0 = time.perf_counter()
            try:
                if baseline is None:  # the comparison baseline: the reference loop, unpoisoned, once per case
                    baseline = run_impl(ref, arguments, poisoned=False)
                outcome = run_impl(impl, arguments, poisoned=True)
            except Exception as exc:
                if impl.name == ref.name or baseline is None:
                    for other in runnable:
                        if other.name not in records:
                            record(other, Status.SKIPPED, f"reference failed: {failure_reason(exc)}")
                    if impl.name == ref.name:
                        record(impl, Status.CRASHED, failure_reason(exc))
                    break
                record(impl, Status.CRASHED, failure_reason(exc), meta={"traceback": traceback.format_exc()[-2000:]})
                continue
            verdict = judge_outcome(experiment, case, outcome, baseline, arguments, where)
            record(impl, Status.OK if verdict.ok else Status.WRONG, "" if verdict.ok else verdict.reason(),
                   parity=verdict.to_json(), metrics=verdict.metrics or None, duration_s=time.perf_counter() - t0)

    meta = experiment.meta(case)
    for rec in records.values():
        if meta and rec.status in (Status.OK, Status.WRONG):
            rec = replace(rec, meta={**(rec.meta or {}), **meta})
        events.send(RecordDone(record=rec.to_json()))
    events.send(CaseDone(seconds=time.perf_counter() - started))
