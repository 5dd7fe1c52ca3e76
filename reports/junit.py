"""JUnit XML: one test case per (suite, device, case, impl); parity failures and crashes fail, skips skip,
and every gate regression is a failing test case of its own suite "gate"."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Any

from twinbench.reports import model

# Characters XML 1.0 forbids (control characters, e.g. a crash's ANSI colour codes, lone surrogates):
# ElementTree writes them as they are, and a CI's parser then rejects the whole file.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_safe(root: ET.Element) -> None:
    for el in root.iter():
        el.attrib.update({k: _NOT_XML.sub("\ufffd", v) for k, v in el.attrib.items()})
        if el.text:
            el.text = _NOT_XML.sub("\ufffd", el.text)


def render_junit(doc: dict[str, Any], *, gate: dict[str, Any] | None = None) -> str:
    root = ET.Element("testsuites", name="twinbench")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    device_of = model.device_namer(doc)  # several machines' cuda:0 stay apart
    for r in doc["results"]:
        groups[(r["suite"], device_of(r))].append(r)
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
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
        for k, v in counts.items():
            totals[k] += v
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
        # errors and skipped too: the common JUnit schema requires them on every testsuite (tests/data/junit.xsd)
        for k, v in (("tests", len(gate["cases"])), ("failures", n_fail), ("errors", 0), ("skipped", 0)):
            ts.set(k, str(v))
        totals["tests"] += len(gate["cases"])
        totals["failures"] += n_fail
    for k in ("tests", "failures", "errors"):  # the common schema has no `skipped` on <testsuites>
        root.set(k, str(totals[k]))
    _xml_safe(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def write_junit(doc: dict[str, Any], path: str | Path, *, gate: dict[str, Any] | None = None) -> Path:
    from twinbench.harness.store.results import atomic_write_text

    atomic_write_text(path, render_junit(doc, gate=gate))
    return Path(path)
