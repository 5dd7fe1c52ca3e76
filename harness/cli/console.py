"""The console table printed after a run: per impl, parity error vs bound, times, speedup, stability."""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import Any

from rich.console import Console
from rich.table import Table

STATUS_STYLE = {"ok": "green", "wrong": "bold red", "crashed": "bold red", "timeout": "bold red",
                "skipped": "dim"}


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1e}"  # None: unmeasurable (wrong shape, no finite element)


def _err(check: dict[str, Any] | None) -> str:
    if not check:
        return ""
    return f"{_number(check['error'])}/{_number(check['bound'])}"


def _worst(parity: dict[str, Any] | None, grads: bool) -> dict[str, Any] | None:
    if not parity:
        return None
    checks = [c for n, c in parity["checks"].items() if n.startswith("grad:") == grads and c.get("metric") != "exact"]
    # a failing check first (its ratio may be unmeasurable), then the largest error/bound ratio
    return max(checks, key=lambda c: (not c.get("ok", True), c["ratio"] if c["ratio"] is not None else 0),
               default=None)


def _ms(timing: dict[str, Any] | None, key: str) -> str:
    if not timing:
        return ""
    if key == "bwd":
        v = timing.get("bwd_median_ms")
    else:
        v = (timing.get(key) or {}).get("median_ms")
    return "" if v is None else f"{v:.3g}"


def _speedup(timing: dict[str, Any] | None) -> str:
    if not timing:
        return ""
    if timing.get("excluded"):
        return "not timed"
    ratios = timing.get("ratio_vs_reference") or {}
    r = ratios.get("fwdbwd") or ratios.get("fwd")
    if not r:
        return ""
    return f"{r['median']:.2f}x [{r['p20']:.2f}-{r['p80']:.2f}]"


def make_console() -> Console:
    """Rich console; wide when writing to a file or CI log so tables do not fold."""
    return Console(width=None if sys.stdout.isatty() else 200)


def print_table(doc: dict[str, Any], console: Console | None = None) -> None:
    console = console or make_console()
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for rec in doc["results"]:
        groups[(rec["suite"], rec["device"])].append(rec)
    for (suite, device), recs in sorted(groups.items()):
        table = Table(title=f"{suite} on {device}", title_justify="left", show_lines=False)
        for col in ("case", "impl", "status", "fwd err/bound", "bwd err/bound", "fwd ms", "bwd ms",
                    "speedup (fwd+bwd)", "stable"):
            table.add_column(col, overflow="fold")
        last_case = None
        for rec in recs:
            parity = rec.get("parity")
            stable = "" if not parity or parity.get("stable") is None else ("yes" if parity["stable"] else "NO")
            status = rec["status"]
            style = STATUS_STYLE.get(status, "")
            label = status if status in ("ok", "wrong") else f"{status}: {rec['reason'][:60]}"
            if status == "wrong":
                label = f"wrong: {rec['reason'][:60]}"
            table.add_row(rec["case"] if rec["case"] != last_case else "", rec["impl"],
                          f"[{style}]{label}[/]" if style else label,
                          _err(_worst(parity, False)), _err(_worst(parity, True)),
                          _ms(rec.get("timing"), "fwd"), _ms(rec.get("timing"), "bwd"),
                          _speedup(rec.get("timing")), stable)
            last_case = rec["case"]
        console.print(table)
    counts: dict[str, int] = defaultdict(int)
    for rec in doc["results"]:
        counts[rec["status"]] += 1
    console.print("  ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "no results")
