"""What a run will do: the options the CLI builds, and the validated (suite, tasks) list they select."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twinbench.harness.core import devices as devices_mod
from twinbench.harness.core import registry
from twinbench.harness.core.case import select_cases
from twinbench.harness.core.errors import UsageError
from twinbench.harness.core.timing import TimingPlan
from twinbench.harness.run.process import RunCase


@dataclass
class RunOptions:
    """`twinbench run`'s options; built by the CLI only."""

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
    triton_interpret: bool = False  # the user asked for the Triton interpreter on GPUs too (TRITON_INTERPRET=1)


@dataclass
class Task:
    """One case of one suite on one device; ``exclude`` holds impls a dead worker was blamed on."""

    suite: str
    params: dict[str, Any]
    case_id: str
    impls: list[str]
    exclude: dict[str, tuple[str, str]] = field(default_factory=dict)

    def request(self) -> RunCase:
        return RunCase(suite=self.suite, params=self.params, impls=list(self.impls), exclude=dict(self.exclude))


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


def check_dtypes(planned: list[tuple[registry.Suite, list[Task]]], devices: list[devices_mod.Device]) -> None:
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
