"""JUnit XML: one test case per (suite, device, case, impl); parity failures and crashes fail, skips skip,
and every gate regression is a failing test case of its own suite "gate"."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Any


def render_junit(doc: dict[str, Any], *, gate: dict[str, Any] | None = None) -> str:
    root = ET.Element("testsuites", name="twinbench")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in doc["results"]:
        groups[(r["suite"], r["device"])].append(r)
    total = failed = 0
    for (suite, device), records in sorted(groups.items()):
        ts = ET.SubElement(root, "testsuite", name=f"{suite}[{device}]")
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        for r in records:
            tc = ET.SubElement(ts, "testcase", classname=f"twinbench.{suite}.{device}",
                               name=f"{r['case']}::{r['impl']}", time=f"{r.get('duration_s') or 0:.3f}")
            counts["tests"] += 1
            reason = r.get("reason") or ""
            if r["status"] == "wrong":
                ET.SubElement(tc, "failure", message=f"parity: {reason}"[:1000], type="parity").text = reason
                counts["failures"] += 1
            elif r["status"] in ("crashed", "timeout"):
                ET.SubElement(tc, "error", message=f"{r['status']}: {reason}"[:1000], type=r["status"]).text = reason
                counts["errors"] += 1
            elif r["status"] == "skipped":
                ET.SubElement(tc, "skipped", message=reason[:1000])
                counts["skipped"] += 1
        for k, v in counts.items():
            ts.set(k, str(v))
        total += counts["tests"]
        failed += counts["failures"] + counts["errors"]
    if gate:
        ts = ET.SubElement(root, "testsuite", name="gate")
        n_fail = 0
        for c in gate["cases"]:
            tc = ET.SubElement(ts, "testcase", classname=f"twinbench.gate.{c['suite']}",
                               name=f"{c['case']}::{c['impl']}::{c['mode']}")
            if c["verdict"].startswith("regression"):
                msg = (f"{c['verdict']}: new/base {c['ratio']:.4f} [{c['ci_low']:.4f}, {c['ci_high']:.4f}], "
                       f"p_adj {c['p_adjusted']:.2g}, min effect {c['min_effect']:.3f}")
                ET.SubElement(tc, "failure", message=msg, type="regression").text = c.get("note") or msg
                n_fail += 1
        ts.set("tests", str(len(gate["cases"])))
        ts.set("failures", str(n_fail))
        total += len(gate["cases"])
        failed += n_fail
    root.set("tests", str(total))
    root.set("failures", str(failed))
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def write_junit(doc: dict[str, Any], path: str | Path, *, gate: dict[str, Any] | None = None) -> Path:
    from twinbench.harness.store.results import atomic_write_text

    atomic_write_text(path, render_junit(doc, gate=gate))
    return Path(path)
