"""The interleaved gate's two stages (screen, then sequential confirmation) on seeded synthetic samples.

No timing: samples are drawn from known distributions shaped like the gate's (lognormal per-sample noise
with a heavy tail, a drift shared by both sides of a round, cases of very different noise), so the error
rates the issue asks for are proven on the design itself: <= 1% A/A false alarms over >= 200 comparisons
and >= 90% of planted 5% slowdowns caught, at the whole quick profile's family size (176 timed items).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from twinbench.harness.gate import stats as gate

ROUNDS = 41            # the gate's default rounds (harness/gate/against.py)
FAMILY = 176           # timed items of the CPU quick profile
CONFIG = gate.GateConfig(threshold=0.02, test="wilcoxon", n_boot=200)   # the --against defaults, fewer resamples


class Machine:
    """Paired samples of ``n`` cases: case i has per-sample log noise ``noise[i]`` (t-distributed, 3 df,
    so a few samples are far off), a per-round drift common to both sides, and a planted slowdown."""

    def __init__(self, n: int, seed: int, biased: float = 0.0, bias_sd: float = 0.03):
        self.rng = np.random.default_rng(seed)
        # Noise spread like the quick profile's: most cases 1-3% per sample, some up to 8%.
        self.noise = self.rng.choice([0.01, 0.02, 0.03, 0.05, 0.08], size=n, p=[0.3, 0.3, 0.2, 0.15, 0.05])
        # A share ``biased`` of the cases is layout-sensitive: each worker process is slower or faster on them
        # by a log-normal factor of sd ``bias_sd`` for its whole life (drawn per process, per side).
        self.bias_sd = np.where(self.rng.random(n) < biased, bias_sd, 0.0)
        self.biases: dict[tuple[int, int], tuple[float, float]] = {}

    def measure(self, i: int, slowdown: float, processes: int = -1,
                rounds: int = ROUNDS) -> tuple[list[float], list[float]]:
        """Samples from worker pair ``processes`` (-1: the first run's; the gate restarts both per look)."""
        if (i, processes) not in self.biases:
            self.biases[i, processes] = tuple(self.rng.normal(0.0, self.bias_sd[i], 2))
        bias_base, bias_head = self.biases[i, processes]
        drift = self.rng.normal(0.0, 0.05, rounds)
        base = np.exp(bias_base + drift + self.noise[i] * self.rng.standard_t(3, rounds))
        head = np.exp(bias_head + drift + self.noise[i] * self.rng.standard_t(3, rounds)) * (1 + slowdown)
        return list(base), list(head)


def gate_run(machine: Machine, slowdowns: list[float], config: gate.GateConfig = CONFIG,
             confirm=gate.confirm_sequentially, restart: bool = True) -> list[dict]:
    """One `gate --against` over len(slowdowns) cases: screen, then confirm, as harness/gate/against.py
    (each look on a fresh worker pair; ``restart=False``: every look on the first run's processes)."""
    cases = []
    for i, s in enumerate(slowdowns):
        c = {"suite": "s", "case": f"c{i}", "impl": "i", "device": "cpu", "mode": "fwd", "index": i}
        cases.append(dict(c, **gate.compare_samples(*machine.measure(i, s), paired=True, test=config.test,
                                                    n_boot=config.n_boot)))
    gate.screen(cases, config)
    confirm(cases, config, lambda c, look: machine.measure(c["index"], slowdowns[c["index"]],
                                                           processes=look if restart else -1))
    return cases


def confirmed(cases: list[dict]) -> list[bool]:
    return [c["verdict"] == "regression (confirmed)" for c in cases]


def test_aa_false_alarms_over_the_whole_profile_stay_under_one_percent():
    alarms = comparisons = flagged = 0
    for run in range(2):   # 2 gate runs of the whole profile: 352 A/A comparisons
        cases = gate_run(Machine(FAMILY, seed=run), [0.0] * FAMILY)
        alarms += sum(confirmed(cases))
        flagged += sum("looks" in c for c in cases)
        comparisons += len(cases)
    assert comparisons >= 200
    assert alarms / comparisons <= 0.01, (alarms, comparisons)
    assert flagged > 0   # the screen is lenient: some null cases do reach the confirmation (and are refuted)


def test_planted_five_percent_slowdowns_are_caught_in_any_case():
    """10 slowed cases per run among 166 unchanged ones, 10 runs: 100 planted slowdowns, every noise level."""
    caught = planted = alarms = nulls = 0
    for run in range(10):
        slowdowns = [0.0] * FAMILY
        for i in np.random.default_rng(100 + run).choice(FAMILY, 10, replace=False):
            slowdowns[i] = 0.05
        cases = gate_run(Machine(FAMILY, seed=100 + run), slowdowns)
        for s, ok in zip(slowdowns, confirmed(cases)):
            planted += s > 0
            caught += s > 0 and ok
            nulls += s == 0
            alarms += s == 0 and ok
    assert caught / planted >= 0.90, (caught, planted)
    assert alarms / nulls <= 0.01, (alarms, nulls)


def test_a_gate_without_the_split_alpha_would_fail_the_false_alarm_check():
    """Planted wrong design: a screen of every ratio > 1, each of 3 looks at the full alpha (no split over
    looks or flagged cases), no minimum effect from the case's noise. The A/A check above must catch it."""
    def naive(cases, config, rerun):
        flagged = sum(c["verdict"] == "regression" for c in cases)
        unsplit = replace(config, alpha=config.alpha * 3 * max(1, flagged), k=0.0, threshold=0.0)
        return gate.confirm_sequentially(cases, unsplit, rerun, spending=(1 / 3, 1 / 3, 1 / 3))

    cases = gate_run(Machine(FAMILY, seed=7), [0.0] * FAMILY, replace(CONFIG, threshold=0.0), confirm=naive)
    assert sum(confirmed(cases)) / len(cases) > 0.01


def test_looks_stop_early_and_record_why():
    machine = Machine(2, seed=3)
    machine.noise[:] = 0.01
    cases = gate_run(machine, [0.30, 0.0])
    slow = cases[0]
    # obvious: confirmed at the first look allowed to confirm (two fresh worker pairs)
    assert slow["verdict"] == "regression (confirmed)" and len(slow["looks"]) == gate.MIN_LOOKS == 2
    assert slow["looks"][-1]["level"] == pytest.approx(CONFIG.alpha * gate.SPENDING[1] / 1)
    assert all(look["look_ratio"] > 1.2 for look in slow["looks"])


def test_a_per_process_bias_is_not_confirmed_when_each_look_runs_on_fresh_processes():
    """A/A, with a quarter of the cases layout-sensitive (each process 3% faster or slower on them for its
    whole life, the size measured on this box): confirmed only if fresh processes reproduce it."""
    alarms = comparisons = 0
    for run in range(2):
        cases = gate_run(Machine(FAMILY, seed=200 + run, biased=0.25), [0.0] * FAMILY)
        alarms += sum(confirmed(cases))
        comparisons += len(cases)
    assert alarms / comparisons <= 0.01, (alarms, comparisons)


def test_looks_on_the_first_runs_processes_would_confirm_a_per_process_bias():
    """Planted wrong design: every look re-measures the processes the screen flagged (no restart)."""
    cases = gate_run(Machine(FAMILY, seed=200, biased=0.25), [0.0] * FAMILY, restart=False)
    assert sum(confirmed(cases)) / len(cases) > 0.01


def test_planted_slowdowns_are_still_caught_among_layout_sensitive_cases():
    caught = planted = 0
    for run in range(6):
        slowdowns = [0.0] * FAMILY
        for i in np.random.default_rng(300 + run).choice(FAMILY, 10, replace=False):
            slowdowns[i] = 0.05
        cases = gate_run(Machine(FAMILY, seed=300 + run, biased=0.25, bias_sd=0.01), slowdowns)
        for s, ok in zip(slowdowns, confirmed(cases)):
            planted += s > 0
            caught += s > 0 and ok
    assert caught / planted >= 0.90, (caught, planted)


def test_a_case_flagged_by_chance_is_refuted_or_left_unconfirmed():
    cases = [{"suite": "s", "case": "c", "impl": "i", "mode": "fwd", "verdict": "regression", "ratio": 1.03}]
    machine = Machine(1, seed=5)
    gate.confirm_sequentially(cases, CONFIG, lambda c, look: machine.measure(0, 0.0))
    assert cases[0]["verdict"] == "no change" and cases[0]["looks"][-1]["outcome"] in ("futile", "open")


def test_spending_must_sum_to_one():
    with pytest.raises(ValueError):
        gate.confirm_sequentially([], CONFIG, lambda c, look: ([], []), spending=(0.5, 0.6))


def test_several_threads_are_timed_on_the_wall_clock():
    """CPU time sums over threads: a kernel that stopped splitting its work would look unchanged."""
    from twinbench.harness.core.errors import UsageError
    from twinbench.harness.gate.against import clock_for

    assert clock_for("cpu", None, None) == "process" and clock_for("cpu", None, 1) == "process"
    assert clock_for("cpu", None, 2) == "wall"
    with pytest.raises(UsageError):
        clock_for("cpu", "process", 2)


def test_process_clock_with_threads_is_a_usage_error(capsys, tmp_path):
    from twinbench.harness.cli.main import main

    code = main(["gate", "--against", "HEAD", "--threads", "2", "--clock", "process", "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "lost parallelism" in err[0]
    assert not (tmp_path / "g").exists()


class FakeGateWorker:
    """Stands in for a gate worker process: ``restart`` starts a new process that has prepared nothing, and a
    case timed before it was prepared on the current process fails (the real worker's KeyError)."""

    def __init__(self):
        self.prepared: set[str] = set()
        self.hash_seeds = [0]

    def restart(self, hash_seed: int) -> None:
        self.prepared = set()
        self.hash_seeds.append(hash_seed)

    def ready(self):
        return self

    def prepare(self, msg):
        from twinbench.harness.run.process import Prepared

        self.prepared.add(msg.key)
        return Prepared(ok=True, per_call_ms=1.0)

    def time(self, msg):
        from twinbench.harness.run.process import Timed

        if msg.key not in self.prepared:
            return Timed(ok=False, why=f"KeyError: {msg.key!r}")
        return Timed(ok=True, ms=1.0)

    def stop(self) -> None:
        pass


def test_each_look_restarts_both_workers_once_and_later_cases_are_prepared_again():
    """The calibration's next group measures cases prepared before a look restarted the workers."""
    from twinbench.harness.gate.against import Item, Pair

    base, head = FakeGateWorker(), FakeGateWorker()
    pair = Pair(base, head, rounds=7, block_ms=1.0)
    first, second = (Item("s", f"c{i}", {}, "impl", "fwd") for i in range(2))
    for item in (first, second):
        assert pair.prepare(item)["ok"]
    pair.refresh(first, look=0)
    pair.refresh(second, look=0)          # same look: no second restart
    pair.refresh(first, look=1)
    assert base.hash_seeds == head.hash_seeds == [0, 1, 2]   # one fresh process per look, equal seeds
    b, h = pair.measure(second)           # prepared before the restarts: prepared again, not a KeyError
    assert len(b) == len(h) == 7
