"""`twinbench bisect GOOD BAD`: the first commit between two refs where a case got slower or broke parity.

Like `asv find`, a binary search over the first-parent commits after GOOD up to BAD, each checked out in a
temporary ``git worktree`` (always removed). Unlike it, every step is the interleaved gate of
`gate --against` (harness/gate/against.py: the same workers, pairing, statistics and confirmation re-run),
with GOOD's worker as the base for the whole search and the step's commit as the head (docs/method.md §4).

The code under test is twinbench itself (each commit's tree runs its own harness, as the base of
`gate --against` does) or, with ``--repo``, a repository holding ``--plugin`` files: then every worker is
this twinbench with that commit's plugin files.

Step 0 measures BAD itself: a bisect starts only from a confirmed regression (or a parity failure, which
switches to parity mode unless ``--parity`` already asked for it), and later steps compare only the cases
BAD regressed or broke. A step that can decide neither way is skipped like ``git bisect skip``: the search
goes on with the nearest other commit, and if skipped commits are left between the last good and the first
bad one, the result is that range, not a commit.
"""

from __future__ import annotations

import contextlib
import math
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

from twinbench.harness import SOURCE_ROOT as ROOT
from twinbench.harness.core.errors import UsageError
from twinbench.harness.gate.against import (
    GateWorker,
    Item,
    Measurement,
    Pair,
    Selection,
    base_worktree,
    gate_items,
    plan_items,
    resolve_ref,
    shared_cpus,
    terminate_as_interrupt,
)
from twinbench.harness.run.process import Prepare, WorkerFailed


class Verdict(str, Enum):
    GOOD = "good"            # not slower than GOOD (and passes parity, in parity mode)
    BAD = "bad"              # a confirmed regression against GOOD, or (parity mode) a parity failure
    UNDECIDED = "undecided"  # neither: not a confirmed regression, but not clearly equal either


class Mode(str, Enum):
    TIMING = "timing"
    PARITY = "parity"


@dataclass(frozen=True)
class CodeUnderTest:
    """Where the measured code lives: ``repo`` at each commit, and the plugin files in it (relative)."""

    repo: Path
    plugins: tuple[str, ...] = ()
    harness_in_repo: bool = True  # the repository is twinbench: each commit's tree runs its own harness

    def worker_root(self, tree: Path) -> Path:
        return tree if self.harness_in_repo else ROOT

    def plugin_files(self, tree: Path) -> list[str]:
        return [str(tree / p) for p in self.plugins]


@dataclass(frozen=True)
class BisectOptions:
    """`twinbench bisect`'s options; built by the CLI only."""

    good: str
    bad: str
    code: CodeUnderTest
    selection: Selection           # plugins empty: they come from ``code`` at each commit
    measurement: Measurement
    parity: bool = False           # --parity: a parity failure is what makes a commit bad


@dataclass(frozen=True)
class Commit:
    sha: str
    subject: str


@dataclass
class Step:
    """One measured commit; ratio/interval/p of the case that decided (the slowest one), None in parity mode."""

    number: int
    commit: str
    subject: str
    verdict: Verdict
    ratio: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None
    note: str = ""
    seconds: float = 0.0


@dataclass
class BisectResult:
    repo: str
    good: str
    bad: str
    mode: Mode
    commits: int                        # first-parent commits after GOOD up to BAD
    first_bad: str | None = None
    first_bad_subject: str = ""
    candidates: list[str] = field(default_factory=list)  # the range left when undecided steps were skipped
    steps: list[Step] = field(default_factory=list)
    built: int = 0                      # commits checked out and measured (GOOD not counted)
    cases: list[str] = field(default_factory=list)  # the compared (suite|case|impl|mode) keys
    summary: str = ""
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        """0: the first bad commit is named; 1: it is not (BAD is not worse than GOOD, or a range is left)."""
        return 0 if self.first_bad else 1

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["mode"] = self.mode.value
        for step in data["steps"]:
            step["verdict"] = step["verdict"].value
        data["exit_code"] = self.exit_code
        return data


# --- the repository ---------------------------------------------------------------------------------------


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)


def repository(path: Path | None) -> Path:
    """The top of the git repository at ``path`` (default: this twinbench's checkout)."""
    start = Path(path) if path else ROOT
    done = _git(start, "rev-parse", "--show-toplevel") if start.is_dir() else None
    if done is None or done.returncode != 0:
        what = f"--repo {path}" if path else f"twinbench at {ROOT} (an installed copy? give --repo)"
        raise UsageError(f"{what}: not a git repository")
    return Path(done.stdout.strip()).resolve()


def code_under_test(repo: Path | None, plugins: list[str]) -> CodeUnderTest:
    """The repository and its plugin files, relative to it; one that leaves it is a usage error."""
    top = repository(repo)
    given = Path(repo).resolve() if repo else top  # relative plugin paths start where --repo points
    relative = []
    for p in plugins:
        path = Path(p)
        full = (path if path.is_absolute() else given / path).resolve()
        if not full.is_relative_to(top):
            raise UsageError(f"--plugin {p}: not inside the repository {top} (bisect takes each commit's copy)")
        relative.append(str(full.relative_to(top)))
    in_repo = top == ROOT.resolve()
    if not in_repo and not relative:
        raise UsageError(f"--repo {repo}: give the --plugin file(s) in it that hold the cases to bisect")
    return CodeUnderTest(repo=top, plugins=tuple(relative), harness_in_repo=in_repo)


def first_parent_commits(repo: Path, good: str, bad: str) -> list[Commit]:
    """The first-parent commits after GOOD up to BAD, oldest first (BAD last)."""
    if good == bad:
        raise UsageError("GOOD and BAD are the same commit: nothing to bisect")
    if _git(repo, "merge-base", "--is-ancestor", good, bad).returncode != 0:
        raise UsageError(f"GOOD {good[:12]} is not an ancestor of BAD {bad[:12]} in {repo}")
    done = _git(repo, "log", "--first-parent", "--reverse", "--format=%H %s", f"{good}..{bad}")
    commits = [Commit(*(line.split(" ", 1) + [""])[:2]) for line in done.stdout.splitlines() if line.strip()]
    if not commits or commits[-1].sha != bad:
        raise UsageError(f"BAD {bad[:12]} is not reached from GOOD {good[:12]} along first parents")
    return commits


def check_plugins(code: CodeUnderTest, bad: str) -> None:
    """Each plugin file is committed at BAD and has no uncommitted changes: bisect measures commits only,
    so an edited working copy would be silently ignored."""
    for rel in code.plugins:
        if _git(code.repo, "cat-file", "-e", f"{bad}:{rel}").returncode != 0:
            raise UsageError(f"--plugin {rel}: not in BAD {bad[:12]} of {code.repo}")
        dirty = _git(code.repo, "status", "--porcelain", "--", rel).stdout.strip()
        if dirty:
            raise UsageError(f"--plugin {rel} has uncommitted changes in {code.repo}: bisect measures commits "
                             f"only; commit or stash them")


# --- one step ---------------------------------------------------------------------------------------------


def _timing_verdict(cases: list[dict[str, Any]], hunted: dict[str, float]) -> tuple[Verdict, dict[str, Any] | None]:
    """A commit is bad when any case is a confirmed regression; good when every case's interval is clearly
    not slower: its upper end within the gate's minimum effect, or below the geometric midpoint between no
    change and the slowdown BAD showed for that case (clearly not the one being hunted); docs/reports-and-gate.md,
    "Bisect"."""
    worst = max((c for c in cases if c.get("ratio") is not None), key=lambda c: c["ratio"], default=None)
    if any(c["verdict"] == "regression (confirmed)" for c in cases):
        return Verdict.BAD, max((c for c in cases if c["verdict"] == "regression (confirmed)"),
                                key=lambda c: c["ratio"])

    def clearly_not_slower(c: dict[str, Any]) -> bool:
        if c.get("ci_high") is None:
            return False
        key = f"{c['suite']}|{c['case']}|{c['impl']}|{c['mode']}"
        return c["ci_high"] <= max(1 + c["min_effect"], math.sqrt(hunted.get(key, 1.0)))

    return (Verdict.GOOD if cases and all(clearly_not_slower(c) for c in cases) else Verdict.UNDECIDED), worst


def _parity(worker: GateWorker, item: Item) -> tuple[bool | None, str]:
    """The gate's parity check of ``item`` in ``worker``'s tree: (passes, why); None when it cannot run."""
    reply = worker.prepare(Prepare(key=item.key, suite=item.suite, params=item.params, impl=item.impl,
                                   mode=item.mode, parity=True))
    if reply.parity is not None:
        ok, why = reply.parity
        return bool(ok), why
    return None, reply.why


class Bisection:
    """GOOD's worker (the base of every step) and the steps measured against it."""

    def __init__(self, options: BisectOptions, config, logs: Path, base: GateWorker, cpus: list[int] | None):
        self.options, self.config, self.logs, self.base, self.cpus = options, config, logs, base, cpus
        self.items: list[Item] = []
        self.hunted: dict[str, float] = {}  # BAD's ratio per regressed case (timing mode)
        self.mode = Mode.PARITY if options.parity else Mode.TIMING
        self.steps: list[Step] = []
        self.built = 0

    @contextlib.contextmanager
    def head(self, commit: Commit):
        """The commit's tree and a started (not yet ready) gate worker serving it; both gone afterwards."""
        code, m = self.options.code, self.options.measurement
        with base_worktree(commit.sha, code.repo) as (tree, _):
            worker = GateWorker(code.worker_root(tree), self.options.selection.device, code.plugin_files(tree),
                                self.logs / f"{commit.sha[:12]}.log", m, self.cpus)
            self.built += 1
            try:
                yield tree, worker
            finally:
                worker.stop()

    def endpoint(self, bad: Commit) -> str:
        """Step 0, BAD against GOOD: choose the mode and the cases to follow; '' or why there is nothing to bisect."""
        started = time.monotonic()
        with self.head(bad) as (tree, worker):
            sel = self.options.selection
            self.items = plan_items(replace(sel, plugins=self.options.code.plugin_files(tree)))
            self.base.ready()
            worker.ready()
            per_impl = _one_per_impl(self.items)
            bad_parity = {i.key: _parity(worker, i) for i in per_impl}
            broken = [i for i in per_impl if bad_parity[i.key][0] is False]
            if broken or self.mode is Mode.PARITY:
                self.mode = Mode.PARITY
                step = Step(0, bad.sha, bad.subject, Verdict.BAD if broken else Verdict.GOOD,
                            note="; ".join(f"{i.impl} [{i.case}]: {bad_parity[i.key][1]}" for i in broken)[:400])
                step.seconds = time.monotonic() - started
                self.steps.append(step)
                if not broken:
                    return "BAD passes parity for every selected case: no parity break to bisect"
                good_broken = [i for i in broken if _parity(self.base, i)[0] is not True]
                if good_broken:
                    return (f"GOOD does not pass parity either ({good_broken[0].impl} [{good_broken[0].case}]): "
                            f"no parity break between GOOD and BAD")
                self.items = broken
                return ""
            step, cases = self._timing_step(0, bad, worker, self.items)
            step.seconds = time.monotonic() - started
            self.steps.append(step)
            regressed = [c for c in cases if c["verdict"] == "regression (confirmed)"]
            if not regressed:
                return "BAD is not a confirmed regression against GOOD for any selected case: nothing to bisect"
            keys = {f"{c['suite']}|{c['case']}|{c['impl']}|{c['mode']}": c["ratio"] for c in regressed}
            self.items = [i for i in self.items if i.key in keys]
            self.hunted = keys
            return ""

    def _timing_step(self, number: int, commit: Commit, worker: GateWorker,
                     items: list[Item]) -> tuple[Step, list[dict[str, Any]]]:
        m = self.options.measurement
        pair = Pair(self.base, worker, m.rounds, m.block_ms, clock=m.clock)
        cases, _, _ = gate_items(pair, items, self.config, parity=False)
        verdict, decisive = _timing_verdict(cases, self.hunted if number else {})
        if number == 0:  # BAD itself: bad only when a regression is confirmed
            verdict = Verdict.BAD if verdict is Verdict.BAD else Verdict.UNDECIDED
        step = Step(number, commit.sha, commit.subject, verdict)
        if decisive is not None:
            step.ratio, step.ci_low, step.ci_high = decisive["ratio"], decisive["ci_low"], decisive["ci_high"]
            step.p_value, step.note = decisive["p_value"], decisive.get("note", "")
        not_compared = [c for c in cases if c.get("ratio") is None]
        if not_compared:
            step.note = "; ".join([step.note, *(f"{c['impl']} {c['mode']}: {c['verdict']} ({c.get('note', '')})"
                                                for c in not_compared)]).strip("; ")[:400]
        return step, cases

    def measure(self, number: int, commit: Commit) -> Step:
        """One bisection step: the commit against GOOD, in the bisection's mode."""
        started = time.monotonic()
        try:
            with self.head(commit) as (_, worker):
                worker.ready()
                if self.mode is Mode.PARITY:
                    results = [_parity(worker, i) for i in self.items]
                    failed = [why for ok, why in results if ok is False]
                    unknown = [why for ok, why in results if ok is None]
                    verdict = Verdict.BAD if failed else Verdict.UNDECIDED if unknown else Verdict.GOOD
                    step = Step(number, commit.sha, commit.subject, verdict, note="; ".join(failed or unknown)[:400])
                else:
                    step, _ = self._timing_step(number, commit, worker, self.items)
        except WorkerFailed as exc:  # the commit's code cannot be measured (crashes on import, say): skipped
            if self.base.process.proc.poll() is not None:
                raise  # GOOD's own worker is gone: no step can be measured any more
            step = Step(number, commit.sha, commit.subject, Verdict.UNDECIDED, note=str(exc).splitlines()[0][:400])
        step.seconds = time.monotonic() - started
        self.steps.append(step)
        return step


def _one_per_impl(items: list[Item]) -> list[Item]:
    """Parity is judged per (suite, case, impl), forward and backward at once: one item each."""
    seen: dict[tuple[str, str, str], Item] = {}
    for i in items:
        seen.setdefault((i.suite, i.case, i.impl), i)
    return list(seen.values())


def search(commits: list[Commit], measure) -> tuple[int, int, set[int]]:
    """Binary search for the first bad index; ``commits[-1]`` is known bad, the commit before ``commits[0]``
    good. ``measure(index)`` returns a Verdict; an undecided index is skipped and the nearest other one to
    the middle taken instead. Returns (last good index or -1, first bad index, skipped indices)."""
    lo, hi, skipped = -1, len(commits) - 1, set()
    while True:
        untested = [i for i in range(lo + 1, hi) if i not in skipped]
        if not untested:
            return lo, hi, skipped
        middle = (lo + hi) / 2
        index = min(untested, key=lambda i: (abs(i - middle), i))
        verdict = measure(index)
        if verdict is Verdict.BAD:
            hi = index
        elif verdict is Verdict.GOOD:
            lo = index
        else:
            skipped.add(index)


def run_bisect(options: BisectOptions, config) -> BisectResult:
    started = time.monotonic()
    code = options.code
    good = resolve_ref(options.good, code.repo, "GOOD")
    bad = resolve_ref(options.bad, code.repo, "BAD")
    commits = first_parent_commits(code.repo, good, bad)
    check_plugins(code, bad)
    result = BisectResult(repo=str(code.repo), good=good, bad=bad, mode=Mode.TIMING, commits=len(commits))
    m, sel = options.measurement, options.selection
    with terminate_as_interrupt(), tempfile.TemporaryDirectory(prefix="twinbench-bisect-") as logs, \
            base_worktree(good, code.repo) as (good_tree, _):
        cpus = shared_cpus(sel.device, m.pin, m.threads)
        base = GateWorker(code.worker_root(good_tree), sel.device, code.plugin_files(good_tree),
                          Path(logs) / "good.log", m, cpus)
        bisection = Bisection(options, config, Path(logs), base, cpus)
        try:
            nothing = bisection.endpoint(commits[-1])
            if not nothing:
                lo, hi, skipped = search(commits, lambda i: bisection.measure(len(bisection.steps), commits[i]).verdict)
                left = [i for i in range(lo + 1, hi) if i in skipped]
                if left:
                    result.candidates = [commits[i].sha for i in range(lo + 1, hi + 1)]
                else:
                    result.first_bad, result.first_bad_subject = commits[hi].sha, commits[hi].subject
        finally:
            base.stop()
    result.mode, result.steps, result.built = bisection.mode, bisection.steps, bisection.built
    result.cases = [i.key for i in bisection.items]
    result.seconds = time.monotonic() - started
    if nothing:
        result.summary = nothing
    elif result.first_bad:
        result.summary = (f"first bad commit {result.first_bad[:12]} ({result.first_bad_subject}): "
                          f"{len(result.steps)} steps, {result.built} commits built, of {len(commits)}")
    else:
        result.summary = (f"undecided steps leave {len(result.candidates)} commits that may be the first bad one: "
                          + ", ".join(c[:12] for c in result.candidates))
    return result


def format_table(result: BisectResult) -> str:
    """Plain text for the console: one line per step, then the verdict."""
    cases = ", ".join(result.cases[:2]) + (f" and {len(result.cases) - 2} more" if len(result.cases) > 2 else "")
    lines = [f"bisect {result.good[:12]} (good) .. {result.bad[:12]} (bad) in {result.repo}: {result.commits} "
             f"first-parent commits, {result.mode.value} mode, cases: {cases or '-'}",
             f"{'step':>4}  {'commit':<12}  {'verdict':<9} {'new/good':>9} {'95% interval':>19} {'p':>9} "
             f"{'seconds':>8}  subject / note"]
    lines.append("-" * len(lines[-1]))
    for s in result.steps:
        ratio = f"{s.ratio:.4f}" if s.ratio is not None else ""
        ci = f"[{s.ci_low:.4f}, {s.ci_high:.4f}]" if s.ci_low is not None else ""
        p = f"{s.p_value:.2g}" if s.p_value is not None else ""
        label = " (BAD)" if s.number == 0 else ""
        lines.append(f"{s.number:>4}  {s.commit[:12]:<12}  {s.verdict.value:<9} {ratio:>9} {ci:>19} {p:>9} "
                     f"{s.seconds:>8.1f}  {s.subject}{label}" + (f" ({s.note})" if s.note else ""))
    lines.append(f"bisect {'FOUND' if result.first_bad else 'NOT FOUND'}: {result.summary} ({result.seconds:.0f} s)")
    return "\n".join(lines)
