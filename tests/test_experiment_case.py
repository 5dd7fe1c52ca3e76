"""The experiment runner path (harness.run.experiment_case) on a toy loop: records as a run writes them, the
reference judged too, poisoned allocations catch an output never written, crashes are attributed."""

from __future__ import annotations

import json
import math

import pytest
import torch
from twinbench.harness.core import devices, registry
from twinbench.harness.core.case import Case
from twinbench.harness.core.experiment import Experiment, register_experiment
from twinbench.harness.core.registry import Tolerance
from twinbench.harness.run.experiment_case import run_experiment_case
from twinbench.harness.run.process import RunCase, RunWorkerConfig
from twinbench.harness.run.worker import CaseContext
from twinbench.reference.outcome import LoopOutcome

CASE = Case.of(steps=4)


class Events:
    """The worker's event pipe, kept in memory (the messages as they would be written)."""

    def __init__(self):
        self.sent: list[dict] = []

    def send(self, message) -> None:
        self.sent.append(json.loads(json.dumps(message.to_json())))

    def records(self) -> dict[str, dict]:
        return {m["record"]["impl"]: m["record"] for m in self.sent if m["type"] == "record"}


def _loop(curve: torch.Tensor, steps: int) -> LoopOutcome:
    return LoopOutcome(outputs={"count": torch.tensor([steps]), "curve": curve},
                       metrics={"steps": steps, "median_step_s": 0.5})


def _reference(*, steps):
    return _loop(torch.linspace(1.0, 0.1, steps, dtype=torch.float64), steps)


def _close(*, steps):
    return _loop(torch.linspace(1.0, 0.1, steps, dtype=torch.float64) + 1e-6, steps)


def _drifts(*, steps):
    return _loop(torch.linspace(1.0, 0.1, steps, dtype=torch.float64) + 0.1, steps)


def _unwritten(*, steps):
    curve = torch.empty(steps, dtype=torch.float64)
    curve[:-1] = torch.linspace(1.0, 0.1, steps, dtype=torch.float64)[:-1]  # the last step never written
    return _loop(curve, steps)


def _crashes(*, steps):
    raise RuntimeError("loop diverged\nsecond line")


@pytest.fixture
def toy():
    """A toy experiment registered for one test (and removed after it)."""
    made = []

    def make(name: str, impls: dict) -> Experiment:
        exp = register_experiment(Experiment(
            name=name, description="toy loop", profiles={"quick": [CASE]},
            arguments=lambda case, device, seed: {"steps": case["steps"]},
            bound=lambda case, output: Tolerance(three_way=False, atol=1e-3, max_rel_bound=0.0, why="toy bound"),
            meta=lambda case: {"tokens_per_step": 8}))
        for impl_name, fn in impls.items():
            registry.register_impl(name, impl_name, backward=False,
                                   tags=("reference",) if impl_name == "reference" else ())(fn)
        made.append(name)
        return exp

    yield make
    for name in made:
        registry.SUITES.pop(name), registry.EXPERIMENTS.pop(name)
        for key in [k for k in registry.IMPLS if k[0] == name]:
            del registry.IMPLS[key]


def _run(name: str, impls: list[str]) -> dict[str, dict]:
    events = Events()
    ctx = CaseContext(device=devices.find("cpu"), fingerprint="fp", ceilings={},
                      config=RunWorkerConfig(device="cpu", backend="cpu", seed=0))
    run_experiment_case(RunCase(suite=name, params=CASE.as_dict(), impls=impls), ctx, events)
    assert events.sent[-1]["type"] == "case_done"
    return events.records()


def test_records_judge_each_output_and_catch_unwritten_elements(toy):
    toy("toy_loop", {"reference": _reference, "close": _close, "drifts": _drifts, "unwritten": _unwritten,
                     "crashes": _crashes})
    recs = _run("toy_loop", ["reference", "close", "drifts", "unwritten", "crashes"])
    assert {n: r["status"] for n, r in recs.items()} == {
        "reference": "ok", "close": "ok", "drifts": "wrong", "unwritten": "wrong", "crashes": "crashed"}
    ok = recs["close"]
    assert ok["suite"] == "toy_loop" and ok["case"] == CASE.id and ok["fingerprint"] == "fp"
    assert ok["timing"] is None and ok["memory"] is None and ok["meta"] == {"tokens_per_step": 8}
    assert ok["metrics"] == {"steps": 4, "median_step_s": 0.5}
    parity = ok["parity"]
    assert parity["hi_dtype"] == "as-given" and parity["trials"] == 1 and not parity["backward_checked"]
    assert parity["tolerance"] == "toy bound" and parity["stable"] is None
    assert list(parity["checks"]) == ["count", "curve"] and parity["checks"]["count"]["metric"] == "exact"
    assert parity["checks"]["curve"]["error"] == pytest.approx(1e-6) and parity["checks"]["curve"]["bound"] == 1e-3
    assert "curve: err 0.1 > bound 0.001" in recs["drifts"]["reason"]
    assert "non-finite" in recs["unwritten"]["parity"]["checks"]["curve"]["detail"]  # NaN from the poison
    assert recs["crashes"]["reason"] == "RuntimeError: loop diverged" and recs["crashes"]["parity"] is None
    assert recs["crashes"]["meta"]["traceback"]


def test_reference_crash_skips_the_others_and_integer_outputs_must_match(toy):
    toy("toy_ref_crash", {"reference": _crashes, "close": _close})
    recs = _run("toy_ref_crash", ["reference", "close"])
    assert recs["reference"]["status"] == "crashed"
    assert recs["close"]["status"] == "skipped" and recs["close"]["reason"].startswith("reference failed: ")

    def miscounted(*, steps):
        return _loop(torch.linspace(1.0, 0.1, steps, dtype=torch.float64), steps + 1)

    toy("toy_count", {"reference": _reference, "miscounted": miscounted})
    rec = _run("toy_count", ["reference", "miscounted"])["miscounted"]
    check = rec["parity"]["checks"]["count"]
    assert rec["status"] == "wrong" and not check["ok"] and check["ratio"] == math.inf


def test_experiments_are_planned_like_suites_and_never_timed(toy):
    from twinbench.harness.run.runner import RunOptions, plan_tasks

    toy("toy_plan", {"reference": _reference, "close": _close})
    [(planned, tasks)] = plan_tasks(RunOptions(suites=["toy_plan"]))
    assert planned is registry.EXPERIMENTS["toy_plan"] and not planned.timed
    assert [t.impls for t in tasks] == [["reference", "close"]]
