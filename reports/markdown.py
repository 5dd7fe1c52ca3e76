"""Markdown summary for a PR comment or a CI step summary (GitHub renders HTML in markdown: escape it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twinbench.reports import model


def md(text: Any) -> str:
    """One table cell: HTML-escaped, pipes and newlines neutralised."""
    s = "" if text is None else str(text)
    for ch, esc in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("|", "\\|"), ("`", "\\`")):
        s = s.replace(ch, esc)
    return " ".join(s.split())


def render_markdown(doc: dict[str, Any], *, gate: dict[str, Any] | None = None, max_rows: int = 50) -> str:
    verdicts = model.verdicts(doc)
    failures = model.failures(doc)
    overall = "FAIL" if failures else "PASS"
    prov = doc.get("provenance") or {}
    if not doc["results"]:  # a gate --against run: the gate table is the whole story
        lines = [f"## twinbench gate: {(gate or {}).get('verdict', 'pass').upper()}"]
    else:
        lines = [f"## twinbench: {overall}", "",
                 f"{len(doc['results'])} results, git `{md(prov.get('git_sha', '')[:12])}`"
                 f"{' (dirty)' if prov.get('git_dirty') else ''}", "",
                 "| suite | device | verdict | ok | wrong | crashed | timeout | skipped |",
                 "|---|---|---|---:|---:|---:|---:|---:|"]
    for v in verdicts:
        c = v["counts"]
        lines.append(f"| {md(v['suite'])} | {md(v['device'])} | **{v['verdict']}** | "
                     + " | ".join(str(c.get(s, 0)) for s in ("ok", "wrong", "crashed", "timeout", "skipped"))
                     + " |")
    if failures:
        lines += ["", f"### Failures ({len(failures)})", "", "| suite | device | case | impl | status | reason |",
                  "|---|---|---|---|---|---|"]
        for r in failures[:max_rows]:
            lines.append(f"| {md(r['suite'])} | {md(r['device'])} | {md(r['case'])} | {md(r['impl'])} | "
                         f"{md(r['status'])} | {md(r.get('reason'))} |")
        if len(failures) > max_rows:
            lines.append(f"| ... | | | | | {len(failures) - max_rows} more in report.html |")
    if gate:
        lines += ["", f"### Gate ({md(gate['mode_text'])}): **{gate['verdict'].upper()}**", "",
                  md(gate["summary"]), "",
                  "| suite | case | impl | mode | new/base | 95% interval | p adj. | min effect | verdict |",
                  "|---|---|---|---|---:|---|---:|---:|---|"]
        shown = sorted(gate["cases"], key=lambda c: (not c["verdict"].startswith("regression"),
                                                     -(c.get("ratio") or 0)))
        for c in shown[:max_rows]:
            ratio = model.fmt(c.get("ratio"), ".4f")
            ci = f"{model.fmt(c.get('ci_low'), '.4f')}-{model.fmt(c.get('ci_high'), '.4f')}"
            lines.append(f"| {md(c['suite'])} | {md(c['case'])} | {md(c['impl'])} | {md(c['mode'])} | {ratio} | "
                         f"{ci} | {model.fmt(c.get('p_adjusted'), '.2g')} | {model.fmt(c.get('min_effect'), '.3f')} "
                         f"| {md(c['verdict'])} |")
        if len(shown) > max_rows:
            lines.append(f"| ... | | | | | | | | {len(shown) - max_rows} more |")
    return "\n".join(lines) + "\n"


def write_markdown(doc: dict[str, Any], path: str | Path, *, gate: dict[str, Any] | None = None) -> Path:
    from twinbench.harness.store.results import atomic_write_text

    atomic_write_text(path, render_markdown(doc, gate=gate))
    return Path(path)
