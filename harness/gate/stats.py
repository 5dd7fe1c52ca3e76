"""The statistical gate (docs/method.md §4): is the new code slower than the base, beyond noise?

Per case: a two-sided test on the timing samples (Mann-Whitney U, exact where possible; or the paired
Wilcoxon signed-rank on per-round log ratios for interleaved runs), a ratio new/base with a bootstrap
95% interval, and a minimum effect ``max(threshold, k x the case's own noise)``. Across cases: Holm
(default) or Benjamini-Hochberg. A flagged case must persist in an independent re-run (``confirm``).
Pure statistics over samples: the modes that gather them are harness.gate.against (interleaved
``gate --against``) and harness.gate.stored (``gate --baseline``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from twinbench.harness.core.errors import UsageError
from twinbench.harness.core.interleave import two_round_blocks

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


def look_ratio(base: Sequence[float], head: Sequence[float], *, n_boot: int = 2000, seed: int = 0,
               name: str = "case") -> tuple[float, float]:
    """One confirmation look's own median ratio new/base over two-round blocks (:func:`balanced_log_ratios`) and
    the bootstrap sd of its log (no test: the looks are tested together, :func:`look_statistics`)."""
    logr = balanced_log_ratios(_positive(f"{name} (base)", base), _positive(f"{name} (new)", head), name)
    idx = np.random.default_rng(seed).integers(0, logr.size, size=(n_boot, logr.size))
    return float(np.exp(np.median(logr))), float(np.std(np.median(logr[idx], axis=1)))


def balanced_log_ratios(b: np.ndarray, h: np.ndarray, name: str = "case") -> np.ndarray:
    """log(new/base) of interleaved samples, one value per two consecutive rounds (an "ABBA" block): the gate
    times the two workers alternately, base first in even rounds and new first in odd ones
    (against.Pair.measure), so each block's mean cancels the order effect (interleave.two_round_blocks says why;
    a toy A/A gate with 41 per-round ratios, base first 21 times, confirmed a "regression" of 1.196 over 19 fresh
    pairs before the blocks). An odd last round is left out (it has no partner)."""
    if b.size != h.size:
        raise UsageError(f"{name}: interleaved samples must pair up ({b.size} base vs {h.size} new)")
    return two_round_blocks(np.log(h / b))


def compare_samples(base: Sequence[float], head: Sequence[float], *, paired: bool, test: str = "mwu",
                    extra_noise: float = 0.0, n_boot: int = 2000, seed: int = 0,
                    name: str = "case") -> dict[str, Any]:
    """Ratio new/base (> 1 slower), its bootstrap 95% interval, p-value and the case's own noise.

    ``paired``: samples were taken interleaved round by round (``--against``); the ratio is the median of
    the ratios of two-round blocks (:func:`balanced_log_ratios`), so machine drift and the order within a
    round cancel. Otherwise (stored baseline) it is the ratio of medians,
    and ``extra_noise`` (the machine's run-to-run noise, from calibration) is added to the noise.
    """
    b = _positive(f"{name} (base)", base)
    h = _positive(f"{name} (new)", head)
    rng = np.random.default_rng(seed)
    if paired:
        logr = balanced_log_ratios(b, h, name)
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
        p = wilcoxon_p(logr)
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


# Sequential confirmation (`gate --against`), two levels (docs/reports-and-gate.md, "Sequential confirmation").
# The unit of independent replication is a LOOK: one fresh pair of worker processes (harness/gate/against.py,
# Pair.refresh). A process can be a few percent slower than its twin on a case for its whole life (hash seed,
# address layout: 3.5-4% on one case in an A/A gate of the quick profile, 2026-12-05; up to ~30% on a few
# bimodal cases), so rounds from one pair are not independent evidence: pooling them treats a per-process bias
# as a real difference. Each look contributes one number, its own median log ratio y_j (with its bootstrap
# error s_j), and the test is on the look means: y_j = effect + pair_j + within_j, with var(pair_j) = the
# case's between-pair variance (a prior from `twinbench calibrate`, or DEFAULT_PAIR_SD) and var(within_j) =
# s_j^2. The variance used is the larger of the prior's and the looks' own sample variance (a guard when the
# prior is too small; then the reference is Student's t with looks - 1 degrees of freedom).
MIN_LOOKS = 2   # a case is confirmed only on >= 2 fresh pairs (one pair cannot tell a bias from an effect)
# At most 30 fresh pairs per flagged case (each look number costs one restart of both workers, each case's
# look its rounds and a prepare). An unchanged case stops for futility after a few looks, so more looks cost
# little A/A time and buy power where a per-process bias hides a slowdown: simulated, 5% on cases with a 3%
# per-process bias is caught 26% with 12 looks and 61% with 30, at ~100-200 looks per A/A gate of 176 items
# (docs/reports-and-gate.md, "Sequential confirmation").
MAX_LOOKS = 30
# Between-pair sd of a look's log ratio when the calibration has no prior for the case. A quarter of the quick
# profile's tiny cases carry a per-process bias of ~3% on this box (2026-12-05); the simulation
# (tests/test_gate_sequential.py) keeps A/A false alarms at 0.3% with 3% and no priors; a larger default costs
# quiet cases looks and power (docs/reports-and-gate.md, "Sequential confirmation"). `twinbench calibrate` measures
# each case's own (most are ~0), which saves looks.
DEFAULT_PAIR_SD = 0.03
SCREEN_Z = 0.5  # the screen flags a case unless its ratio is below 1 + threshold by SCREEN_Z look sds
# A case stops as futile when its one-sided 90% upper bound is below 1 + threshold (any futility rule only
# removes rejections, so this one is chosen for cost: a case that cannot reach the threshold stops early).
FUTILITY_Z = 1.28
# ... or, from the first look, when its looks favour "no change" over a TARGET_EFFECT slowdown by a likelihood
# ratio of e^3 (~20; a sequential probability ratio test's lower boundary: a real TARGET_EFFECT slowdown
# crosses it with probability ~e^-3 = 5%). This is what stops unchanged cases after one or two looks.
TARGET_EFFECT = 0.05
FUTILITY_LOG_LR = -3.0
# ... or when even an optimistic projection cannot confirm it by the last look: its mean + 1 standard error,
# with the current sd of one look, carried to len(shares) looks, stays below the last look's critical value.
# This stops the very noisy cases (a look sd of 10-25% under load, 2026-12-05) after a few looks instead of
# 30 (a real A/A gate of --suite quant_linear spent 30 looks on 10 such cases).


def spending(min_looks: int = MIN_LOOKS, max_looks: int = MAX_LOOKS) -> tuple[float, ...]:
    """Shares of alpha per look (index 0 = look 1): nothing before ``min_looks`` (those looks cannot confirm),
    then growing with the look number (later looks have more power), summing to 1."""
    weights = [0.0 if j + 1 < min_looks else float(j + 1) for j in range(max_looks)]
    total = sum(weights)
    return tuple(w / total for w in weights)


SPENDING = spending()

Rerun = Callable[[dict[str, Any], int], tuple[Sequence[float], Sequence[float]]]
PairNoise = Mapping[str, float]  # item key "suite|case|impl|mode" -> between-pair sd of a look's log ratio


@dataclass(frozen=True)
class Look:
    """One look of the sequential confirmation at one flagged case (kept in the case's ``looks``)."""

    rounds: int            # rounds over all looks so far
    ratio: float           # exp(mean of the looks' median log ratios)
    ci_high: float         # its one-sided 90% upper bound (FUTILITY_Z)
    p_value: float         # one-sided (slower), on the look means
    level: float           # alpha x this look's share / flagged cases
    min_effect: float
    outcome: str           # "confirmed", "futile" (no change far likelier than a slowdown) or "open"
    look_ratio: float = float("nan")  # this look's own median new/base, on its fresh pair of processes
    look_noise: float = float("nan")  # sd of one look's log ratio used (between-pair and within-look)
    reference: str = "normal"         # "normal" (the prior's variance) or "t" (the looks' own, larger, variance)
    # "slower" (a flagged regression) or "faster" (a screened improvement): ratio, bound and look_ratio are then
    # base/new, so every number above reads "> 1 = the claimed direction"
    direction: str = "slower"


@dataclass(frozen=True)
class LookStats:
    """The two-level statistics over a case's looks so far."""

    mean: float        # mean of the looks' median log ratios
    se: float          # its standard error
    look_sd: float     # sd of one look used
    p_value: float     # one-sided, slower
    reference: str


def look_statistics(ratios: Sequence[float], within: Sequence[float], pair_sd: float) -> LookStats:
    """Test on look means: each look (one fresh pair) is one observation of log(new/base).

    Variance of one look: max(pair_sd^2 + mean within^2, sample variance of the looks). With the prior's
    variance (when it is the larger) the look mean is normal with a known variance; with the looks' own it is
    Student's t with n - 1 degrees of freedom. Honest when the prior is not below the case's true between-pair
    variance, and (the t branch) also when it is, for normal look means."""
    from scipy.stats import norm, t

    y = np.log(np.asarray(ratios, dtype=float))
    n = y.size
    prior_var = pair_sd ** 2 + float(np.mean(np.square(within)))
    sample_var = float(np.var(y, ddof=1)) if n >= 2 else 0.0
    mean = float(np.mean(y))
    if sample_var > prior_var:
        se = float(np.sqrt(sample_var / n))
        return LookStats(mean, se, float(np.sqrt(sample_var)), float(t.sf(mean / se, n - 1)), "t")
    se = float(np.sqrt(prior_var / n))
    return LookStats(mean, se, float(np.sqrt(prior_var)), float(norm.sf(mean / se)), "normal")


def pair_sd_from_looks(ratios: Sequence[float], within: Sequence[float]) -> float:
    """A case's between-pair sd from A/A looks on fresh pairs (`twinbench calibrate`): the looks' spread beyond
    their own within-look error, sqrt(max(0, var(log ratio) - mean(within^2)))."""
    y = np.log(np.asarray(ratios, dtype=float))
    if y.size < 2:
        raise ValueError("a between-pair sd needs at least 2 looks")
    return float(np.sqrt(max(0.0, float(np.var(y, ddof=1)) - float(np.mean(np.square(within))))))


def item_key(c: dict[str, Any]) -> str:
    """The key calibration priors are stored under (harness/gate/against.py Item.key)."""
    return f"{c['suite']}|{c['case']}|{c['impl']}|{c['mode']}"


def pair_sd_for(c: dict[str, Any], pair_noise: PairNoise | None) -> float:
    value = (pair_noise or {}).get(item_key(c))
    return DEFAULT_PAIR_SD if value is None else float(value)


def screen(cases: list[dict[str, Any]], config: GateConfig, pair_noise: PairNoise | None = None) -> list[dict[str, Any]]:
    """First stage of the interleaved gate: flag every case that *could* be slower than the threshold.

    A case is flagged unless its log ratio is below log(1 + threshold) by SCREEN_Z x its look sd (the first
    pair's own noise and the case's between-pair sd): on a case whose processes differ by a few percent, a
    real 5% slowdown often reads below 1 + threshold on one pair. Its verdict comes from
    :func:`confirm_sequentially` on fresh pairs, so the screen may be lenient: it costs looks, never false
    alarms. An improvement is flagged only when significant after correction (a missed one costs no false
    claim), and is then confirmed on fresh pairs like a regression."""
    compared = [c for c in cases if c.get("p_value") is not None]
    for c, p_adj in zip(compared, adjust([c["p_value"] for c in compared], config.correction)):
        c["p_adjusted"] = p_adj
        c["min_effect"] = max(config.threshold, config.k * c["noise"])
        _verdict(c, significant=p_adj < config.alpha)
        look_sd = float(np.hypot(c["noise"], pair_sd_for(c, pair_noise)))
        if c["verdict"] != "improvement" and np.log(c["ratio"]) > np.log1p(config.threshold) - SCREEN_Z * look_sd:
            c["verdict"] = "regression"
            c["note"] = ""
    return cases


def confirm_sequentially(cases: list[dict[str, Any]], config: GateConfig, rerun: Rerun, *,
                         pair_noise: PairNoise | None = None,
                         shares: Sequence[float] = SPENDING) -> list[dict[str, Any]]:
    """Second stage of the interleaved gate: confirm :func:`screen`'s flagged cases on fresh pairs.

    Screened improvements are confirmed the same way in the other direction (base/new instead of new/base):
    they do not fail the gate, but an improvement the gate reports is a claim too, and the screen's one pair
    of processes cannot tell a per-process bias from it (an A/A gate of the whole profile on 2026-12-05
    reported 3 "improvements" of 4-8% at the screen, Holm-significant, none real). They share the family F.

    ``rerun(case, look)`` returns the samples (base, head) of one look at a flagged case, each look on a fresh
    pair of processes. A case is confirmed at the first look n >= ``MIN_LOOKS`` where the one-sided p-value of
    the look means (:func:`look_statistics`) is below ``alpha x shares[n] / flagged`` and their ratio is above
    1 + its minimum effect, max(threshold, k x the look mean's standard error). It stops as futile when the
    ratio's upper bound is below 1 + threshold (stopping for futility only removes rejections), and is "no
    change" when still open after len(shares) looks. Why the family is only the flagged cases: the looks are
    independent of the screen that chose them, so under no change their p-values are uniform whatever was
    chosen, and Bonferroni within the chosen set and over looks (shares sum to 1) bounds the family-wise error
    by alpha, whatever the looks' dependence (a selective two-stage design).
    """
    if abs(sum(shares) - 1.0) > 1e-9 or any(w < 0 for w in shares) or sum(w > 0 for w in shares) == 0:
        raise ValueError("alpha spending shares must be non-negative and sum to 1")
    flagged = [c for c in cases if c["verdict"] in ("regression", "improvement")]
    faster = {case_key(c) for c in flagged if c["verdict"] == "improvement"}
    from scipy.stats import norm

    last_critical = float(norm.isf(config.alpha * shares[-1] / max(1, len(flagged))))
    looks: dict[tuple, tuple[list[float], list[float], list[int]]] = {case_key(c): ([], [], []) for c in flagged}
    still_open = list(flagged)
    for look, share in enumerate(shares):
        next_open = []
        for c in still_open:
            level = config.alpha * share / len(flagged)
            ratios, within, rounds = looks[case_key(c)]
            b, h = rerun(c, look)
            if case_key(c) in faster:  # test "base is slower than new" with the same one-sided machinery
                b, h = h, b
            this_ratio, this_noise = look_ratio(b, h, n_boot=config.n_boot, seed=config.seed + 1 + look,
                                                name=c.get("impl", "case"))
            ratios.append(this_ratio)
            within.append(this_noise)
            rounds.append(len(b))
            s = look_statistics(ratios, within, pair_sd_for(c, pair_noise))
            min_effect = max(config.threshold, config.k * s.se)
            ratio, upper = float(np.exp(s.mean)), float(np.exp(s.mean + FUTILITY_Z * s.se))
            delta = float(np.log1p(TARGET_EFFECT))
            log_lr = len(ratios) * (s.mean * delta - delta ** 2 / 2) / s.look_sd ** 2
            if look + 1 >= MIN_LOOKS and share > 0 and s.p_value < level and ratio > 1 + min_effect:
                outcome = "confirmed"
            elif log_lr < FUTILITY_LOG_LR or (look + 1 >= MIN_LOOKS and (
                    upper < 1 + config.threshold
                    or (s.mean + s.se) * np.sqrt(len(shares)) / s.look_sd < last_critical)):
                outcome = "futile"
            else:
                outcome = "open"
            c.setdefault("looks", []).append(asdict(Look(sum(rounds), ratio, upper, s.p_value, level, min_effect,
                                                         outcome, this_ratio, s.look_sd, s.reference,
                                                         "faster" if case_key(c) in faster else "slower")))
            claim, shown = ("improvement", "base/new") if case_key(c) in faster else ("regression", "new/base")
            if outcome == "confirmed":
                c["verdict"] = f"{claim} (confirmed)"
                c["note"] = (f"confirmed at look {look + 1} (fresh process pairs): {shown} {ratio:.4f}, bound "
                             f"{upper:.4f}, one-sided p {s.p_value:.2g} < {level:.2g}")
            elif outcome == "futile":
                c["verdict"] = "no change"
                c["note"] = (f"flagged as a {claim} once, refuted at look {look + 1} on fresh process pairs: {shown} "
                             f"{ratio:.4f}, bound {upper:.4f}; no change is e^{-log_lr:.1f} times as likely as "
                             f"a {TARGET_EFFECT:.0%} difference")
            else:
                next_open.append(c)
        still_open = next_open
        if not still_open:
            break
    for c in still_open:
        last = c["looks"][-1]
        claim, shown = ("improvement", "base/new") if case_key(c) in faster else ("regression", "new/base")
        c["verdict"] = "no change"
        c["note"] = (f"flagged as a {claim} once, not confirmed in {len(shares)} looks on fresh process pairs "
                     f"({shown} {last['ratio']:.4f}, p {last['p_value']:.2g}, one look's sd {last['look_noise']:.3f})")
    return cases


def case_key(c: dict[str, Any]) -> tuple[str, str, str, str, str]:
    return c["suite"], c["case"], c["impl"], c.get("device", ""), c["mode"]


def is_failure(c: dict[str, Any]) -> bool:
    """A regression fails the gate unless a re-run refuted it."""
    return c["verdict"].startswith("regression")


def summarize(cases: list[dict[str, Any]], parity_failures: list[dict[str, Any]], config: GateConfig, *,
              mode: str, mode_text: str, note: str = "") -> dict[str, Any]:
    regressions = [c for c in cases if is_failure(c)]
    improvements = [c for c in cases if c["verdict"].startswith("improvement")]
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
