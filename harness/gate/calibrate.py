"""`twinbench calibrate`: what can the gate honestly catch on this machine?

Measures, with the gate's own statistics and workers, (1) the A/A false-alarm rate: the same kernel
against itself, and (2) the power to catch a planted slowdown of 5/10/20%: the head side runs
``s x number`` extra calls of the same kernel per sample, so the planted work reacts to contention like
the kernel does. Both for the interleaved mode (`gate --against`) and the stored-baseline mode (a
session of samples, later another session, no interleaving). Comparisons are grouped like one gate run
over the workload's cases (correction across the group), and a flagged case counts only when its
re-run flags it again, exactly as the gate decides.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from twinbench.harness.core.errors import UsageError
from twinbench.harness.gate.against import Measurement, Selection
from twinbench.harness.gate.stats import SPENDING as GATE_SPENDING

GRANULARITY = 20  # calls per sample are a multiple of 20, so a 5% slowdown is a whole number of calls
MODES = ("against", "baseline")


@dataclass(frozen=True)
class CalibrateOptions:
    """`twinbench calibrate`'s options; built (and validated) by the CLI only."""

    selection: Selection
    measurement: Measurement  # its clock is the interleaved mode's; the stored-baseline mode uses the wall clock
    slowdowns: list[float] = field(default_factory=lambda: [0.05, 0.10, 0.20])  # fractions
    modes: list[str] = field(default_factory=lambda: list(MODES))
    comparisons: int = 200
    power_comparisons: int = 60
    max_cases: int = 4               # 0: every timed item of the selection (the whole profile)
    timed: tuple[str, ...] = ("fwd", "fwdbwd")  # the passes compared, as the gate compares them
    threshold: float | None = None  # None: each mode's gate default
    k: float = 2.0
    alpha: float = 0.05
    correction: str = "holm"
    tests: list[str] = field(default_factory=lambda: ["mwu", "wilcoxon"])
    pair_looks: int = 6  # A/A looks on fresh pairs per item for its between-pair sd prior (0: none; the gate then assumes stats.DEFAULT_PAIR_SD)
    save_dir: Path | None = None  # write <dir>/<fingerprint>.calibration.json
    json: Path | None = None


def parse_slowdowns(text: str) -> list[float]:
    try:
        values = [float(x) / 100 for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--slowdowns {text!r}: give percentages like 5,10,20") from None
    if not values or any(v <= 0 or v > 5 for v in values):
        raise UsageError("--slowdowns must be positive percentages (e.g. 5,10,20)")
    return values


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        raise UsageError("--modes takes against, baseline or against,baseline")
    return modes


def parse_timed(text: str) -> tuple[str, ...]:
    passes = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    if not passes or set(passes) - {"fwd", "fwdbwd"}:
        raise UsageError("--timed takes fwd, fwdbwd or fwd,fwdbwd")
    return passes


def _spread(items: list, n: int) -> list:
    if len(items) <= n:
        return items
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in sorted(set(idx))]


def _session(pair, worker, item, rounds: int, extra: int) -> list[float]:
    """Stored-baseline mode: one side's samples back to back (no interleaving)."""
    from twinbench.harness.run.process import WorkerFailed

    try:
        return [pair.sample(worker, item, extra) for _ in range(rounds)]
    except WorkerFailed as exc:
        raise UsageError(f"calibration workload {item.key} failed: {exc}") from None


def _case(item, stats: dict[str, Any]) -> dict[str, Any]:
    return dict(item.as_case(), device="", **stats)


PRIOR_LOOK_BASE = 100  # prior looks restart the pair with hash seeds 101, 102, ... (the gate's looks use 1..)


def learn_pair_noise(pair, items, looks: int) -> dict[str, Any]:
    """Each item's between-pair sd: ``looks`` A/A looks, each on a fresh pair of worker processes
    (stats.pair_sd_from_looks). Measured before, and apart from, the comparisons that count false alarms,
    so the priors those comparisons use were not fitted to them."""
    from twinbench.harness.gate import stats as gate

    started = time.monotonic()
    seen: dict[str, tuple[list[float], list[float]]] = {i.key: ([], []) for i in items}
    for look in range(looks):
        for item in items:
            pair.refresh(item, PRIOR_LOOK_BASE + look)
            ratio, noise = gate.look_ratio(*pair.measure(item), n_boot=500, name=item.key)
            seen[item.key][0].append(ratio)
            seen[item.key][1].append(noise)
    sds = {key: gate.pair_sd_from_looks(ratios, within) for key, (ratios, within) in seen.items()}
    print(f"   between-pair sd from {looks} fresh pairs per item: {sum(v > 0.01 for v in sds.values())} of "
          f"{len(sds)} above 1%, {sum(v > 0.05 for v in sds.values())} above 5%; largest "
          + ", ".join(f"{k} {v:.3f}" for k, v in sorted(sds.items(), key=lambda kv: -kv[1])[:5]), flush=True)
    return {"looks": looks, "seconds": time.monotonic() - started, "items": sds}


def against_mode(pair, items, configs: dict[str, Any], n: int, slowdown: float,
                 pair_noise: dict[str, float] | None = None) -> dict[str, Any]:
    """Interleaved comparisons in gate-sized groups; per test: first-stage flags and confirmed alarms.

    Each group is one gate run: screen, then the sequential confirmation of the flagged cases (the re-run
    samples are shared by the tests). ``seconds`` is each group's wall time: for a group of the whole
    selection, what one `gate --against` pass costs here (with the planted calls, and workers already up).
    """
    from twinbench.harness.gate import stats as gate

    counts = {t: {"flagged": 0, "confirmed": 0, "missed": [], "false_alarms": []} for t in configs}
    ratios, passes = [], []
    done = 0
    while done < n:
        group = _spread(items, n - done)
        started = time.monotonic()
        measured = {i.key: pair.measure(i, extra_fraction=slowdown) for i in group}
        for i in group:
            b, h = measured[i.key]
            ratios.append(float(np.exp(np.median(gate.balanced_log_ratios(np.asarray(b), np.asarray(h), i.key)))))
        by_key = {i.key: i for i in group}
        reruns: dict[tuple[str, int], tuple[list[float], list[float]]] = {}

        def rerun(c: dict[str, Any], look: int) -> tuple[list[float], list[float]]:
            key = f"{c['suite']}|{c['case']}|{c['impl']}|{c['mode']}"
            if (key, look) not in reruns:
                pair.refresh(by_key[key], look)
                reruns[key, look] = pair.measure(by_key[key], extra_fraction=slowdown)
            return reruns[key, look]

        for test, config in configs.items():
            cases = [_case(i, gate.compare_samples(*measured[i.key], paired=True, test=test, n_boot=config.n_boot))
                     for i in group]
            gate.screen(cases, config, pair_noise)
            counts[test]["flagged"] += sum(c["verdict"] == "regression" for c in cases)
            gate.confirm_sequentially(cases, config, rerun, pair_noise=pair_noise)
            confirmed = [c for c in cases if c["verdict"] == "regression (confirmed)"]
            counts[test]["confirmed"] += len(confirmed)
            # which items, and what each look saw: the evidence to tell noise or a per-process bias from the
            # design's own limits (a miss with no looks was never flagged by the screen)
            if slowdown > 0:
                counts[test]["missed"] += [{"item": i.key, "looks": c.get("looks", [])} for i, c in zip(group, cases)
                                           if c["verdict"] != "regression (confirmed)"]
            else:
                counts[test]["false_alarms"] += [{"item": i.key, "looks": c.get("looks", [])}
                                                 for i, c in zip(group, cases) if c["verdict"] == "regression (confirmed)"]
        passes.append({"items": len(group), "seconds": time.monotonic() - started,
                       "rerun_looks": len(reruns)})
        done += len(group)
    # the counts as soon as the phase ends: a run stopped later (a timeout, ^C) still has them in its log
    print(f"   interleaved, slowdown {slowdown:.0%}: {done} comparisons done; confirmed "
          + ", ".join(f"{t} {c['confirmed']}/{done} (first stage {c['flagged']})" for t, c in counts.items()),
          flush=True)
    return {"comparisons": done, "slowdown": slowdown, "median_ratio_cv": _cv(ratios), "tests": counts,
            "passes": passes}


def baseline_sessions(pair, items, n: int, slowdown: float, rounds: int) -> list[dict[str, Any]]:
    """Stored-baseline mode: per group, base sessions for every case, then new sessions, then re-runs."""
    out = []
    while len(out) < n:
        group = items[: max(1, min(len(items), n - len(out)))]
        base = {i.key: _session(pair, pair.base, i, rounds, 0) for i in group}
        extra = {i.key: round(slowdown * pair.numbers[i.key]) for i in group}
        new = {i.key: _session(pair, pair.head, i, rounds, extra[i.key]) for i in group}
        again = {i.key: _session(pair, pair.head, i, rounds, extra[i.key]) for i in group}
        out += [{"item": i, "base": base[i.key], "new": new[i.key], "again": again[i.key], "group": len(out)}
                for i in group]
    print(f"   stored sessions, slowdown {slowdown:.0%}: {len(out)} comparisons done", flush=True)
    return out


def run_to_run_noise(aa: list[dict[str, Any]]) -> float:
    """Excess spread of log(median new / median base) across A/A sessions beyond within-session error."""
    from twinbench.harness.gate import stats as gate

    d, se = [], []
    for s in aa:
        c = gate.compare_samples(s["base"], s["new"], paired=False, n_boot=500)
        d.append(math.log(c["ratio"]))
        se.append(c["noise"])
    d_arr = np.asarray(d)
    robust_sd = 1.4826 * float(np.median(np.abs(d_arr - np.median(d_arr))))
    return float(math.sqrt(max(0.0, robust_sd**2 - float(np.mean(np.square(se))))))


def judge_baseline(sessions: list[dict[str, Any]], config, noise: float) -> dict[str, int]:
    from twinbench.harness.gate import stats as gate

    counts = {"flagged": 0, "confirmed": 0}
    groups: dict[int, list[dict[str, Any]]] = {}
    for s in sessions:
        groups.setdefault(s["group"], []).append(s)
    for group in groups.values():
        cases = [_case(s["item"], gate.compare_samples(s["base"], s["new"], paired=False, extra_noise=noise,
                                                       n_boot=config.n_boot)) for s in group]
        gate.decide(cases, config)
        counts["flagged"] += sum(c["verdict"] == "regression" for c in cases)
        rerun = [_case(s["item"], gate.compare_samples(s["base"], s["again"], paired=False, extra_noise=noise,
                                                       n_boot=config.n_boot, seed=1))
                 for s, c in zip(group, cases) if c["verdict"] == "regression"]
        gate.confirm(cases, rerun, config)
        counts["confirmed"] += sum(c["verdict"] == "regression (confirmed)" for c in cases)
    return counts


def _cv(values: list[float]) -> float:
    a = np.asarray(values)
    return float(np.std(a) / np.mean(a)) if a.size > 1 else 0.0


def smallest_caught(result: dict[str, Any], test: str, target_fa: float = 0.01,
                    target_power: float = 0.95) -> float | None:
    aa = result["aa"]
    if aa["tests"][test]["confirmed"] / aa["comparisons"] > target_fa:
        return None
    for p in sorted(result["power"], key=lambda p: p["slowdown"]):
        if p["tests"][test]["confirmed"] / p["comparisons"] >= target_power:
            return p["slowdown"]
    return None


def main(options: CalibrateOptions) -> int:
    from twinbench.harness.gate import against as gate_against

    with gate_against.terminate_as_interrupt():
        return _main(options)


def _main(o: CalibrateOptions) -> int:
    from twinbench.harness.gate import against as gate_against
    from twinbench.harness.gate.stats import GateConfig
    from twinbench.harness.store.results import atomic_write_json, now_iso

    m = o.measurement
    rounds, block_ms = m.rounds, m.block_ms
    threshold = {"against": o.threshold if o.threshold is not None else gate_against.DEFAULT_THRESHOLD,
                 "baseline": o.threshold if o.threshold is not None else 0.05}

    def config(mode: str, test: str) -> GateConfig:
        c = GateConfig(threshold=threshold[mode], k=o.k, alpha=o.alpha, correction=o.correction, test=test)
        c.check()
        return c

    logs = o.json.parent if o.json else Path("/tmp")
    report: dict[str, Any] = {"kind": "twinbench-calibration", "created": now_iso(), "rounds": rounds,
                              "confirm_looks": len(GATE_SPENDING), "confirm_rounds_per_look": rounds, "block_ms": block_ms,
                              "k": o.k, "alpha": o.alpha, "correction": o.correction}
    if "against" in o.modes:
        # As `gate --against` runs: both workers pinned to the same CPU(s), the process clock on the CPU.
        cpus = gate_against.shared_cpus(o.selection.device, m.pin, m.threads)
        with _started_pair(o, m, logs, cpus, report) as (pair, items):
            configs = {t: config("against", t) for t in o.tests}
            priors = learn_pair_noise(pair, items, o.pair_looks) if o.pair_looks else None
            noise = priors["items"] if priors else None
            res = {"threshold": threshold["against"], "clock": pair.clock, "pinned_cpus": cpus,
                   "pair_noise": priors,
                   "aa": against_mode(pair, items, configs, o.comparisons, 0.0, noise),
                   "power": [against_mode(pair, items, configs, o.power_comparisons, s, noise)
                             for s in o.slowdowns]}
            res["smallest_caught"] = {t: smallest_caught(res, t) for t in o.tests}
            report["against"] = res
            print(_format("against (interleaved)", res, o.tests), flush=True)
    if "baseline" in o.modes:
        # As `twinbench run` measures what a stored baseline holds: unpinned workers, the wall clock.
        with _started_pair(o, replace(m, clock="wall"), logs, None, report) as (pair, items):
            cfg = config("baseline", "mwu")
            aa = baseline_sessions(pair, items, o.comparisons, 0.0, rounds)
            halves = [aa[0::2], aa[1::2]]
            noises = [run_to_run_noise(h) if len(h) >= 2 else 0.0 for h in halves]
            counts = {"flagged": 0, "confirmed": 0}
            for held_out, noise in ((halves[1], noises[0]), (halves[0], noises[1])):  # out-of-sample noise
                for k, v in judge_baseline(held_out, cfg, noise).items():
                    counts[k] += v
            noise = run_to_run_noise(aa)
            res = {"threshold": threshold["baseline"], "clock": "wall", "pinned_cpus": None,
                   "run_to_run_noise": noise, "aa": {"comparisons": len(aa), "slowdown": 0.0, "tests": {"mwu": counts}},
                   "power": []}
            for s in o.slowdowns:
                sessions = baseline_sessions(pair, items, o.power_comparisons, s, rounds)
                res["power"].append({"comparisons": len(sessions), "slowdown": s,
                                     "tests": {"mwu": judge_baseline(sessions, cfg, noise)}})
            res["smallest_caught"] = {"mwu": smallest_caught(res, "mwu")}
            report["baseline"] = res
            print(_format(f"stored baseline (run-to-run noise {noise:.3f})", res, ["mwu"]), flush=True)
    if o.json:
        atomic_write_json(o.json, report)
        print(f"wrote {o.json}")
    if o.save_dir:
        path = o.save_dir / f"{report['fingerprint'].get('id', 'unknown')}.calibration.json"
        atomic_write_json(path, report)
        print(f"wrote {path}")
    return 0


@contextlib.contextmanager
def _started_pair(o: CalibrateOptions, m: Measurement, logs: Path, cpus: list[int] | None,
                  report: dict[str, Any]) -> Iterator[tuple[Any, list]]:
    """Two workers on the working tree, ready and prepared for the workload; always stopped."""
    from twinbench.harness.gate import against as gate_against

    a, b = (gate_against.GateWorker(gate_against.ROOT, o.selection.device, o.selection.plugins,
                                    logs / f"calibrate-{side}.log", m, cpus) for side in "ab")
    pair = gate_against.Pair(a, b, m.rounds, m.block_ms, clock=m.clock)
    try:
        items = gate_against.plan_items(o.selection, modes=o.timed)  # while the workers start
        items = _spread(items, o.max_cases) if o.max_cases else items
        a.ready()
        b.ready()
        report.update(fingerprint=b.fingerprint, threads=a.threads, clock=m.clock, workload=[i.key for i in items])
        started = time.monotonic()
        # A whole profile holds impls this device cannot run (flash-attn on a CPU): they are left out and
        # named, as `gate --against` leaves them uncompared; a workload with nothing left is a usage error.
        cannot_run = {}
        for item in items:
            prep = pair.prepare(item, granularity=GRANULARITY)
            if not prep["ok"]:
                cannot_run[item.key] = prep["why"]
        if len(cannot_run) == len(items):
            key, why = next(iter(cannot_run.items()), ("(none)", "the selection has no timed item"))
            raise UsageError(f"calibration workload {key} cannot run: {why}")
        items = [i for i in items if i.key not in cannot_run]
        report.update(workload=[i.key for i in items], cannot_run=cannot_run)
        if cannot_run:
            print(f"left out {len(cannot_run)} item(s) that cannot run here, e.g. {next(iter(cannot_run))}: "
                  f"{next(iter(cannot_run.values()))}", flush=True)
        report["prepare_seconds"] = time.monotonic() - started
        print(f"calibrating on {len(items)} case(s) (prepared in {report['prepare_seconds']:.0f} s), {m.rounds} rounds of {m.block_ms:g} ms samples, {m.clock} clock, "
              f"{a.threads or 'default'} thread(s), " + (f"pinned to CPU(s) {cpus}" if cpus else "not pinned") + ": "
              + ", ".join(f"{i.key} x{pair.numbers[i.key]}" for i in items), flush=True)
        yield pair, items
    finally:
        pair.stop()


def _format(title: str, res: dict[str, Any], tests: list[str]) -> str:
    lines = [f"== {title}: threshold {res['threshold']}, A/A over {res['aa']['comparisons']} comparisons"]
    if res["aa"].get("median_ratio_cv") is not None:
        lines.append(f"   A/A median-ratio CV across comparisons: {res['aa']['median_ratio_cv']:.4f}")
    if res.get("pair_noise"):
        lines.append(f"   between-pair sd priors: {len(res['pair_noise']['items'])} items, "
                     f"{res['pair_noise']['looks']} fresh pairs each, {res['pair_noise']['seconds']:.0f} s")
    for run in [res["aa"], *res["power"]]:
        for p in run.get("passes", []):
            lines.append(f"   gate pass at slowdown {run['slowdown']:.0%}: {p['items']} items in {p['seconds']:.0f} s "
                         f"(screen + {p['rerun_looks']} confirmation look(s); workers already started)")
    for test in tests:
        aa = res["aa"]["tests"][test]
        n = res["aa"]["comparisons"]
        parts = [f"   {test:<8} A/A false alarms {aa['confirmed']}/{n} = {aa['confirmed'] / n:.2%} "
                 f"(first stage {aa['flagged']})"]
        for p in res["power"]:
            t = p["tests"][test]
            parts.append(f"{p['slowdown']:.0%}: caught {t['confirmed']}/{p['comparisons']} = "
                         f"{t['confirmed'] / p['comparisons']:.0%}")
        lines.append("; ".join(parts))
        alarms = [a["item"] for a in aa.get("false_alarms", [])]
        if alarms:
            lines.append(f"   {test:<8} A/A false alarms: " + ", ".join(alarms[:8])
                         + (f" and {len(alarms) - 8} more" if len(alarms) > 8 else ""))
        for p in res["power"]:
            missed = [m["item"] for m in p["tests"][test].get("missed", [])]
            if missed:
                lines.append(f"   {test:<8} missed at {p['slowdown']:.0%}: " + ", ".join(missed[:8])
                             + (f" and {len(missed) - 8} more" if len(missed) > 8 else ""))
        s = res["smallest_caught"][test]
        lines.append(f"   {test:<8} smallest slowdown caught >= 95% with <= 1% false alarms: "
                     + (f"{s:.0%}" if s is not None else "none of those tested"))
    return "\n".join(lines)
