"""`twinbench bisect`: a vendor repository of 8 commits with a planted slowdown and a planted parity break.

The repository holds one plugin file (its own tiny suite, two impls); commit 5 makes ``mm`` do 4x the work
(3 more products: unmistakable on a loaded machine), commit 3 scales ``mm_scaled``'s output by 1.01 (a parity
failure). Each bisect must name that commit within ceil(log2(8)) + 1 steps, step 0 (BAD itself) included.
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from twinbench.harness.cli.main import main
from twinbench.harness.core import registry
from twinbench.harness.gate import bisect
from twinbench.harness.gate.against import Measurement, Selection
from twinbench.harness.gate.stats import GateConfig
from twinbench.harness.run.process import WorkerFailed

PLUGIN = '''
"""A vendor's kernels, version {version}."""
import torch
from twinbench.harness.core.case import Case
from twinbench.harness.core.inputs import generator, randn
from twinbench.harness.core.registry import Inputs, Suite, register_impl, register_suite


def make_inputs(case, device, seed):
    gen = generator(seed)
    return Inputs(tensors={{"x": randn((case["n"], case["n"]), "fp32", device, gen),
                           "w": randn((case["n"], case["n"]), "fp32", device, gen)}})


register_suite(Suite(name="vendor_mm", description="x @ w", profiles={{"quick": [Case.of(n=64)]}},
                     make_inputs=make_inputs, trials=1))


@register_impl("vendor_mm", "reference", tags=("reference",), backward=False)
def reference(x, w):
    return x @ w


@register_impl("vendor_mm", "mm", tags=("ours",), backward=False)
def mm(x, w):
    for _ in range({extra_products}):
        torch.mm(x, w)
    return torch.mm(x, w)


@register_impl("vendor_mm", "mm_scaled", tags=("ours",), backward=False)
def mm_scaled(x, w):
    return torch.mm(x, w) * {scale}
'''
COMMITS = 8
SLOW_FROM = 5    # commit 5 of 8 plants the slowdown
BROKEN_FROM = 3  # commit 3 of 8 plants the parity break
MAX_STEPS = math.ceil(math.log2(COMMITS)) + 1
QUICK = ["--rounds", "7", "--block-ms", "2"]  # short comparisons: the planted effects are 4x and 1%


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args], cwd=repo,
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def vendor_repo(tmp_path_factory) -> tuple[Path, list[str]]:
    """The repository and its commits' shas, oldest first."""
    repo = tmp_path_factory.mktemp("vendor")
    _git(repo, "init", "-q")
    shas = []
    for n in range(1, COMMITS + 1):
        (repo / "kernels").mkdir(exist_ok=True)
        (repo / "kernels" / "plugin.py").write_text(PLUGIN.format(
            version=n, extra_products=3 if n >= SLOW_FROM else 0, scale=1.01 if n >= BROKEN_FROM else 1.0))
        _git(repo, "add", ".")
        _git(repo, "commit", "-qm", f"commit {n}")
        shas.append(_git(repo, "rev-parse", "HEAD"))
    return repo, shas


@pytest.fixture
def fresh_registry(monkeypatch):
    """Each bisect loads BAD's plugin into this process from its own worktree path: start clean. The built-in
    suites are loaded first: copied before their modules were imported, the registry restored after the test
    would stay empty for every later test (their modules, cached, never register again)."""
    registry.load_plugins()
    monkeypatch.setattr(registry, "SUITES", dict(registry.SUITES))
    monkeypatch.setattr(registry, "IMPLS", dict(registry.IMPLS))
    monkeypatch.setattr(registry, "_loaded_sources", set(registry._loaded_sources))


def _bisect(repo: Path, impl: str, out: Path, *extra: str) -> int:
    return main(["bisect", "HEAD~7", "HEAD", "--repo", str(repo), "--plugin", "kernels/plugin.py",
                 "--suite", "vendor_mm", "--impl", impl, "--json", str(out), *QUICK, *extra])


def _only_the_main_worktree(repo: Path) -> bool:
    return len(_git(repo, "worktree", "list").splitlines()) == 1


def test_a_planted_slowdown_is_found_at_its_commit(vendor_repo, fresh_registry, tmp_path, capsys):
    repo, shas = vendor_repo
    assert _bisect(repo, "mm", tmp_path / "b.json") == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["first_bad"] == shas[SLOW_FROM - 1], out
    assert result["mode"] == "timing" and result["first_bad_subject"] == f"commit {SLOW_FROM}"
    steps = result["steps"]
    assert len(steps) <= MAX_STEPS and result["built"] == len(steps), out
    assert steps[0]["commit"] == shas[-1] and steps[0]["verdict"] == "bad" and steps[0]["ratio"] > 2
    for s in steps[1:]:  # every step agrees with the planted truth
        planted_bad = shas.index(s["commit"]) + 1 >= SLOW_FROM
        assert s["verdict"] == ("bad" if planted_bad else "good"), s
        assert s["p_value"] is not None and (s["ratio"] > 2) == planted_bad, s
    assert f"bisect FOUND: first bad commit {shas[SLOW_FROM - 1][:12]}" in out
    assert _only_the_main_worktree(repo)


def test_a_planted_parity_break_is_found_at_its_commit(vendor_repo, fresh_registry, tmp_path, capsys):
    repo, shas = vendor_repo
    assert _bisect(repo, "mm_scaled", tmp_path / "b.json") == 0  # BAD fails parity: parity mode on its own
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["mode"] == "parity" and result["first_bad"] == shas[BROKEN_FROM - 1], capsys.readouterr().out
    assert len(result["steps"]) <= MAX_STEPS
    for s in result["steps"]:
        assert s["verdict"] == ("bad" if shas.index(s["commit"]) + 1 >= BROKEN_FROM else "good"), s
    assert "err" in result["steps"][0]["note"]  # the parity check's reason for BAD
    assert _only_the_main_worktree(repo)


@pytest.mark.parametrize("refs, why", [
    (["HEAD", "HEAD~7"], "is not an ancestor of BAD"),
    (["HEAD~3", "no-such-ref"], "BAD 'no-such-ref': not a commit"),
    (["HEAD", "HEAD"], "same commit"),
])
def test_refs_that_cannot_be_bisected_are_one_line_exit_2(vendor_repo, tmp_path, capsys, refs, why):
    repo, _ = vendor_repo
    out = tmp_path / "b.json"
    assert main(["bisect", *refs, "--repo", str(repo), "--plugin", "kernels/plugin.py", "--suite", "vendor_mm",
                 "--impl", "mm", "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert why in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and _only_the_main_worktree(repo)


@pytest.mark.parametrize("plugin, why", [("../elsewhere/plugin.py", "not inside the repository"),
                                         ("kernels/missing.py", "not in BAD"),
                                         ("kernels/plugin.py", "uncommitted changes")])
def test_plugin_paths_outside_missing_or_dirty_are_one_line_exit_2(vendor_repo, tmp_path, capsys, plugin, why):
    repo, _ = vendor_repo
    path = repo / "kernels" / "plugin.py"
    committed = path.read_text()
    path.write_text(committed + "\n# an edit bisect would not measure\n")
    try:
        args = ["bisect", "HEAD~7", "HEAD", "--repo", str(repo), "--plugin", plugin, "--suite", "vendor_mm",
                "--impl", "mm"]
        if why != "uncommitted changes":
            path.write_text(committed)
        assert main(args) == 2
    finally:
        path.write_text(committed)
    err = capsys.readouterr().err
    assert why in err and len(err.strip().splitlines()) == 1, err


# --- the search and the step verdicts, on planted verdicts -------------------------------------------------


def _commits(n: int) -> list[bisect.Commit]:
    return [bisect.Commit(f"{i:040x}", f"commit {i}") for i in range(n)]


@pytest.mark.parametrize("n", [1, 2, 7, 16])
def test_the_search_finds_every_planted_first_bad_commit_in_log2_steps(n):
    for first_bad in range(n):
        asked: list[int] = []

        def measure(i: int) -> bisect.Verdict:
            asked.append(i)
            return bisect.Verdict.BAD if i >= first_bad else bisect.Verdict.GOOD

        lo, hi, skipped = bisect.search(_commits(n), measure)
        assert (lo, hi, skipped) == (first_bad - 1, first_bad, set())
        assert len(asked) <= math.ceil(math.log2(n)) and n - 1 not in asked  # BAD is measured by step 0


def test_an_undecided_commit_is_skipped_and_can_leave_a_range():
    def measure(i: int) -> bisect.Verdict:
        return bisect.Verdict.UNDECIDED if i == 3 else bisect.Verdict.BAD if i >= 4 else bisect.Verdict.GOOD

    assert bisect.search(_commits(8), measure) == (2, 4, {3})  # first bad is 3 or 4: a range, not a commit

    def measure_clear(i: int) -> bisect.Verdict:
        return bisect.Verdict.UNDECIDED if i == 1 else bisect.Verdict.BAD if i >= 4 else bisect.Verdict.GOOD

    assert bisect.search(_commits(8), measure_clear)[:2] == (3, 4)  # skipping 1 costs nothing here


class _GoodWorker:
    """GOOD's worker as far as a step looks at it: alive (exit code None) or dead."""

    def __init__(self, exit_code: int | None):
        self.process = SimpleNamespace(proc=SimpleNamespace(poll=lambda: exit_code))


def test_a_commit_whose_worker_dies_is_skipped_unless_goods_worker_died(monkeypatch):
    @contextlib.contextmanager
    def dying_head(self, commit):
        raise WorkerFailed("worker for /tmp/tree died with SIGSEGV (segmentation fault)")
        yield

    monkeypatch.setattr(bisect.Bisection, "head", dying_head)
    options = bisect.BisectOptions("g", "b", bisect.CodeUnderTest(Path("/nowhere")), Selection(), Measurement())
    bisection = bisect.Bisection(options, GateConfig(), Path("/nowhere"), _GoodWorker(None), None)
    step = bisection.measure(1, bisect.Commit("c" * 40, "crashes on import"))
    assert step.verdict is bisect.Verdict.UNDECIDED and "SIGSEGV" in step.note
    bisection.base = _GoodWorker(-9)
    with pytest.raises(WorkerFailed):  # without GOOD's worker no later step could be measured
        bisection.measure(2, bisect.Commit("d" * 40, "next"))


def _case(ratio: float, ci_high: float, verdict: str = "no change", min_effect: float = 0.02) -> dict:
    return {"suite": "s", "case": "n=1", "impl": "i", "mode": "fwd", "ratio": ratio, "ci_low": ratio * 0.9,
            "ci_high": ci_high, "p_value": 0.5, "min_effect": min_effect, "verdict": verdict}


def test_a_step_is_good_only_when_clearly_not_the_hunted_slowdown():
    hunted = {"s|n=1|i|fwd": 4.0}  # BAD was 4x slower: the midpoint is 2x
    verdict = bisect._timing_verdict
    assert verdict([_case(3.9, 4.1, "regression (confirmed)")], hunted)[0] is bisect.Verdict.BAD
    assert verdict([_case(1.0, 1.01)], hunted)[0] is bisect.Verdict.GOOD          # within the minimum effect
    assert verdict([_case(1.2, 1.6)], hunted)[0] is bisect.Verdict.GOOD           # below the midpoint
    assert verdict([_case(1.5, 2.5)], hunted)[0] is bisect.Verdict.UNDECIDED      # could be the slowdown
    assert verdict([_case(1.2, 1.6)], {})[0] is bisect.Verdict.UNDECIDED          # nothing hunted: the gate's band
    assert verdict([{**_case(1, 1), "ratio": None, "ci_high": None}], hunted)[0] is bisect.Verdict.UNDECIDED


# --- history show offers the command -----------------------------------------------------------------------


def test_history_show_offers_the_bisect_command_for_a_change_point(tmp_path, capsys):
    from history_db import nightly_files

    db = tmp_path / "h.sqlite"
    for p in nightly_files(tmp_path, n=24, step_at=12, factor=1.5):
        assert main(["history", "add", str(p), "--db", str(db)]) == 0
    capsys.readouterr()
    assert main(["history", "show", "--db", str(db), "--suite", "matmul"]) == 0
    out = capsys.readouterr().out
    good, bad = f"{12:x}" * 8, f"{13:x}" * 8  # the commits of the last run before the step and the first after
    expected = f"twinbench bisect {good[:12]} {bad[:12]} --suite matmul --impl fast --case n=64,dtype=fp32 --device cpu"
    assert expected in out, out
    assert out.count("twinbench bisect") == 3  # the three stepped series, nothing for the flat ones
    assert main(["history", "show", "--db", str(db), "--suite", "matmul", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    commands = [c["bisect"] for s in found for c in s["change_points"]]
    assert len(commands) == 3 and all(c.startswith(f"twinbench bisect {good[:12]} {bad[:12]}") for c in commands)


def test_a_change_point_without_recorded_commits_offers_no_command():
    from twinbench.harness.store.bisect_hint import bisect_command

    series = {"suite": "s", "impl": "i", "case": "n=1", "points": [{"git_sha": "a" * 40}, {"git_sha": ""}]}
    assert bisect_command(series, {"index": 1}) is None
    series["points"][1]["git_sha"] = "b" * 40
    assert bisect_command(series, {"index": 1}) == f"twinbench bisect {'a' * 12} {'b' * 12} --suite s --impl i --case n=1"
    assert bisect_command(dict(series, case="n=1,tag=a b"), {"index": 1}).endswith("--case 'n=1,tag=a b'")
    assert bisect_command(dict(series, device="cuda:1"), {"index": 1}).endswith("--case n=1 --device cuda:1")
