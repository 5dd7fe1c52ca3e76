"""Experiments: whole training loops (QLoRA fine-tune, DPO training) judged against a reference loop.

A kernel ``Suite`` feeds seeded inputs to an op and compares outputs and gradients under the three-way rule;
an experiment has no inputs to feed and no gradients to seed. Each impl runs the loop end to end from the
case's arguments and returns an ``Outcome``: tensors compared with the reference loop's under fixed bounds
(loss curves, first-step gradients, adapter weights) or judged by the experiment (integer counts), plus the
numbers the loop measured itself (step time, peak memory), recorded as they are. The harness runs the
reference loop once per case (the comparison baseline), then every impl, the reference included, under
poisoned allocations (``harness.run.experiment_case``; docs/method.md §1).

Experiments are listed and planned like suites (both are an ``Operation``: ``cases``, ``params``, ``tags``;
never timed by the harness):
``register_experiment`` puts one in ``registry.EXPERIMENTS`` and in the ``registry.SUITES`` catalogue.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from twinbench.harness.core import registry
from twinbench.harness.core.case import Case
from twinbench.harness.core.memory import RssSampler, release_freed_heap
from twinbench.harness.core.registry import Operation, Tolerance


class Outcome(Protocol):
    """What an experiment impl returns (``reference.outcome.LoopOutcome`` is one)."""

    outputs: Mapping[str, torch.Tensor]
    metrics: Mapping[str, Any]


@dataclass(kw_only=True)
class Experiment(Operation):
    """One training loop family: its cases, the arguments each impl is called with, and how outputs are judged.

    ``arguments(case, device, seed)``: keyword arguments of every impl (``impl.fn(**arguments)``), e.g. a loop
    config and the data paths. ``bound(case, output)``: the fixed bound of a floating-point output.
    ``judge(case, output, opt, ref, arguments) -> (ok, why)``: integer outputs (None: must equal the
    reference's). ``meta(case)``: JSON data recorded with each judged record (e.g. tokens per step).
    """

    arguments: Callable[[Case, str, int], dict[str, Any]]
    bound: Callable[[Case, str], Tolerance]
    judge: Callable[[Case, str, torch.Tensor, torch.Tensor, dict[str, Any]], tuple[bool, str]] | None = None
    meta: Callable[[Case], dict[str, Any]] = lambda case: {}
    tags: tuple[str, ...] = ("experiment", "no-pytest-items")
    # a loop measures its own step time; the planner, `gate` and the pytest parity items skip experiments
    timed: ClassVar[bool] = False


def register_experiment(experiment: Experiment) -> Experiment:
    registry.EXPERIMENTS[experiment.name] = experiment
    registry.SUITES[experiment.name] = experiment  # type: ignore[assignment]  # the catalogue: list and plan
    return experiment


class StepPeakMemory:
    """Peak memory of a block (one training step) above its start: the allocator's peak on CUDA, sampled
    RSS on the CPU with the freed heap handed back first, so the step's own growth shows (docs/method.md §3)."""

    def __init__(self, device: str):
        self.device = str(device)
        self.peak = 0

    def __enter__(self) -> StepPeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            release_freed_heap()
            self._sampler = RssSampler(interval_s=0.002)
            self._sampler.__enter__()
            self._start = self._sampler.peak
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device) - self._start)
        else:
            self._sampler.__exit__(*exc)
            self.peak = int(max(0, self._sampler.peak - self._start))
