"""The gate: statistics on synthetic samples, baselines through the CLI, and `--against` on a tiny repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from reports_fixtures import FP, fingerprint, make_doc, slowed
from twinbench.harness.cli.main import main
from twinbench.harness.core.errors import UsageError
from twinbench.harness.gate import stats as gate
from twinbench.harness.store.results import atomic_write_json

ROOT = Path(__file__).resolve().parent.parent


def _samples(n: int, median: float, cv: float, seed: int) -> list[float]:
    return list(np.exp(np.random.default_rng(seed).normal(np.log(median), cv, n)))


def _case(ratio: float, p: float, noise: float = 0.0, name: str = "c") -> dict:
    return {"suite": "s", "case": name, "impl": "i", "device": "cpu", "mode": "fwd", "ratio": ratio,
            "ci_low": ratio, "ci_high": ratio, "p_value": p, "noise": noise}


@pytest.mark.parametrize("paired", [True, False])
def test_a_planted_slowdown_is_flagged(paired):
    base = _samples(15, 1.0, 0.02, 1)
    head = [x * 1.25 for x in _samples(15, 1.0, 0.02, 2)]
    c = dict(_case(0, 0), **gate.compare_samples(base, head, paired=paired))
    gate.decide([c], gate.GateConfig(threshold=0.05))
    assert c["verdict"] == "regression"
    assert 1.15 < c["ratio"] < 1.35 and c["ci_low"] > 1.05 and c["p_value"] < 1e-3


@pytest.mark.parametrize("seed", range(5))
def test_no_planted_slowdown_passes(seed):
    base = _samples(15, 1.0, 0.05, seed)
    head = _samples(15, 1.0, 0.05, seed + 100)
    c = dict(_case(0, 0), **gate.compare_samples(base, head, paired=False))
    gate.decide([c], gate.GateConfig(threshold=0.05))
    assert c["verdict"] == "no change"
    assert c["ci_low"] < 1 < c["ci_high"]


def test_holm_correction_changes_a_verdict():
    alone = [_case(1.5, 0.03)]
    gate.decide(alone, gate.GateConfig())
    assert alone[0]["verdict"] == "regression"  # p 0.03 < alpha 0.05 on its own
    pair = [_case(1.5, 0.03, name="a"), _case(1.5, 0.04, name="b")]
    gate.decide(pair, gate.GateConfig(correction="holm"))
    assert [c["verdict"] for c in pair] == ["no change", "no change"]  # Holm: 0.06 and 0.06
    assert pair[0]["p_adjusted"] == pytest.approx(0.06)
    bh = [_case(1.5, 0.03, name="a"), _case(1.5, 0.04, name="b")]
    gate.decide(bh, gate.GateConfig(correction="bh"))
    assert [c["verdict"] for c in bh] == ["regression", "regression"]  # BH: 0.04 and 0.04


def test_holm_adjustment_matches_the_definition():
    assert gate.adjust([0.01, 0.04, 0.03, 0.005], "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_fewer_than_seven_samples_are_refused():
    with pytest.raises(UsageError, match="at least 7"):
        gate.compare_samples([1.0] * 6, [1.0] * 7, paired=False)
    gate.compare_samples(_samples(7, 1, 0.01, 0), _samples(7, 1, 0.01, 1), paired=False)


def test_seven_against_seven_can_reach_asv_level_significance():
    p = gate.mann_whitney_p(np.arange(1.0, 8.0), np.arange(11.0, 18.0))
    assert p < 0.002  # exact two-sided: 2/C(14,7) = 0.00058


def test_minimum_effect_follows_the_cases_own_noise():
    c = [_case(1.08, 1e-6, noise=0.05)]
    gate.decide(c, gate.GateConfig(threshold=0.02, k=2))
    assert c[0]["min_effect"] == pytest.approx(0.10) and c[0]["verdict"] == "no change"
    c = [_case(1.08, 1e-6, noise=0.005)]
    gate.decide(c, gate.GateConfig(threshold=0.02, k=2))
    assert c[0]["min_effect"] == pytest.approx(0.02) and c[0]["verdict"] == "regression"


def test_a_regression_the_rerun_refutes_is_not_a_failure():
    cfg = gate.GateConfig()
    first = gate.decide([_case(1.3, 1e-5, name="a"), _case(1.3, 1e-5, name="b")], cfg)
    gate.confirm(first, [_case(1.3, 1e-5, name="a"), _case(1.0, 0.7, name="b")], cfg)
    assert first[0]["verdict"] == "regression (confirmed)" and gate.is_failure(first[0])
    assert first[1]["verdict"] == "no change" and not gate.is_failure(first[1])


def test_a_rerun_is_corrected_across_every_compared_case():
    # One flagged case re-run with p 0.02: on its own it is significant, but it is one of 10 compared cases.
    assert gate.adjust([0.02], "holm", family=10) == pytest.approx([0.2])
    assert gate.adjust([0.02, 0.001], "bh", family=10) == pytest.approx([0.1, 0.01])
    full = gate.adjust([0.02, 0.001] + [1.0] * 8, "bh")  # the unlisted cases counted as p = 1
    assert full[:2] == pytest.approx(gate.adjust([0.02, 0.001], "bh", family=10))
    cfg = gate.GateConfig()
    first = gate.screen([_case(1.3, 0.01, name="a")], cfg)
    assert first[0]["verdict"] == "regression"  # flagged: slower than the threshold
    gate.confirm(first, [_case(1.3, 0.02, name="a")], cfg, family=10)
    assert first[0]["verdict"] == "no change" and "not confirmed" in first[0]["note"]
    first = gate.screen([_case(1.3, 0.01, name="a")], cfg)
    gate.confirm(first, [_case(1.3, 0.001, name="a")], cfg, family=10)
    assert first[0]["verdict"] == "regression (confirmed)"


def test_the_screen_is_lenient_only_for_regressions():
    cfg = gate.GateConfig(threshold=0.02)

    def screened(priors):
        return gate.screen([_case(1.10, 0.03, name="slow"), _case(0.90, 0.03, name="fast"),
                            _case(1.01, 1e-6, name="tiny"), _case(1.03, 0.6, name="noisy"),
                            _case(0.80, 1e-6, name="faster")], cfg, priors)

    # Every case that may be slower than the threshold is flagged, significant or not (fresh pairs decide);
    # an improvement is final here, so it must be significant after correction (Holm over 5: 0.03 -> 0.09).
    calibrated = screened({f"s|{name}|i|fwd": 0.0 for name in ("slow", "fast", "tiny", "noisy", "faster")})
    assert [c["verdict"] for c in calibrated] == ["regression", "no change", "no change", "regression", "improvement"]
    assert calibrated[1]["p_adjusted"] == pytest.approx(0.09)
    # Without a calibration every case may carry the default between-pair sd: 1.01 on one pair may be a 5%
    # slowdown there, so the screen flags it too.
    assert [c["verdict"] for c in screened(None)] == ["regression", "no change", "regression", "regression",
                                                      "improvement"]


def test_both_gate_workers_share_the_same_cpus():
    from twinbench.harness.gate import against as gate_against

    allowed = sorted(os.sched_getaffinity(0))
    assert gate_against.shared_cpus("cpu", True, None) == allowed[-1:]
    assert gate_against.shared_cpus("cpu", True, 64) == allowed[-64:]
    assert gate_against.shared_cpus("cpu", False, None) is None
    assert gate_against.shared_cpus("cuda:0", True, None) is None


# --- stored baselines through the CLI -------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    doc = make_doc(planted=False)
    ok_only = dict(doc, results=[r for r in doc["results"] if r["status"] in ("ok", "skipped")])
    atomic_write_json(tmp_path / "r.json", ok_only)
    assert main(["baseline", "save", str(tmp_path / "r.json"), "--dir", str(tmp_path / "bl")]) == 0
    return tmp_path, ok_only


def test_baseline_file_is_one_reviewable_line_per_entry(saved, capsys):
    tmp, _ = saved
    path = tmp / "bl" / f"{FP}.json"
    lines = path.read_text().splitlines()
    entry_lines = [ln for ln in lines if ln.lstrip().startswith('{"suite"')]
    assert len(entry_lines) == 14  # (3 cases x reference+fast, + the n=512 reference) x 2 modes
    assert json.loads(path.read_text())["kind"] == "twinbench-baseline"
    assert main(["baseline", "show", "--dir", str(tmp / "bl"), "-v"]) == 0
    assert "14 entries" in capsys.readouterr().out


def test_gate_passes_against_its_own_baseline(saved, capsys):
    tmp, _ = saved
    assert main(["gate", str(tmp / "r.json"), "--baseline", str(tmp / "bl")]) == 0
    assert "gate PASS" in capsys.readouterr().out


def test_gate_fails_a_planted_slowdown_and_writes_its_outputs(saved, capsys):
    tmp, doc = saved
    atomic_write_json(tmp / "slow.json", slowed(doc, "fast", 1.6))
    out = tmp / "g"
    assert main(["gate", str(tmp / "slow.json"), "--baseline", str(tmp / "bl"), "--out", str(out)]) == 1
    text = capsys.readouterr().out
    assert "regression (unconfirmed)" in text and "gate FAIL" in text
    result = json.loads((out / "gate.json").read_text())
    flagged = {(c["impl"], c["mode"]) for c in result["cases"] if gate.is_failure(c)}
    assert flagged == {("fast", "fwd"), ("fast", "fwdbwd")}
    assert all(c["ratio"] == pytest.approx(1.6, rel=0.05) for c in result["cases"] if gate.is_failure(c))
    assert "regression" in (out / "summary.md").read_text() and (out / "report.html").exists()


def test_a_confirmation_run_without_the_slowdown_clears_the_gate(saved):
    tmp, doc = saved
    atomic_write_json(tmp / "slow.json", slowed(doc, "fast", 1.6))
    atomic_write_json(tmp / "fresh.json", make_doc(planted=False, seed=7))
    args = ["gate", str(tmp / "slow.json"), "--baseline", str(tmp / "bl"), "--confirm"]
    assert main([*args, str(tmp / "fresh.json")]) == 0
    atomic_write_json(tmp / "slow2.json", slowed(make_doc(planted=False, seed=9), "fast", 1.6))
    assert main([*args, str(tmp / "slow2.json")]) == 1


def test_a_parity_failure_fails_the_gate(saved, tmp_path):
    tmp, _ = saved
    atomic_write_json(tmp / "bad.json", make_doc(planted=False))
    assert main(["gate", str(tmp / "bad.json"), "--baseline", str(tmp / "bl")]) == 1


def test_another_hard_fingerprint_is_refused_unless_allowed(saved, capsys):
    tmp, doc = saved
    other = json.loads(json.dumps(doc))
    other["fingerprints"][FP] = fingerprint(threads=8)
    atomic_write_json(tmp / "other.json", other)
    base_file = tmp / "bl" / f"{FP}.json"
    out = tmp / "never"
    assert main(["gate", str(tmp / "other.json"), "--baseline", str(base_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cpu_threads: 2 != 8" in err and "--allow-fingerprint-mismatch" in err and err.count("\n") == 1
    assert not out.exists()
    assert main(["gate", str(tmp / "other.json"), "--baseline", str(base_file), "--allow-fingerprint-mismatch"]) == 0


def test_unreadable_baseline_is_one_line_exit_2_and_nothing_is_written(saved, capsys):
    tmp, _ = saved
    broken = tmp / "bl" / f"{FP}.json"
    broken.write_text('{"kind": "twinbench-baseline", "version": 1, "entries": [')
    before = broken.read_text()
    assert main(["gate", str(tmp / "r.json"), "--baseline", str(broken), "--out", str(tmp / "o")]) == 2
    assert "cannot read baseline" in capsys.readouterr().err
    assert main(["baseline", "save", str(tmp / "r.json"), "--dir", str(tmp / "bl")]) == 2
    assert broken.read_text() == before and not (tmp / "o").exists()


def test_too_few_samples_is_a_usage_error(saved, capsys):
    tmp, doc = saved
    short = json.loads(json.dumps(doc))
    for rec in short["results"]:
        if rec.get("timing"):
            for mode in ("fwd", "fwdbwd"):
                rec["timing"][mode]["samples_ms"] = rec["timing"][mode]["samples_ms"][:6]
    atomic_write_json(tmp / "short.json", short)
    assert main(["gate", str(tmp / "short.json"), "--baseline", str(tmp / "bl")]) == 2
    assert "at least 7" in capsys.readouterr().err


def test_gate_needs_exactly_one_mode(capsys):
    assert main(["gate"]) == 2
    assert "exactly one of --baseline" in capsys.readouterr().err
    assert main(["gate", "--against", "no-such-ref-xyz", "--suite", "attention"]) == 2
    assert "not a commit" in capsys.readouterr().err


# --- gate --against on a tiny git repository ------------------------------------------------------

SUITE = '''
from twinbench.harness.core.case import Case
from twinbench.harness.core.inputs import generator, randn
from twinbench.harness.core.registry import Inputs, Suite, register_impl, register_suite


def make_inputs(case, device, seed):
    gen = generator(seed)
    return Inputs(tensors={"x": randn((case["n"], case["n"]), "fp32", device, gen),
                           "w": randn((case["n"], case["n"]), "fp32", device, gen)})


register_suite(Suite(name="toy", description="x @ w", profiles={"quick": [Case.of(n=96)]},
                     make_inputs=make_inputs, trials=1))


@register_impl("toy", "reference", tags=("reference",), backward=False)
def reference(x, w):
    return x @ w
'''
IMPL = '''
import torch
from twinbench.harness.core.registry import register_impl


@register_impl("toy", "mm", tags=("ours",), backward=False)
def mm(x, w):
    {body}
'''
FAST = "return torch.mm(x, w)"
SLOW = "for _ in range(3):\n        torch.mm(x, w)\n    return torch.mm(x, w)"


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    for pkg in ("twinbench", "harness", "reports"):
        shutil.copytree(ROOT / pkg, repo / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for pkg in ("suites", "impls", "reference"):
        (repo / pkg).mkdir()
        (repo / pkg / "__init__.py").write_text("")
    (repo / "suites" / "toy.py").write_text(SUITE)
    (repo / "impls" / "toy_mm.py").write_text(IMPL.format(body=FAST))
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "."], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "base"], cwd=repo, check=True)
    return repo


def _gate_against(repo: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(repo))
    return subprocess.run([sys.executable, "-m", "twinbench", "gate", "--against", "HEAD", "--suite", "toy",
                           "--impl", "mm", "--rounds", "9", "--out", str(out), *extra], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)


def test_against_catches_a_planted_slowdown_in_the_working_tree(toy_repo, tmp_path):
    impl = toy_repo / "impls" / "toy_mm.py"
    impl.write_text(IMPL.format(body=SLOW))  # 4x the work, uncommitted: the head is slower than the base
    try:
        done = _gate_against(toy_repo, tmp_path / "g")
    finally:
        impl.write_text(IMPL.format(body=FAST))
    assert done.returncode == 1, done.stdout + done.stderr
    result = json.loads((tmp_path / "g" / "gate.json").read_text())
    [case] = result["cases"]
    assert case["verdict"] == "regression (confirmed)" and case["ratio"] > 2, case
    assert "confirmed at look" in case["note"] and case["looks"][-1]["outcome"] == "confirmed"
    assert "pinned to CPU(s)" in result["note"] and "look(s) of 9 rounds" in result["note"]
    assert f"at most {gate.MAX_LOOKS} per case" in result["note"] and "no calibration" in result["note"]
    listed = subprocess.run(["git", "worktree", "list"], cwd=toy_repo, capture_output=True, text=True).stdout
    assert len(listed.strip().splitlines()) == 1  # the base worktree was removed


def test_against_passes_when_nothing_changed(toy_repo, tmp_path):
    # A threshold the toy's 9-round noise cannot reach keeps this run to the screen: an uncalibrated A/A case
    # near the threshold would be looked at on up to stats.MAX_LOOKS fresh pairs (a worker restart each),
    # which the seeded simulation (test_gate_sequential.py) covers without processes.
    done = _gate_against(toy_repo, tmp_path / "g", "--threshold", "0.5")
    assert done.returncode == 0, done.stdout + done.stderr
    [case] = json.loads((tmp_path / "g" / "gate.json").read_text())["cases"]
    assert case["verdict"] in ("no change", "improvement") and case["n_base"] == case["n_head"] == 9
    assert 0.7 < case["ratio"] < 1.4
    assert textwrap.dedent(done.stdout).count("gate PASS") == 1


def test_calibrate_catches_a_large_planted_slowdown_and_reports_it(toy_repo, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(toy_repo))
    out = tmp_path / "cal.json"
    done = subprocess.run([sys.executable, "-m", "twinbench", "calibrate", "--suite", "toy", "--impl", "mm",
                           "--comparisons", "2", "--power-comparisons", "2", "--slowdowns", "200", "--rounds", "7",
                           "--block-ms", "2", "--test", "mwu", "--pair-looks", "2", "--threshold", "0.5", "--json", str(out)], cwd=toy_repo,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    for mode in ("against", "baseline"):
        [power] = result[mode]["power"]
        assert power["slowdown"] == 2.0 and power["tests"]["mwu"]["confirmed"] == 2, (mode, result[mode])
        assert result[mode]["aa"]["comparisons"] == 2
    aa = result["against"]["aa"]["tests"]["mwu"]
    assert len(aa["false_alarms"]) == aa["confirmed"]  # each A/A alarm named, with its looks
    # each phase's counts are printed as it ends (a run cut later keeps them in its log); misses carry their looks
    assert f"slowdown 0%: 2 comparisons done; confirmed mwu {aa['confirmed']}/2" in done.stdout
    assert "slowdown 200%: 2 comparisons done; confirmed mwu 2/2" in done.stdout
    assert result["against"]["power"][0]["tests"]["mwu"]["missed"] == []
    # the between-pair noise prior of every workload item, from 2 fresh pairs, as `gate --against` reads it
    priors = result["against"]["pair_noise"]
    assert priors["looks"] == 2 and set(priors["items"]) == set(result["workload"])
    assert all(v >= 0 for v in priors["items"].values())
    from twinbench.harness.gate.stored import load_calibration

    assert load_calibration(out)["against"]["pair_noise"] == priors   # valid against the calibration schema
    assert "smallest slowdown caught" in done.stdout


def test_calibration_summary_names_missed_items_and_false_alarms():
    from twinbench.harness.gate.calibrate import _format

    def run(slowdown, **tests):
        return {"comparisons": 4, "slowdown": slowdown, "tests": {"wilcoxon": {"flagged": 2, **tests}}}

    res = {"threshold": 0.02,
           "aa": run(0.0, confirmed=1, false_alarms=[{"item": "s|c|fast|fwd", "looks": [1.03, 1.04]}]),
           "power": [run(0.05, confirmed=3, missed=[{"item": "s|c|slow|fwdbwd", "looks": [1.01]}])],
           "smallest_caught": {"wilcoxon": None}}
    text = _format("against", res, ["wilcoxon"])
    assert "A/A false alarms 1/4 = 25.00%" in text and "A/A false alarms: s|c|fast|fwd" in text
    assert "5%: caught 3/4 = 75%" in text and "missed at 5%: s|c|slow|fwdbwd" in text
