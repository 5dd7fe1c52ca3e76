"""Renderers for a results document: HTML report, markdown summary, JUnit XML, long-format CSV.

They render only: every number comes from the results document, or from a gate comparison / history
trend computed by ``harness.gate`` / ``harness.store.history`` and passed in. Nothing here runs a kernel,
and nothing here imports beyond ``twinbench.harness.store`` (the results model) and ``twinbench.reports``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# What write_all writes into its folder, in order; commands check these paths before writing anything.
REPORT_FILES = ("report.html", "summary.md", "junit.xml", "results.csv")


def write_all(doc: dict[str, Any], out: str | Path, *, gate: dict[str, Any] | None = None,
              trends: dict[str, Any] | None = None) -> list[Path]:
    """report.html, summary.md, junit.xml and results.csv into ``out``; returns the written paths."""
    from twinbench.harness.store.results import write_csv
    from twinbench.reports.html import write_html
    from twinbench.reports.junit import write_junit
    from twinbench.reports.markdown import write_markdown

    out = Path(out)
    paths = [out / name for name in REPORT_FILES]
    write_html(doc, paths[0], gate=gate, trends=trends)
    write_markdown(doc, paths[1], gate=gate)
    write_junit(doc, paths[2], gate=gate)
    write_csv(doc, paths[3])
    return paths
