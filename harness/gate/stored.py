"""Stored-baseline mode: ``gate --baseline``, results compared with timing samples kept in ``baselines/``.

The stored samples were measured in another session, so besides each case's own noise the comparison
adds the machine's run-to-run noise (from a ``calibrate --save`` file, or an assumed default), and a
flagged case cannot be confirmed by re-running the base: it stays "regression (unconfirmed)" until a
fresh run is passed with ``--confirm`` (docs/method.md §4). Storage itself (entries, files, fingerprint
checks) is :mod:`twinbench.harness.store.baseline`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twinbench.harness.core.errors import UsageError
from twinbench.harness.gate import stats
from twinbench.harness.store.baseline import MODES, check_fingerprint, entry_key, pick
from twinbench.harness.store.results import confined, read_json, validate_against

# Without a calibration file the run-to-run noise of the median between sessions is assumed to be this
# share; `twinbench calibrate --save` measures the real one (docs/method.md §4, numbers in §7).
DEFAULT_RUN_TO_RUN_NOISE = 0.10
CALIBRATION_KIND = "twinbench-calibration"
CALIBRATION_SCHEMA = Path(__file__).parents[1] / "store" / "calibration.schema.json"


def load_calibration(path: str | Path | None) -> dict[str, Any] | None:
    """A ``calibrate --save`` file, or None when there is none at ``path``."""
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        return None
    data = read_json(p, "calibration")
    if not isinstance(data, dict) or data.get("kind") != CALIBRATION_KIND:
        raise UsageError(f"{p}: not a twinbench calibration file")
    validate_against(data, CALIBRATION_SCHEMA, str(p), "calibration file")
    return data


def gate_against_baseline(doc: dict[str, Any], baseline_path: str | Path, config: stats.GateConfig, *,
                          allow_mismatch: bool = False, calibration: str | Path | None = None,
                          confirm_doc: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compare a results document (and optionally a confirmation re-run) with stored baselines."""
    config.check()
    cases: list[dict[str, Any]] = []
    compared = []
    notes = []
    for fp_id, base, path in pick(baseline_path, doc):
        result_fp = (doc.get("fingerprints") or {}).get(fp_id) or {"hard": {}}
        diff = check_fingerprint(result_fp, base, str(path), allow_mismatch)
        if diff:
            notes.append(f"compared across hard fingerprints ({'; '.join(diff)[:200]})")
        cal = load_calibration(calibration or confined(path.parent, f"{base['fingerprint']['id']}.calibration.json",
                                                       "calibration file"))
        run_noise = ((cal or {}).get("baseline") or {}).get("run_to_run_noise")
        if run_noise is None:
            run_noise = DEFAULT_RUN_TO_RUN_NOISE
            notes.append(f"no calibration for {fp_id[:12]}: run-to-run noise assumed {run_noise:.0%} "
                         f"(measure it with `twinbench calibrate --save`)")
        else:
            notes.append(f"run-to-run noise {run_noise:.3f} from calibration")
        cases += _compare_doc(doc, fp_id, base, config, run_noise)
        compared.append((fp_id, base, run_noise))
    stats.decide(cases, config)
    if confirm_doc is not None:
        rerun: list[dict[str, Any]] = []
        for fp_id, base, run_noise in compared:
            rerun += _compare_doc(confirm_doc, fp_id, base, config, run_noise, only=cases)
        stats.confirm(cases, rerun, config)
        notes.append("flagged cases were re-checked against the --confirm run")
    else:
        for c in cases:
            if c["verdict"] == "regression":
                c["verdict"] = "regression (unconfirmed)"
                c["note"] = ("a stored baseline cannot re-run the base: confirm with a fresh `twinbench run` "
                             "of this case and `gate --confirm`")
    failures = [r for r in doc["results"] if r["status"] in ("wrong", "crashed", "timeout")]
    return stats.summarize(cases, failures, config, mode="baseline",
                           mode_text=f"stored baseline {Path(baseline_path)}", note="; ".join(notes))


def _compare_doc(doc: dict[str, Any], fp_id: str, base: dict[str, Any], config: stats.GateConfig,
                 run_noise: float, only: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One gate case per timed (record, mode) of ``fp_id``; with ``only``, just the flagged regressions."""
    entries = {entry_key(e): e for e in base["entries"]}
    wanted = None
    if only is not None:
        wanted = {(c["suite"], c["case"], c["impl"], c["mode"]) for c in only if c.get("verdict") == "regression"}
    cases, seen = [], set()
    for rec in doc["results"]:
        if rec["fingerprint"] != fp_id or rec["status"] != "ok" or (rec.get("timing") or {}).get("excluded"):
            continue
        for mode in MODES:
            timing = (rec.get("timing") or {}).get(mode) or {}
            if not timing.get("samples_ms"):
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
                c.update(stats.compare_samples(entries[key]["samples_ms"], timing["samples_ms"], paired=False,
                                               test=config.test, extra_noise=run_noise, n_boot=config.n_boot,
                                               seed=config.seed,
                                               name=f"{rec['suite']} {rec['case']} {rec['impl']}"))
            cases.append(c)
    if only is None:
        for key, e in entries.items():
            if key not in seen and any(r["suite"] == e["suite"] for r in doc["results"]):
                cases.append({"suite": e["suite"], "case": e["case"], "impl": e["impl"], "device": "",
                              "mode": e["mode"], "verdict": "missing", "note": "in the baseline, not in these results"})
    return cases
