"""Regression baselines: one JSON file per hard device fingerprint under ``baselines/``.

A baseline keeps the raw timing samples per (suite, case, impl, mode), one entry per line so a
reviewer reads the diff of a baseline update. Comparing results to a baseline measured under another
hard fingerprint (other GPU, driver, torch, thread count...) is refused unless explicitly allowed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twinbench.harness.core.errors import UsageError
from twinbench.harness.store.results import atomic_write_text, now_iso, read_json, validate_against

SCHEMA_PATH = Path(__file__).with_name("baseline.schema.json")
KIND = "twinbench-baseline"
MODES = ("fwd", "fwdbwd")
# Without a calibration file the stored-baseline mode assumes the run-to-run noise METHOD.md measured on
# the shared CPU box (absolute medians vary with CV ~10% across runs).
DEFAULT_RUN_TO_RUN_NOISE = 0.10


def _round(x: float) -> float:
    return float(f"{x:.5g}")


def entries_from_results(doc: dict[str, Any], fingerprint_id: str) -> list[dict[str, Any]]:
    """Timed, parity-passing records of one fingerprint as baseline entries (raw samples kept)."""
    sha = (doc.get("provenance") or {}).get("git_sha", "")
    out = []
    for rec in doc["results"]:
        if rec["fingerprint"] != fingerprint_id or rec["status"] != "ok":
            continue
        timing = rec.get("timing") or {}
        if timing.get("excluded"):
            continue
        for mode in MODES:
            stats = timing.get(mode) or {}
            samples = stats.get("samples_ms") or []
            if not samples or any(s <= 0 for s in samples):
                continue
            out.append({"suite": rec["suite"], "case": rec["case"], "impl": rec["impl"], "mode": mode,
                        "median_ms": _round(stats["median_ms"]), "samples_ms": [_round(s) for s in samples],
                        "calls_per_sample": int(stats.get("calls_per_sample") or 1), "git_sha": sha})
    return out


def entry_key(e: dict[str, Any]) -> tuple[str, str, str, str]:
    return e["suite"], e["case"], e["impl"], e["mode"]


def dumps(base: dict[str, Any]) -> str:
    """Stable, reviewable text: header fields indented, one sorted entry per line."""
    head = json.dumps({k: v for k, v in base.items() if k != "entries"}, indent=1, sort_keys=True)
    lines = [json.dumps(e) for e in sorted(base["entries"], key=entry_key)]
    entries = "[\n  " + ",\n  ".join(lines) + "\n ]" if lines else "[]"
    return head[:-2] + f',\n "entries": {entries}\n}}\n'


def validate(data: Any, source: str) -> None:
    validate_against(data, SCHEMA_PATH, source, "baseline")


def load(path: str | Path) -> dict[str, Any]:
    data = read_json(path, "baseline")
    validate(data, str(path))
    return data


def save(doc: dict[str, Any], directory: str | Path, *, device: str | None = None,
         replace: bool = False) -> list[Path]:
    """Write (or update) ``<dir>/<fingerprint id>.json`` for every fingerprint with timed results.

    Every existing file is read and validated before anything is written: a broken one stops the save.
    """
    directory = Path(directory)
    plans = []
    for fp_id, fp in sorted((doc.get("fingerprints") or {}).items()):
        if device and fp.get("name") != device:
            continue
        entries = entries_from_results(doc, fp_id)
        if not entries:
            continue
        path = directory / f"{fp_id}.json"
        old: list[dict[str, Any]] = []
        if path.exists() and not replace:
            old = load(path)["entries"]
        merged = {entry_key(e): e for e in old}
        merged.update({entry_key(e): e for e in entries})
        prov = doc.get("provenance") or {}
        base = {"kind": KIND, "version": 1, "created": now_iso(), "fingerprint": fp,
                "source": {"git_sha": prov.get("git_sha", ""), "git_dirty": prov.get("git_dirty"),
                           "command": prov.get("command", "")},
                "entries": list(merged.values())}
        plans.append((path, base))
    if not plans:
        which = f" for device {device}" if device else ""
        raise UsageError(f"no timed, parity-passing results{which} to save (run without --no-timing)")
    for path, base in plans:
        atomic_write_text(path, dumps(base))
    return [p for p, _ in plans]


def pick(path: str | Path, doc: dict[str, Any]) -> list[tuple[str, dict[str, Any], Path]]:
    """Baselines for the results' fingerprints: a file as given, or ``<dir>/<id>.json`` per fingerprint."""
    p = Path(path)
    fps = [fp for fp in (doc.get("fingerprints") or {}) if any(r["fingerprint"] == fp for r in doc["results"])]
    if p.is_dir():
        found = [(fp, load(p / f"{fp}.json"), p / f"{fp}.json") for fp in fps if (p / f"{fp}.json").exists()]
        if not found:
            have = ", ".join(sorted(f.stem for f in p.glob("*.json") if not f.stem.endswith(".calibration")))
            raise UsageError(f"no baseline in {p} for fingerprint(s) {', '.join(fps) or 'none'} "
                             f"(have: {have or 'none'}); compare a file explicitly with "
                             f"--allow-fingerprint-mismatch to see the differences")
        return found
    base = load(p)
    fp = base["fingerprint"]["id"]
    if fp in fps:
        return [(fp, base, p)]
    same_name = [f for f in fps if doc["fingerprints"][f].get("name") == base["fingerprint"].get("name")]
    target = (same_name or fps or [""])[0]
    return [(target, base, p)]


def check_fingerprint(result_fp: dict[str, Any], base: dict[str, Any], source: str, allow: bool) -> list[str]:
    """Hard-key differences; refused (one line) unless ``allow``."""
    from twinbench.harness.core.devices import fingerprint_diff

    diff = fingerprint_diff(base["fingerprint"], result_fp)
    if diff and not allow:
        raise UsageError(f"{source} was measured under another hard fingerprint ({'; '.join(diff)[:300]}); "
                         f"pass --allow-fingerprint-mismatch to compare anyway")
    return diff


def load_calibration(path: str | Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        return None
    data = read_json(p, "calibration")
    if not isinstance(data, dict) or data.get("kind") != "twinbench-calibration":
        raise UsageError(f"{p}: not a twinbench calibration file")
    return data


def gate_against_baseline(doc: dict[str, Any], baseline_path: str | Path, config, *,
                          allow_mismatch: bool = False, calibration: str | Path | None = None,
                          confirm_doc: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compare a results document (and optionally a confirmation re-run) with stored baselines."""
    from twinbench.harness.gate import stats as gate

    config.check()
    cases: list[dict[str, Any]] = []
    compared = []
    notes = []
    for fp_id, base, path in pick(baseline_path, doc):
        result_fp = (doc.get("fingerprints") or {}).get(fp_id) or {"hard": {}}
        diff = check_fingerprint(result_fp, base, str(path), allow_mismatch)
        if diff:
            notes.append(f"compared across hard fingerprints ({'; '.join(diff)[:200]})")
        cal = load_calibration(calibration or path.with_name(f"{base['fingerprint']['id']}.calibration.json"))
        run_noise = ((cal or {}).get("baseline") or {}).get("run_to_run_noise")
        if run_noise is None:
            run_noise = DEFAULT_RUN_TO_RUN_NOISE
            notes.append(f"no calibration for {fp_id[:12]}: run-to-run noise assumed {run_noise:.0%} "
                         f"(measure it with `twinbench calibrate --save`)")
        else:
            notes.append(f"run-to-run noise {run_noise:.3f} from calibration")
        cases += _compare_doc(doc, fp_id, base, config, run_noise)
        compared.append((fp_id, base, run_noise))
    gate.decide(cases, config)
    if confirm_doc is not None:
        rerun: list[dict[str, Any]] = []
        for fp_id, base, run_noise in compared:
            rerun += _compare_doc(confirm_doc, fp_id, base, config, run_noise, only=cases)
        gate.confirm(cases, rerun, config)
        notes.append("flagged cases were re-checked against the --confirm run")
    else:
        for c in cases:
            if c["verdict"] == "regression":
                c["verdict"] = "regression (unconfirmed)"
                c["note"] = ("a stored baseline cannot re-run the base: confirm with a fresh `twinbench run` "
                             "of this case and `gate --confirm`")
    failures = [r for r in doc["results"] if r["status"] in ("wrong", "crashed", "timeout")]
    return gate.summarize(cases, failures, config, mode="baseline",
                          mode_text=f"stored baseline {Path(baseline_path)}", note="; ".join(notes))


def _compare_doc(doc: dict[str, Any], fp_id: str, base: dict[str, Any], config, run_noise: float,
                 only: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    from twinbench.harness.gate import stats as gate

    entries = {entry_key(e): e for e in base["entries"]}
    wanted = None
    if only is not None:
        wanted = {(c["suite"], c["case"], c["impl"], c["mode"]) for c in only if c.get("verdict") == "regression"}
    cases, seen = [], set()
    for rec in doc["results"]:
        if rec["fingerprint"] != fp_id or rec["status"] != "ok" or (rec.get("timing") or {}).get("excluded"):
            continue
        for mode in MODES:
            stats = (rec.get("timing") or {}).get(mode) or {}
            if not stats.get("samples_ms"):
                continue
            key = (rec["suite"], rec["case"], rec["impl"], mode)
            if wanted is not None and key not in wanted:
                continue
            seen.add(key)
            c = {"suite": rec["suite"], "case": rec["case"], "impl": rec["impl"], "device": rec["device"],
                 "mode": mode}
            if key not in entries:
                c.update(verdict="new", note="not in the baseline")
            else:
                c.update(gate.compare_samples(entries[key]["samples_ms"], stats["samples_ms"], paired=False,
                                              test=config.test, extra_noise=run_noise, n_boot=config.n_boot,
                                              seed=config.seed, name=f"{rec['suite']} {rec['case']} {rec['impl']}"))
            cases.append(c)
    if only is None:
        for key, e in entries.items():
            if key not in seen and any(r["suite"] == e["suite"] for r in doc["results"]):
                cases.append({"suite": e["suite"], "case": e["case"], "impl": e["impl"], "device": "",
                              "mode": e["mode"], "verdict": "missing", "note": "in the baseline, not in these results"})
    return cases
