"""The statistical gate (docs/method.md §4): is the new code slower than the base, beyond noise?

Per case: a two-sided test on the timing samples (Mann-Whitney U, exact where possible; or the paired
Wilcoxon signed-rank on per-round log ratios for interleaved runs), a ratio new/base with a bootstrap
95% interval, and a minimum effect ``max(threshold, k x the case's own noise)``. Across cases: Holm
(default) or Benjamini-Hochberg. A flagged case must persist in an independent re-run (``confirm``).
Pure statistics over samples: the modes that gather them are harness.gate.against (interleaved
``gate --against``) and harness.gate.stored (``gate --baseline``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from twinbench.harness.core.errors import UsageError

MIN_SAMPLES = 7  # 6 vs 6 can never reach p < 0.002 with the exact test (docs/method.md §4)
TESTS = ("mwu", "wilcoxon")
CORRECTIONS = ("holm", "bh")


@dataclass
class GateConfig:
    threshold: float = 0.05   # the product's own threshold (relative slowdown)
    k: float = 2.0            # min effect >= k x the case's own noise
    alpha: float = 0.05       # family-wise (Holm) or false-discovery (BH) level across all compared cases
    correction: str = "holm"
    test: str = "mwu"
    n_boot: int = 2000
    seed: int = 0

    def check(self) -> None:
        if self.correction not in CORRECTIONS:
            raise UsageError(f"--correction must be one of {', '.join(CORRECTIONS)}")
        if self.test not in TESTS:
            raise UsageError(f"--test must be one of {', '.join(TESTS)}")
        if not 0 < self.alpha < 1:
            raise UsageError("--alpha must be between 0 and 1")
        if self.threshold < 0 or self.k < 0:
            raise UsageError("--threshold and --k must be >= 0")


def _positive(name: str, samples: Sequence[float]) -> np.ndarray:
    a = np.asarray(list(samples), dtype=float)
    if a.size < MIN_SAMPLES:
        raise UsageError(f"{name} has {a.size} timing samples; the gate needs at least {MIN_SAMPLES} per side "
                         f"(run with --rounds >= {MIN_SAMPLES})")
    if not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise UsageError(f"{name} has non-positive or non-finite timing samples")
    return a


def mann_whitney_p(base: np.ndarray, head: np.ndarray) -> float:
    """Two-sided Mann-Whitney U; exact when there are no ties (scipy's exact null), else asymptotic."""
    from scipy.stats import mannwhitneyu

    ties = np.unique(np.concatenate([base, head])).size < base.size + head.size
    method = "asymptotic" if ties else "exact"
    return float(mannwhitneyu(head, base, alternative="two-sided", method=method).pvalue)


def wilcoxon_p(log_ratios: np.ndarray) -> float:
    from scipy.stats import wilcoxon

    if np.all(log_ratios == 0):
        return 1.0
    return float(wilcoxon(log_ratios, alternative="two-sided").pvalue)


def compare_samples(base: Sequence[float], head: Sequence[float], *, paired: bool, test: str = "mwu",
                    extra_noise: float = 0.0, n_boot: int = 2000, seed: int = 0,
                    name: str = "case") -> dict[str, Any]:
    """Ratio new/base (> 1 slower), its bootstrap 95% interval, p-value and the case's own noise.

    ``paired``: samples were taken interleaved round by round (``--against``); the ratio is the median of
    per-round ratios, so machine drift cancels. Otherwise (stored baseline) it is the ratio of medians,
    and ``extra_noise`` (the machine's run-to-run noise, from calibration) is added to the noise.
    """
    b = _positive(f"{name} (base)", base)
    h = _positive(f"{name} (new)", head)
    rng = np.random.default_rng(seed)
    if paired:
        if b.size != h.size:
            raise UsageError(f"{name}: interleaved samples must pair up ({b.size} base vs {h.size} new)")
        logr = np.log(h / b)
        est = float(np.median(logr))
        idx = rng.integers(0, logr.size, size=(n_boot, logr.size))
        boots = np.median(logr[idx], axis=1)
    else:
        est = float(np.log(np.median(h) / np.median(b)))
        ib = rng.integers(0, b.size, size=(n_boot, b.size))
        ih = rng.integers(0, h.size, size=(n_boot, h.size))
        boots = np.log(np.median(h[ih], axis=1) / np.median(b[ib], axis=1))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    noise = float(np.sqrt(np.std(boots) ** 2 + extra_noise ** 2))
    if test == "wilcoxon":
        if not paired:
            raise UsageError("the Wilcoxon signed-rank test needs paired (interleaved) samples")
        p = wilcoxon_p(np.log(h / b))
    else:
        p = mann_whitney_p(b, h)
    return {"ratio": float(np.exp(est)), "ci_low": float(np.exp(lo)), "ci_high": float(np.exp(hi)),
            "p_value": p, "noise": noise, "n_base": int(b.size), "n_head": int(h.size), "test": test,
            "paired": paired}


def adjust(pvalues: Sequence[float], method: str = "holm", family: int | None = None) -> list[float]:
    """Holm step-down (family-wise) or Benjamini-Hochberg (false discovery) adjusted p-values.

    ``family``: the number of hypotheses the correction covers when only some are given (a confirmation
    run re-measures the flagged cases but must still correct for every compared case); default len(pvalues).
    """
    p = np.asarray(list(pvalues), dtype=float)
    if p.size == 0:
        return []
    m = max(p.size, family or 0)
    order = np.argsort(p)
    adjusted = np.empty(p.size)
    if method == "bh":
        if m == p.size:
            from scipy.stats import false_discovery_control

            return [float(x) for x in false_discovery_control(p, method="bh")]
        running = 1.0  # step-up over the given (smallest) p-values, ranks counted within the full family
        for rank in range(p.size - 1, -1, -1):
            i = order[rank]
            running = min(running, p[i] * m / (rank + 1))
            adjusted[i] = running
        return [float(x) for x in adjusted]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return [float(x) for x in adjusted]


def decide(cases: list[dict[str, Any]], config: GateConfig, *, family: int | None = None) -> list[dict[str, Any]]:
    """Adjust p-values across every compared case and give each a verdict (in place; returns cases)."""
    compared = [c for c in cases if c.get("p_value") is not None]
    for c, p_adj in zip(compared, adjust([c["p_value"] for c in compared], config.correction, family)):
        c["p_adjusted"] = p_adj
        c["min_effect"] = max(config.threshold, config.k * c["noise"])
        _verdict(c, significant=p_adj < config.alpha)
    return cases


def screen(cases: list[dict[str, Any]], config: GateConfig) -> list[dict[str, Any]]:
    """First stage of the interleaved gate: flag every case that *looks* slower than the threshold.

    Its verdict comes from :func:`confirm_sequentially` on fresh samples, so the screen may be lenient: it
    costs re-run time, never false alarms. Measured (docs/reports-and-gate.md):
    for a 5% slowdown the first run's p < alpha missed 1 in 8, its ratio > 1 + threshold 1 in 23.
    Improvements are final at this stage, so they must be significant after correction."""
    compared = [c for c in cases if c.get("p_value") is not None]
    for c, p_adj in zip(compared, adjust([c["p_value"] for c in compared], config.correction)):
        c["p_adjusted"] = p_adj
        c["min_effect"] = max(config.threshold, config.k * c["noise"])
        _verdict(c, significant=p_adj < config.alpha)
        if c["verdict"] != "improvement" and c["ratio"] > 1 + config.threshold:
            c["verdict"] = "regression"
            c["note"] = ""
    return cases


def _verdict(c: dict[str, Any], *, significant: bool) -> None:
    if significant and c["ratio"] > 1 + c["min_effect"]:
        c["verdict"] = "regression"
    elif significant and c["ratio"] < 1 / (1 + c["min_effect"]):
        c["verdict"] = "improvement"
    else:
        c["verdict"] = "no change"
        c["note"] = c.get("note") or ("not significant" if not significant else
                                      f"significant but within the minimum effect {c['min_effect']:.3f}")


def confirm(first: list[dict[str, Any]], rerun: list[dict[str, Any]], config: GateConfig, *,
            family: int | None = None) -> list[dict[str, Any]]:
    """Keep a regression only when an independent re-run of the flagged cases flags it again.

    ``family``: correct the re-run across this many cases (all compared ones, after a lenient
    :func:`screen`); default only the re-run cases (after a corrected :func:`decide`)."""
    decide(rerun, config, family=family)
    again = {case_key(c): c for c in rerun}
    for c in first:
        if c["verdict"] != "regression":
            continue
        r = again.get(case_key(c))
        if r is None:
            c["verdict"] = "regression (unconfirmed)"
            c["note"] = "no re-run sample for this case"
        elif r["verdict"] == "regression":
            c["verdict"] = "regression (confirmed)"
            c["note"] = f"re-run: new/base {r['ratio']:.4f} [{r['ci_low']:.4f}, {r['ci_high']:.4f}], p_adj {r['p_adjusted']:.2g}"
        else:
            c["verdict"] = "no change"
            c["note"] = f"flagged once, not confirmed by the re-run (new/base {r['ratio']:.4f}, {r['verdict']})"
    return first


# Sequential confirmation (`gate --against`): the flagged cases are re-measured in up to len(SPENDING) looks of
# the first run's rounds each; look j may confirm at level alpha * SPENDING[j] / (number flagged). The shares sum
# to 1, so by the union bound over looks and flagged cases the family-wise error of the confirmation stays
# <= alpha whatever the looks' dependence (docs/reports-and-gate.md, "Sequential confirmation"). Most of the
# alpha is kept for the last look, where the accumulated rounds give the most power.
SPENDING = (0.1, 0.15, 0.2, 0.25, 0.3)
# Each look runs on a fresh pair of worker processes (harness/gate/against.py, Pair.refresh). A process can be a
# few percent slower than its twin on a case for its whole life (hash seed, address layout: measured 3.5-4% on
# one case in an A/A gate of the quick profile, 2026-12-05, on every look). Pooled rounds treat that as a real
# difference; so a case is confirmed only once MIN_LOOKS fresh pairs have each shown it slower than the
# threshold on their own, and the first look that does not reproduce it ends the confirmation. The first
# look's share of alpha is then never spent (conservative).
MIN_LOOKS = 2
REPRODUCE = 1.0  # a look reproduces a flag when its own ratio is above 1 + REPRODUCE x threshold

Rerun = Callable[[dict[str, Any], int], tuple[Sequence[float], Sequence[float]]]


@dataclass(frozen=True)
class Look:
    """One look of the sequential confirmation at one flagged case (kept in the case's ``looks``)."""

    rounds: int
    ratio: float
    ci_high: float
    p_value: float
    level: float
    min_effect: float
    outcome: str  # "confirmed", "futile" (stopped: cannot reach the minimum effect, or not reproduced) or "open"
    look_ratio: float = float("nan")  # this look's own median new/base, on its fresh pair of processes


def confirm_sequentially(cases: list[dict[str, Any]], config: GateConfig, rerun: Rerun, *,
                         spending: Sequence[float] = SPENDING) -> list[dict[str, Any]]:
    """Second stage of the interleaved gate: confirm :func:`screen`'s flagged cases on fresh paired samples.

    ``rerun(case, look)`` returns fresh (base, head) samples for one look at a flagged case. Samples
    accumulate over looks. A case is confirmed at the first look (from the ``MIN_LOOKS``-th on) where its
    accumulated samples are significant at ``alpha * spending[look] / flagged`` and slower than their
    minimum effect (``max(threshold, k x noise)``, the noise of the accumulated samples), and every look so
    far was, on its own samples, slower than 1 + threshold (each look is a fresh pair of processes: a
    per-process bias does not repeat). It stops early as futile when a look does not reproduce the
    slowdown, or when the ratio's 95% upper bound is below 1 + its minimum effect (stopping for futility
    can only lower the false-alarm rate). Why the family is only the flagged cases: the re-run's samples are independent of
    the screen that chose them, so under no change their p-values are uniform whatever was chosen, and
    Bonferroni within the chosen set bounds the family-wise error by alpha (a selective two-stage design).
    """
    if abs(sum(spending) - 1.0) > 1e-9 or any(w <= 0 for w in spending):
        raise ValueError("alpha spending shares must be positive and sum to 1")
    flagged = [c for c in cases if c["verdict"] == "regression"]
    samples: dict[tuple, tuple[list[float], list[float]]] = {case_key(c): ([], []) for c in flagged}
    still_open = list(flagged)
    for look, share in enumerate(spending):
        level = config.alpha * share / max(1, len(flagged))
        next_open = []
        for c in still_open:
            base, head = samples[case_key(c)]
            b, h = rerun(c, look)
            look_ratio = float(np.median(_positive("look (new)", h) / _positive("look (base)", b)))
            base += list(b)
            head += list(h)
            r = compare_samples(base, head, paired=True, test=config.test, n_boot=config.n_boot,
                                seed=config.seed + 1 + look, name=c.get("impl", "case"))
            min_effect = max(config.threshold, config.k * r["noise"])
            reproduced = look_ratio > 1 + REPRODUCE * config.threshold
            if reproduced and look + 1 >= MIN_LOOKS and r["p_value"] < level and r["ratio"] > 1 + min_effect:
                outcome = "confirmed"
            elif not reproduced or r["ci_high"] < 1 + min_effect:
                outcome = "futile"
            else:
                outcome = "open"
            c.setdefault("looks", []).append(asdict(Look(len(base), r["ratio"], r["ci_high"], r["p_value"], level,
                                                         min_effect, outcome, look_ratio)))
            if outcome == "confirmed":
                c["verdict"] = "regression (confirmed)"
                c["note"] = (f"confirmed at look {look + 1}: new/base {r['ratio']:.4f} [{r['ci_low']:.4f}, "
                             f"{r['ci_high']:.4f}] over {len(base)} fresh rounds, p {r['p_value']:.2g} < {level:.2g}")
            elif outcome == "futile" and not reproduced:
                c["verdict"] = "no change"
                c["note"] = (f"flagged once, not reproduced at look {look + 1} on fresh processes: new/base "
                             f"{look_ratio:.4f} <= 1 + threshold {config.threshold:.3f}")
            elif outcome == "futile":
                c["verdict"] = "no change"
                c["note"] = (f"flagged once, refuted at look {look + 1}: new/base {r['ratio']:.4f}, upper bound "
                             f"{r['ci_high']:.4f} < 1 + minimum effect {min_effect:.3f}")
            else:
                next_open.append(c)
        still_open = next_open
        if not still_open:
            break
    for c in still_open:
        last = c["looks"][-1]
        c["verdict"] = "no change"
        c["note"] = (f"flagged once, not confirmed in {len(spending)} looks ({last['rounds']} fresh rounds: "
                     f"new/base {last['ratio']:.4f}, p {last['p_value']:.2g})")
    return cases


def case_key(c: dict[str, Any]) -> tuple[str, str, str, str, str]:
    return c["suite"], c["case"], c["impl"], c.get("device", ""), c["mode"]


def is_failure(c: dict[str, Any]) -> bool:
    """A regression fails the gate unless a re-run refuted it."""
    return c["verdict"].startswith("regression")


def summarize(cases: list[dict[str, Any]], parity_failures: list[dict[str, Any]], config: GateConfig, *,
              mode: str, mode_text: str, note: str = "") -> dict[str, Any]:
    regressions = [c for c in cases if is_failure(c)]
    improvements = [c for c in cases if c["verdict"] == "improvement"]
    compared = [c for c in cases if c.get("p_value") is not None]
    failed = bool(regressions or parity_failures)
    parts = [f"{len(compared)} cases compared", f"{len(regressions)} regression(s)",
             f"{len(improvements)} improvement(s)"]
    if parity_failures:
        parts.append(f"{len(parity_failures)} parity failure(s)")
    not_compared = len(cases) - len(compared)
    if not_compared:
        parts.append(f"{not_compared} not compared (new or missing)")
    for c in cases:
        c.setdefault("note", "")
        for key in ("ratio", "ci_low", "ci_high", "p_value", "p_adjusted", "noise", "min_effect"):
            c.setdefault(key, None)
    return {"mode": mode, "mode_text": mode_text, "verdict": "fail" if failed else "pass",
            "summary": ", ".join(parts), "exit_code": 1 if failed else 0, "compared": len(compared),
            "note": note, "cases": cases, "parity_failures": parity_failures, **asdict(config)}


def format_table(result: dict[str, Any]) -> str:
    """Plain-text table for the console / CI log: ratio, interval, p-value and verdict per case."""
    head = f"{'suite':<14} {'impl':<18} {'mode':<7} {'new/base':>9} {'95% interval':>19} {'p':>9} " \
           f"{'p adj':>9} {'min eff':>8}  verdict / case"
    lines = [head, "-" * len(head)]
    for c in sorted(result["cases"], key=lambda c: (not is_failure(c), c["suite"], c["case"], c["impl"])):
        if c.get("ratio") is None:
            lines.append(f"{c['suite']:<14} {c['impl']:<18} {c['mode']:<7} {'':>9} {'':>19} {'':>9} {'':>9} "
                         f"{'':>8}  {c['verdict']}: {c['case']}")
            continue
        ci = f"[{c['ci_low']:.4f}, {c['ci_high']:.4f}]"
        lines.append(f"{c['suite']:<14} {c['impl']:<18} {c['mode']:<7} {c['ratio']:>9.4f} {ci:>19} "
                     f"{c['p_value']:>9.2g} {c['p_adjusted']:>9.2g} {c['min_effect']:>8.3f}  "
                     f"{c['verdict']}: {c['case']}" + (f" ({c['note']})" if c.get("note") else ""))
    for r in result["parity_failures"]:
        lines.append(f"{r['suite']:<14} {r['impl']:<18} {'parity':<7} {'':>9} {'':>19} {'':>9} {'':>9} {'':>8}  "
                     f"parity failure ({r['status']}): {r['case']}: {r.get('reason', '')}")
    lines.append(f"gate {result['verdict'].upper()} ({result['mode_text']}): {result['summary']}")
    if result.get("note"):
        lines.append(result["note"])
    return "\n".join(lines)
