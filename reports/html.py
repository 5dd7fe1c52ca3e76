"""The self-contained HTML report: jinja2 (autoescape on), plotly.js embedded once, opens offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twinbench.reports import charts, model

TEMPLATES = Path(__file__).with_name("templates")


def script_json(obj: Any) -> str:
    """JSON safe inside <script>: '<', '>', '&' and line separators become \\u escapes (no '</script>')."""
    from plotly.utils import PlotlyJSONEncoder

    text = json.dumps(obj, cls=PlotlyJSONEncoder)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                    ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def _suite_section(doc: dict[str, Any], suite: str, gate: dict[str, Any] | None,
                   trends: dict[str, Any] | None, counter: list[int]) -> dict[str, Any]:
    records = model.records_of(doc, suite)
    labels = model.short_case_labels(records)
    figs: list[tuple[str, dict[str, Any] | None]] = []
    for mode in model.MODES:
        figs.append((f"speedup-{mode}", charts.speedup(records, labels, mode)))
    for mode in model.MODES:
        figs.append((f"latency-{mode}", charts.latency(records, labels, mode)))
    figs.append(("parity", charts.parity_share(records, labels)))
    figs.append(("roofline", charts.roofline(records, labels, doc.get("ceilings") or {})))
    figs.append(("memory", charts.memory(records, labels)))
    figs.append(("curves", charts.loss_curves(records, labels)))
    gate_cases = [c for c in (gate or {}).get("cases", []) if c["suite"] == suite]
    figs.append(("gate", charts.gate_deltas(gate_cases, labels)))
    trend_series = [s for s in (trends or {}).get("series", []) if s["suite"] == suite]
    figs.append(("trends", charts.trends(trend_series, labels)))
    figures = []
    for kind, fig in figs:
        if fig is None:
            continue
        counter[0] += 1
        figures.append({"id": f"chart-{counter[0]}", "kind": kind, "json": script_json(fig)})
    rows = [model.table_row(r) for r in records]
    order = {case: i for i, case in enumerate(labels)}
    rows.sort(key=lambda r: (order.get(r["case"], 0), r["impl"] != "reference", r["impl"], r["device"]))
    return {"name": suite, "rows": rows, "figures": figures, "gate_cases": gate_cases,
            "labels": labels, "change_points": [s for s in trend_series if s.get("change_points")]}


def render_html(doc: dict[str, Any], *, gate: dict[str, Any] | None = None,
                trends: dict[str, Any] | None = None, focus_device: str | None = None) -> str:
    """``focus_device``: the column key (model.DeviceColumn.key) of the device the device-by-device view
    compares the others with (default: the results' first device)."""
    import jinja2
    import plotly.offline

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
                             undefined=jinja2.StrictUndefined)
    env.filters["fmt"] = model.fmt
    counter = [0]
    sections = [_suite_section(doc, s, gate, trends, counter) for s in model.suites_of(doc)]
    case_labels = {f"{sec['name']}|{case}": label for sec in sections for case, label in sec["labels"].items()}
    if gate:  # regressions first, then the largest slowdowns
        gate = dict(gate, cases=sorted(gate["cases"], key=lambda c: (not c["verdict"].startswith("regression"),
                                                                     -(c.get("ratio") or 0))))
    # The only unescaped text in the page: plotly.js itself and JSON escaped by script_json.
    return env.get_template("report.html.j2").render(
        doc=doc, prov=doc.get("provenance") or {}, verdicts=model.verdicts(doc),
        failures=model.failures(doc), skips=model.skips(doc), sections=sections,
        fingerprints=list((doc.get("fingerprints") or {}).values()), ceilings=doc.get("ceilings") or {},
        import_failures=doc.get("import_failures") or {}, gate=gate, trends=trends,
        case_labels=case_labels, plotlyjs=plotly.offline.get_plotlyjs(), n_charts=counter[0],
        comparison=model.device_comparison(doc, focus_device))


def write_html(doc: dict[str, Any], path: str | Path, *, gate: dict[str, Any] | None = None,
               trends: dict[str, Any] | None = None, focus_device: str | None = None) -> Path:
    from twinbench.harness.store.results import atomic_write_text

    atomic_write_text(path, render_html(doc, gate=gate, trends=trends, focus_device=focus_device))
    return Path(path)
