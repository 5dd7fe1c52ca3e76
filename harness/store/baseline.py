"""Regression baselines: one JSON file per hard device fingerprint under ``baselines/``.

A baseline keeps the raw timing samples per (suite, case, impl, mode), one entry per line so a
reviewer reads the diff of a baseline update. Comparing results to a baseline measured under another
hard fingerprint (other GPU, driver, torch, thread count...) is refused unless explicitly allowed.
Storage only: comparing results with a baseline is the gate's stored-baseline mode
(:mod:`twinbench.harness.gate.stored`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from twinbench.harness.core.errors import UsageError
from twinbench.harness.store.results import (
    FINGERPRINT_ID_PATTERN,
    atomic_write_text,
    check_finite,
    confined,
    now_iso,
    read_json,
    validate_against,
)

SCHEMA_PATH = Path(__file__).with_name("baseline.schema.json")
KIND = "twinbench-baseline"
MODES = ("fwd", "fwdbwd")


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
    head = json.dumps({k: v for k, v in base.items() if k != "entries"}, indent=1, sort_keys=True, allow_nan=False)
    lines = [json.dumps(e, allow_nan=False) for e in sorted(base["entries"], key=entry_key)]
    entries = "[\n  " + ",\n  ".join(lines) + "\n ]" if lines else "[]"
    return head[:-2] + f',\n "entries": {entries}\n}}\n'


def validate(data: Any, source: str) -> None:
    validate_against(data, SCHEMA_PATH, source, "baseline")
    for i, e in enumerate(data["entries"]):
        check_finite([e["median_ms"], *e["samples_ms"]], f"{source}: entries/{i} ({e['suite']} {e['case']} "
                                                          f"{e['impl']} {e['mode']})")


def load(path: str | Path) -> dict[str, Any]:
    data = read_json(path, "baseline")
    validate(data, str(path))
    return data


def plan_save(doc: dict[str, Any], directory: str | Path, *, device: str | None = None,
              replace: bool = False) -> list[tuple[Path, dict[str, Any]]]:
    """What saving ``doc`` writes: ``(<dir>/<fingerprint id>.json, baseline)`` per fingerprint with timed results.

    Nothing is written here. Every existing file is read and validated first (a broken one stops the save),
    and a file name comes from the results file only when it is a fingerprint id and stays inside ``directory``.
    """
    directory = Path(directory)
    plans = []
    for fp_id, fp in sorted((doc.get("fingerprints") or {}).items()):
        if device and fp.get("name") != device:
            continue
        entries = entries_from_results(doc, fp_id)
        if not entries:
            continue
        if not re.fullmatch(FINGERPRINT_ID_PATTERN, fp_id) or fp.get("id") != fp_id:
            raise UsageError(f"fingerprint id {fp_id!r} is not a twinbench fingerprint id; refusing to name a "
                             f"baseline file after it")
        path = confined(directory, f"{fp_id}.json", "baseline file")
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
        validate(base, str(path))
        plans.append((path, base))
    if not plans:
        which = f" for device {device}" if device else ""
        raise UsageError(f"no timed, parity-passing results{which} to save (run without --no-timing)")
    return plans


def write(plans: list[tuple[Path, dict[str, Any]]]) -> list[Path]:
    for path, base in plans:
        atomic_write_text(path, dumps(base))
    return [p for p, _ in plans]


def pick(path: str | Path, doc: dict[str, Any]) -> list[tuple[str, dict[str, Any], Path]]:
    """Baselines for the results' fingerprints: a file as given, or ``<dir>/<id>.json`` per fingerprint."""
    p = Path(path)
    fps = [fp for fp in (doc.get("fingerprints") or {}) if any(r["fingerprint"] == fp for r in doc["results"])]
    if p.is_dir():
        files = {fp: confined(p, f"{fp}.json", "baseline file") for fp in fps}
        found = [(fp, load(f), f) for fp, f in files.items() if f.exists()]
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
