"""Plotly figures for one suite's records. Returned as plain dicts; the HTML page embeds plotly.js once.

Every label is HTML-escaped before it reaches plotly (plotly renders a subset of HTML tags in text).
"""

from __future__ import annotations

import html
from collections import defaultdict
from typing import Any

from twinbench.reports import model

_LAYOUT = {"template": "plotly_white", "height": 360, "margin": {"l": 60, "r": 20, "t": 50, "b": 90},
           "legend": {"orientation": "h", "y": -0.3}}


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _figure(traces: list[Any], title: str, **layout: Any) -> dict[str, Any]:
    import plotly.graph_objects as go

    fig = go.Figure(data=traces)
    fig.update_layout(**_LAYOUT, title={"text": _e(title), "font": {"size": 13}, "x": 0.01}, **layout)
    return fig.to_plotly_json()


def _hline(y: float, text: str) -> dict[str, Any]:
    return {"shapes": [{"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": y, "y1": y,
                        "line": {"dash": "dot", "color": "#888"}}],
            "annotations": [{"xref": "paper", "x": 1, "y": y, "text": _e(text), "showarrow": False,
                             "xanchor": "right", "yanchor": "bottom", "font": {"size": 10}}]}


def speedup(records: list[dict[str, Any]], labels: dict[str, str], mode: str) -> dict[str, Any] | None:
    import plotly.graph_objects as go

    by_impl: dict[str, list[tuple[str, dict[str, float]]]] = defaultdict(list)
    for r in records:
        s = model.speedup(r, mode)
        if s and "reference" not in (r.get("tags") or []):
            by_impl[r["impl"]].append((labels[r["case"]], s))
    if not by_impl:
        return None
    traces = [go.Bar(name=_e(impl), x=[_e(c) for c, _ in pts], y=[s["median"] for _, s in pts],
                     error_y={"type": "data", "symmetric": False,
                              "array": [max(0.0, s["p80"] - s["median"]) for _, s in pts],
                              "arrayminus": [max(0.0, s["median"] - s["p20"]) for _, s in pts]})
              for impl, pts in by_impl.items()]
    return _figure(traces, f"Speedup over the reference ({mode}): median of per-round ratios, bars p20-p80",
                   barmode="group", yaxis={"title": "x faster than reference", "type": "log"},
                   **_hline(1.0, "reference"))


def latency(records: list[dict[str, Any]], labels: dict[str, str], mode: str) -> dict[str, Any] | None:
    import plotly.graph_objects as go

    by_impl: dict[str, list[tuple[Any, float, str]]] = defaultdict(list)
    for r in records:
        ms = model.median_ms(r, mode)
        if ms is None:
            continue
        flops = model.work_flops(r, mode)
        by_impl[r["impl"]].append((flops, ms, labels[r["case"]]))
    if not by_impl:
        return None
    use_flops = all(f for pts in by_impl.values() for f, _, _ in pts)
    traces = [go.Scatter(name=_e(impl), mode="markers+lines" if use_flops else "markers",
                         x=[f if use_flops else _e(c) for f, _, c in sorted(pts, key=lambda p: p[0] or 0)],
                         y=[ms for _, ms, _ in sorted(pts, key=lambda p: p[0] or 0)],
                         text=[_e(c) for _, _, c in sorted(pts, key=lambda p: p[0] or 0)])
              for impl, pts in by_impl.items()]
    xaxis = {"title": "FLOPs per call", "type": "log"} if use_flops else {"title": "case"}
    return _figure(traces, f"Latency against problem size ({mode}, median)", xaxis=xaxis,
                   yaxis={"title": "ms", "type": "log"})


def parity_share(records: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, Any] | None:
    import plotly.graph_objects as go

    by_impl: dict[str, list[tuple[str, float, str]]] = defaultdict(list)
    for r in records:
        if "reference" in (r.get("tags") or []):
            continue
        for chk in ((r.get("parity") or {}).get("checks") or {}).values():
            if chk.get("ratio") is None:
                continue
            hover = (f"{labels[r['case']]} {chk.get('name')}: error {chk.get('error', 0):.3g} / "
                     f"bound {chk.get('bound', 0):.3g} ({chk.get('metric', '')})")
            by_impl[r["impl"]].append((labels[r["case"]], max(float(chk["ratio"]), 1e-4), hover))
    if not by_impl:
        return None
    traces = [go.Scatter(name=_e(impl), mode="markers", x=[_e(c) for c, _, _ in pts],
                         y=[v for _, v, _ in pts], text=[_e(h) for _, _, h in pts], hoverinfo="text+name",
                         marker={"size": 9, "opacity": 0.8})
              for impl, pts in by_impl.items()]
    return _figure(traces, "Parity error as a share of its bound (every output and gradient; > 1 fails)",
                   yaxis={"title": "error / bound", "type": "log"}, **_hline(1.0, "bound"))


def roofline(records: list[dict[str, Any]], labels: dict[str, str], ceilings: dict[str, Any],
             mode: str = "fwd") -> dict[str, Any] | None:
    """Achieved TFLOP/s against arithmetic intensity, under the device's measured ceilings."""
    import plotly.graph_objects as go

    points: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    fps: set[str] = set()
    for r in records:
        d = r.get("derived") or {}
        tflops, gbps = d.get(f"{mode}_tflops"), d.get(f"{mode}_gbps")
        if tflops and gbps:
            points[r["impl"]].append((tflops * 1e3 / gbps, tflops, labels[r["case"]]))
            fps.add(r["fingerprint"])
    if not points:
        return None
    traces = [go.Scatter(name=_e(impl), mode="markers", x=[p[0] for p in pts], y=[p[1] for p in pts],
                         text=[_e(p[2]) for p in pts], marker={"size": 9})
              for impl, pts in points.items()]
    xs = [p[0] for pts in points.values() for p in pts]
    lo, hi = min(xs) / 4, max(xs) * 4
    for fp in sorted(fps):
        ceil = ceilings.get(fp) or {}
        bw = ceil.get("copy_gbps")
        for dtype, peak in sorted((ceil.get("matmul_tflops") or {}).items()):
            if not bw or not peak:
                continue
            knee = peak * 1e3 / bw
            ai = [lo, min(max(knee, lo), hi), hi]
            traces.append(go.Scatter(name=_e(f"ceiling {dtype} ({fp[:8]})"), mode="lines",
                                     x=ai, y=[min(peak, a * bw / 1e3) for a in ai],
                                     line={"dash": "dash", "width": 1}))
    return _figure(traces, f"Roofline ({mode}): achieved vs the measured matmul and copy ceilings",
                   xaxis={"title": "FLOPs per byte", "type": "log"},
                   yaxis={"title": "TFLOP/s", "type": "log"})


def memory(records: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, Any] | None:
    import plotly.graph_objects as go

    by_impl: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for r in records:
        peak = (r.get("memory") or {}).get("peak_bytes")
        if peak is not None:
            by_impl[r["impl"]].append((labels[r["case"]], peak / 2**20))
    if not by_impl:
        return None
    traces = [go.Bar(name=_e(impl), x=[_e(c) for c, _ in pts], y=[v for _, v in pts])
              for impl, pts in by_impl.items()]
    return _figure(traces, "Peak memory per call (forward + backward where timed)", barmode="group",
                   yaxis={"title": "MiB"})


def loss_curves(records: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, Any] | None:
    import plotly.graph_objects as go

    traces = []
    for r in records:
        for name, series in model.curves(r).items():
            traces.append(go.Scatter(name=_e(f"{r['impl']} {name} [{labels[r['case']]}]"), mode="lines",
                                     x=list(range(1, len(series) + 1)), y=series))
    if not traces:
        return None
    return _figure(traces, "Per-step curves reported by loop impls (loss and friends)",
                   xaxis={"title": "step"}, yaxis={"title": "value"})


def gate_deltas(cases: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, Any] | None:
    import plotly.graph_objects as go

    if not cases:
        return None
    by_impl: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for c in cases:
        if c.get("ratio") is not None:
            by_impl[f"{c['impl']} ({c['mode']})"].append(c)
    traces = [go.Scatter(name=_e(name), mode="markers",
                         x=[_e(labels.get(c["case"], c["case"])) for c in pts], y=[c["ratio"] for c in pts],
                         text=[_e(f"{c['verdict']}; p={c.get('p_value')}") for c in pts],
                         error_y={"type": "data", "symmetric": False,
                                  "array": [c["ci_high"] - c["ratio"] for c in pts],
                                  "arrayminus": [c["ratio"] - c["ci_low"] for c in pts]},
                         marker={"size": 9})
              for name, pts in by_impl.items()]
    if not traces:
        return None
    return _figure(traces, "Against the baseline: time ratio new/base with 95% interval (> 1 is slower)",
                   yaxis={"title": "new / base"}, **_hline(1.0, "no change"))


def trends(series: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, Any] | None:
    import plotly.graph_objects as go

    traces = []
    crowded = len(series) > 8  # then only series with a change point start visible (click the legend)
    for s in series:
        pts = s["points"]
        cps = s.get("change_points") or []
        name = _e(f"{s['impl']} {s['metric']} [{labels.get(s['case'], s['case'])}] {s['fingerprint'][:8]}")
        traces.append(go.Scatter(name=name, mode="lines+markers", x=[p["time"] for p in pts],
                                 visible=True if cps or not crowded else "legendonly",
                                 y=[p["value"] for p in pts], text=[_e(p.get("git_sha", "")[:10]) for p in pts]))
        if cps:
            traces.append(go.Scatter(name=_e(f"change: {s['impl']} [{labels.get(s['case'], s['case'])}]"),
                                     mode="markers",
                                     x=[pts[c["index"]]["time"] for c in cps],
                                     y=[pts[c["index"]]["value"] for c in cps],
                                     text=[_e(f"{c['change_pct']:+.1f}% p={c['pvalue']:.2g}") for c in cps],
                                     marker={"symbol": "x", "size": 14, "color": "red"}))
    if not traces:
        return None
    return _figure(traces, "Nightly history (change points from Apache Otava's E-divisive)",
                   xaxis={"title": "run time"}, yaxis={"title": "value", "type": "log"})
