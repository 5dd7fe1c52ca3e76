"""What every renderer reads out of a results document: verdicts, table rows, failures, curves.

Pure functions over the JSON document (no torch, no kernels), shared by HTML, markdown and JUnit.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

FAILED = ("wrong", "crashed", "timeout")
MODES = ("fwd", "fwdbwd")


def suites_of(doc: dict[str, Any]) -> list[str]:
    return sorted({r["suite"] for r in doc["results"]})


def records_of(doc: dict[str, Any], suite: str) -> list[dict[str, Any]]:
    return [r for r in doc["results"] if r["suite"] == suite]


def verdicts(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (suite, device): status counts and PASS/FAIL (any wrong, crashed or timeout fails)."""
    groups: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for r in doc["results"]:
        groups[(r["suite"], r["device"])][r["status"]] += 1
    rows = []
    for (suite, device), counts in sorted(groups.items()):
        failed = sum(counts[s] for s in FAILED)
        rows.append({"suite": suite, "device": device, "counts": dict(counts), "failed": failed,
                     "verdict": "FAIL" if failed else "PASS"})
    return rows


def failures(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in doc["results"] if r["status"] in FAILED]


def skips(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in doc["results"] if r["status"] == "skipped"]


def short_case_labels(records: list[dict[str, Any]]) -> dict[str, str]:
    """case id -> a short axis label: the varying parameters when that is short, else c1, c2, ...

    Full case ids are long; the report prints a legend from label to full id.
    """
    params: dict[str, dict[str, Any]] = {}
    for r in records:
        params.setdefault(r["case"], r.get("params") or {})
    keys = sorted({k for p in params.values() for k in p})
    varying = [k for k in keys if len({repr(p.get(k)) for p in params.values()}) > 1]
    out = {case: ",".join(f"{k}={p.get(k)}" for k in varying if k in p) or case for case, p in params.items()}
    if max((len(v) for v in out.values()), default=0) > 28 or len(set(out.values())) < len(out):
        out = {case: f"c{i}" for i, case in enumerate(params, 1)}
    return out


def worst_parity(rec: dict[str, Any]) -> tuple[str, float | None]:
    """The parity check with the largest error/bound ratio: (name, ratio)."""
    checks = ((rec.get("parity") or {}).get("checks") or {}).values()
    best: tuple[str, float | None] = ("", None)
    for chk in checks:
        ratio = chk.get("ratio")
        if ratio is not None and (best[1] is None or ratio > best[1]):
            best = (chk.get("name", ""), float(ratio))
    return best


def speedup(rec: dict[str, Any], mode: str) -> dict[str, float] | None:
    ratio = ((rec.get("timing") or {}).get("ratio_vs_reference") or {}).get(mode)
    return ratio if ratio and ratio.get("median") is not None else None


def median_ms(rec: dict[str, Any], mode: str) -> float | None:
    stats = (rec.get("timing") or {}).get(mode) or {}
    return stats.get("median_ms")


def work_flops(rec: dict[str, Any], mode: str) -> float | None:
    """FLOPs of one call, recovered from the stored achieved TFLOP/s and median time."""
    tflops = (rec.get("derived") or {}).get(f"{mode}_tflops")
    ms = median_ms(rec, mode)
    return tflops * 1e12 * ms / 1e3 if tflops and ms else None


def table_row(rec: dict[str, Any]) -> dict[str, Any]:
    name, ratio = worst_parity(rec)
    derived = rec.get("derived") or {}
    row = {"case": rec["case"], "impl": rec["impl"], "device": rec["device"], "status": rec["status"],
           "reason": rec.get("reason") or (rec.get("timing") or {}).get("excluded") or "",
           "parity_check": name, "parity_ratio": ratio, "tags": ",".join(rec.get("tags") or []),
           "peak_mib": None}
    for mode in MODES:
        row[f"{mode}_ms"] = median_ms(rec, mode)
        s = speedup(rec, mode)
        row[f"{mode}_speedup"] = s["median"] if s else None
        row[f"{mode}_speedup_range"] = (s["p20"], s["p80"]) if s else None
        row[f"{mode}_tflops"] = derived.get(f"{mode}_tflops")
        row[f"{mode}_pct_peak"] = derived.get(f"{mode}_pct_peak_flops")
        row[f"{mode}_gbps"] = derived.get(f"{mode}_gbps")
    peak = (rec.get("memory") or {}).get("peak_bytes")
    row["peak_mib"] = peak / 2**20 if peak is not None else None
    row["metrics"] = scalar_metrics(rec)
    return row


def scalar_metrics(rec: dict[str, Any], limit: int = 8) -> str:
    """Self-measured scalars a loop impl reported (curves are charted instead), as 'k=v; ...'."""
    items = []
    for name, value in (rec.get("metrics") or {}).items():
        if isinstance(value, bool) or isinstance(value, (int, float, str)):
            items.append(f"{name}={fmt(value, '.4g')}")
    return "; ".join(items[:limit]) + ("; ..." if len(items) > limit else "")


def curves(rec: dict[str, Any]) -> dict[str, list[float]]:
    """Per-step series a loop impl reported (``metrics.loss_curve``-like lists of numbers)."""
    found: dict[str, list[float]] = {}
    sources = [rec.get("metrics") or {}, (rec.get("parity") or {}).get("metrics") or {}]
    for src in sources:
        for name, value in src.items():
            if isinstance(value, dict):  # one level of nesting: {"policy": {"loss": [...]}}
                for sub, inner in value.items():
                    if _is_series(inner):
                        found.setdefault(f"{name}.{sub}", [float(x) for x in inner])
            elif _is_series(value):
                found.setdefault(name, [float(x) for x in value])
    return found


def _is_series(value: Any) -> bool:
    return (isinstance(value, list) and len(value) >= 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value))


def fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return format(value, spec)
    return str(value)
