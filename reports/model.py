"""What every renderer reads out of a results document: verdicts, table rows, failures, curves.

Pure functions over the JSON document (no torch, no kernels), shared by HTML, markdown and JUnit.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FAILED = ("wrong", "crashed", "timeout")
MODES = ("fwd", "fwdbwd")


def suites_of(doc: dict[str, Any]) -> list[str]:
    return sorted({r["suite"] for r in doc["results"]})


def records_of(doc: dict[str, Any], suite: str) -> list[dict[str, Any]]:
    return [r for r in doc["results"] if r["suite"] == suite]


def device_namer(doc: dict[str, Any]) -> Callable[[dict[str, Any]], str]:
    """rec -> the device name tables show: its name in its run, or ``name@fingerprint`` where results of
    several machines share that name (`cuda:0` on an H100 machine and on an MI300X machine)."""
    fingerprints: dict[str, set[str]] = defaultdict(set)
    for r in doc["results"]:
        fingerprints[r["device"]].add(r.get("fingerprint") or "")
    shared = {name for name, fps in fingerprints.items() if len(fps) > 1}
    return lambda r: f"{r['device']}@{r.get('fingerprint') or ''}" if r["device"] in shared else r["device"]


def verdicts(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (suite, device): status counts and PASS/FAIL (any wrong, crashed or timeout fails)."""
    groups: dict[tuple[str, str], Counter] = defaultdict(Counter)
    device_of = device_namer(doc)
    for r in doc["results"]:
        groups[(r["suite"], device_of(r))][r["status"]] += 1
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
        # both bandwidth floors, side by side: the read ceiling is the floor of a kernel that streams its
        # data once (a GEMV's weight), the copy ceiling that of one that reads and writes (docs/method.md §2)
        row[f"{mode}_pct_read_bw"] = derived.get(f"{mode}_pct_read_bw")
        row[f"{mode}_pct_copy_bw"] = derived.get(f"{mode}_pct_peak_bw")
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


# --- the device-by-device view: the same (suite, case, impl) on every device the merged results hold ----

@dataclass(frozen=True)
class DeviceColumn:
    """One device of one machine: its fingerprint (hard key) and its name in that machine's run."""

    fingerprint: str
    device: str  # as the run named it: cuda:0 on two machines is two columns
    model: str   # the fingerprint's device model, e.g. "NVIDIA H100 80GB HBM3"
    focus: bool = False  # the bring-up device the others are compared with

    @property
    def key(self) -> str:
        return f"{self.fingerprint}/{self.device}"


@dataclass(frozen=True)
class DeviceCell:
    status: str
    reason: str
    fwd_ms: float | None
    fwdbwd_ms: float | None
    pct_ceiling: float | None  # forward, of the nearer ceiling (matmul FLOP/s or copy bandwidth)
    ceiling: str               # which ceiling: "FLOP/s", "bandwidth" or ""
    parity_check: str          # the check with the largest error/bound ratio
    parity_error: float | None
    parity_bound: float | None
    focus_over_this: float | None  # focus fwd ms / this fwd ms: > 1 where this device is faster


@dataclass(frozen=True)
class ComparisonRow:
    suite: str
    case: str
    case_label: str
    impl: str
    cells: tuple[DeviceCell | None, ...]  # one per column; None where that device has no record


@dataclass(frozen=True)
class DeviceSummary:
    ok: int
    failed: int     # wrong, crashed or timeout
    skipped: int
    missing: int    # rows this device has no record for
    compared: int   # rows timed (fwd) on both this device and the focus
    geomean_focus_over_this: float | None


@dataclass(frozen=True)
class DeviceComparison:
    columns: tuple[DeviceColumn, ...]
    rows: tuple[ComparisonRow, ...]
    summaries: tuple[DeviceSummary, ...]


def device_columns(doc: dict[str, Any]) -> list[DeviceColumn]:
    """Every (fingerprint, device) of the results, in the order they first appear (the first file's first)."""
    fingerprints = doc.get("fingerprints") or {}
    seen: dict[tuple[str, str], DeviceColumn] = {}
    for r in doc["results"]:
        fp = r.get("fingerprint") or ""
        hard = (fingerprints.get(fp) or {}).get("hard") or {}
        seen.setdefault((fp, r["device"]), DeviceColumn(fp, r["device"], str(hard.get("device") or r["device"])))
    return list(seen.values())


def match_devices(columns: list[DeviceColumn], text: str) -> list[DeviceColumn]:
    """The columns a --focus-device names: a fingerprint id (or its prefix), `fingerprint/device`, a device
    name (cuda:0) or a part of the model name (h100), case-insensitively."""
    t = text.strip().lower()
    return [c for c in columns if t and (c.fingerprint.lower().startswith(t) or c.key.lower() == t
                                         or c.device.lower() == t or t in c.model.lower())]


def worst_check(rec: dict[str, Any]) -> dict[str, Any] | None:
    checks = [c for c in ((rec.get("parity") or {}).get("checks") or {}).values() if c.get("ratio") is not None]
    return max(checks, key=lambda c: c["ratio"]) if checks else None


def _ceiling_share(rec: dict[str, Any]) -> tuple[float | None, str]:
    derived = rec.get("derived") or {}
    shares = [(derived.get("fwd_pct_peak_flops"), "FLOP/s"), (derived.get("fwd_pct_peak_bw"), "bandwidth")]
    shares = [(pct, name) for pct, name in shares if pct is not None]
    return max(shares, key=lambda s: s[0]) if shares else (None, "")


def _cell(rec: dict[str, Any], focus_ms: float | None) -> DeviceCell:
    worst = worst_check(rec) or {}
    pct, ceiling = _ceiling_share(rec)
    fwd = median_ms(rec, "fwd")
    return DeviceCell(
        status=rec["status"], reason=rec.get("reason") or (rec.get("timing") or {}).get("excluded") or "",
        fwd_ms=fwd, fwdbwd_ms=median_ms(rec, "fwdbwd"), pct_ceiling=pct, ceiling=ceiling,
        parity_check=worst.get("name", ""), parity_error=worst.get("error"), parity_bound=worst.get("bound"),
        focus_over_this=focus_ms / fwd if focus_ms and fwd else None)


def device_comparison(doc: dict[str, Any], focus: str | None = None) -> DeviceComparison | None:
    """One row per (suite, case, impl), one column group per device; None for results of a single device.

    ``focus`` is a column key (``DeviceColumn.key``); by default the first device of the results (with
    ``twinbench report``: of the first results file).
    """
    columns = device_columns(doc)
    if len(columns) < 2:
        return None
    focus_key = focus if focus in {c.key for c in columns} else columns[0].key
    columns = [DeviceColumn(c.fingerprint, c.device, c.model, focus=c.key == focus_key) for c in columns]
    index = {c.key: i for i, c in enumerate(columns)}
    focus_i = index[focus_key]
    by_row: dict[tuple[str, str, str], list[dict[str, Any] | None]] = {}
    for r in doc["results"]:
        cells = by_row.setdefault((r["suite"], r["case"], r["impl"]), [None] * len(columns))
        cells[index[f"{r.get('fingerprint') or ''}/{r['device']}"]] = r
    rows = []
    for suite in suites_of(doc):
        records = records_of(doc, suite)
        labels = short_case_labels(records)
        order = {case: i for i, case in enumerate(labels)}
        keys = sorted((k for k in by_row if k[0] == suite),
                      key=lambda k: (order.get(k[1], 0), k[2] != "reference", k[2]))
        for key in keys:
            recs = by_row[key]
            focus_rec = recs[focus_i]
            focus_ms = median_ms(focus_rec, "fwd") if focus_rec else None
            rows.append(ComparisonRow(suite, key[1], labels.get(key[1], key[1]), key[2],
                                      tuple(_cell(r, focus_ms if j != focus_i else None) if r else None
                                            for j, r in enumerate(recs))))
    summaries = []
    for i in range(len(columns)):
        cells = [row.cells[i] for row in rows]
        present = [c for c in cells if c is not None]
        ratios = [c.focus_over_this for c in present if c.focus_over_this] if i != focus_i else []
        summaries.append(DeviceSummary(
            ok=sum(c.status == "ok" for c in present), failed=sum(c.status in FAILED for c in present),
            skipped=sum(c.status == "skipped" for c in present), missing=len(cells) - len(present),
            compared=len(ratios),
            geomean_focus_over_this=float(math.exp(sum(math.log(x) for x in ratios) / len(ratios))) if ratios
            else None))
    return DeviceComparison(tuple(columns), tuple(rows), tuple(summaries))
