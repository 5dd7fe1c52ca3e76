"""Reports: every renderer from one results document; escaping; a real `twinbench run` into all four files."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd
import pytest
from reports_fixtures import FP, PLANTED, make_doc
from twinbench.harness.cli.main import main
from twinbench.harness.gate.stats import GateConfig
from twinbench.reports.html import render_html, script_json
from twinbench.reports.markdown import render_markdown

from twinbench import reports

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "tests" / "plugins" / "toy_matmul.py"


def _planted_gate() -> dict:
    from twinbench.harness.gate.stats import decide, summarize

    cases = [{"suite": "matmul", "case": "n=64,dtype=fp32", "impl": f"fast{PLANTED}", "device": "cpu", "mode": "fwd",
              "ratio": 1.3, "ci_low": 1.2, "ci_high": 1.4, "p_value": 1e-4, "noise": 0.01}]
    config = GateConfig()
    decide(cases, config)
    return summarize(cases, [], config, mode="baseline", mode_text=f"baseline {PLANTED}", note=PLANTED)


def test_write_all_returns_the_four_files(tmp_path):
    doc = make_doc()
    paths = reports.write_all(doc, tmp_path)
    assert [p.name for p in paths] == ["report.html", "summary.md", "junit.xml", "results.csv"]
    assert all(p.stat().st_size > 0 for p in paths)
    frame = pd.read_csv(tmp_path / "results.csv")
    assert {"suite", "case", "impl", "metric", "value"} <= set(frame.columns)
    assert (frame[frame.metric == "fwd_median_ms"].impl == "fast").sum() == 3


def test_html_escapes_every_planted_string_and_embeds_plotly_once():
    import plotly.offline

    plotlyjs = plotly.offline.get_plotlyjs()
    text = render_html(make_doc(), gate=_planted_gate())
    assert text.count(plotlyjs) == 1
    page = text.replace(plotlyjs, "")  # the page without the library (asserts stay readable)
    raw_planted = "<script>document.title" in page or "<img src=x" in page
    assert not raw_planted
    assert "&lt;script&gt;document.title" in page  # shown, as text
    # Only our own three script elements: error collector, plotly.js, the figures.
    assert len(re.findall(r"<script\b", page)) == 3
    external = re.findall(r'(?:src|href)="(?:https?:)?//[^"]*"', page)
    assert external == []  # opens offline


def test_script_json_cannot_close_the_script_element():
    out = script_json({"name": "</script><script>alert(1)</script>", "amp": "a&b"})
    assert "</script>" not in out and "<" not in out and "&" not in out
    import json

    assert json.loads(out)["name"].startswith("</script>")


def test_html_has_the_charts_failures_fingerprint_and_gate():
    text = render_html(make_doc(), gate=_planted_gate())
    kinds = set(re.findall(r'data-kind="([a-z-]+)"', text))
    assert {"speedup-fwd", "speedup-fwdbwd", "latency-fwd", "parity", "roofline", "memory", "curves", "gate"} <= kinds
    for reason in ("worker died with SIGSEGV", "no progress for 600s", "out: err 3e-3 &gt; bound 2e-6"):
        assert reason in text
    assert FP in text and "cpu_threads" in text
    assert '<td class="regression">regression</td>' in text and "<b>FAIL</b>" in text


def test_suite_tables_show_both_bandwidth_floors():
    """The read-bandwidth share (the floor of a kernel that streams its data once) and the copy share side
    by side, as stored in the record's derived numbers."""
    text = render_html(make_doc(), gate=None)
    assert "% read / copy BW (fwd)" in text
    assert re.search(r'data-v="7.25">7.25 / 5</td>', text), "read / copy shares missing from the suite table"


def test_loss_curves_come_from_loop_metrics():
    from twinbench.reports import model

    doc = make_doc()
    loop = [r for r in doc["results"] if r["suite"] == "loop" and r["impl"] == "fused"][0]
    assert list(model.curves(loop)) == ["loss_curve"]  # the scalar final_loss is not a curve
    assert "final_loss=0.503" in model.scalar_metrics(loop)  # ... it is listed in the table instead


def test_markdown_summary_escapes_and_lists_failures():
    text = render_markdown(make_doc(), gate=_planted_gate())
    assert text.startswith("## twinbench: FAIL")
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "\\| pipes \\|" in text  # a pipe in a reason cannot break the table
    assert "worker died with SIGSEGV" in text
    assert "**FAIL**" in text and "regression" in text


def test_junit_fails_parity_and_regressions_and_skips_skips():
    from twinbench.reports.junit import render_junit

    root = ET.fromstring(render_junit(make_doc(), gate=_planted_gate()).split("\n", 1)[1])
    cases = root.iter("testcase")
    kinds = {}
    for tc in cases:
        for child in tc:
            kinds.setdefault(child.tag, []).append(tc.get("name"))
    assert len(kinds["failure"]) == 2  # the wrong impl + the gate regression
    assert len(kinds["error"]) == 3    # crashed, timeout, the planted crash
    assert len(kinds["skipped"]) == 3
    assert any("evil" in n for n in kinds["error"])


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    code = main(["run", "toy_matmul", "--plugin", str(TOY), "--device", "cpu", "--no-timing", "--out", str(out)])
    return out, code


def test_a_real_run_writes_report_summary_and_junit(real_run):
    out, code = real_run
    assert code == 1  # the planted off-by-one-percent impl is wrong
    for name in ("results.json", "report.html", "summary.md", "junit.xml", "results.csv"):
        assert (out / name).stat().st_size > 0, name
    assert "off_by_one_percent" in (out / "summary.md").read_text()
    root = ET.parse(out / "junit.xml").getroot()
    assert root.get("failures") == "2"  # one wrong impl x two cases


def test_report_command_rebuilds_from_results(real_run, tmp_path):
    out, _ = real_run
    html = tmp_path / "again.html"
    assert main(["report", str(out / "results.json"), "--out", str(html), "--markdown", str(tmp_path / "s.md"),
                 "--junit", str(tmp_path / "j.xml"), "--csv", str(tmp_path / "r.csv")]) == 0
    assert "toy_matmul" in html.read_text() and (tmp_path / "s.md").exists() and (tmp_path / "r.csv").exists()


def test_report_of_a_missing_file_is_one_line_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope.json"), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "results file not found" in err and err.count("\n") == 1
    assert not (tmp_path / "r.html").exists()


def _imported_modules(path: Path) -> set[str]:
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add("twinbench.reports" if node.level else str(node.module))
    return found


def test_reports_import_only_the_results_model_and_renderers():
    """reports/ renders a results document: it imports nothing that runs kernels, gates or workers."""
    import sys

    allowed = ("twinbench.harness.store", "twinbench.reports", "jinja2", "plotly")
    folder = Path(reports.__file__).parent
    offending = {f"{path.name}: {name}" for path in folder.glob("*.py") for name in _imported_modules(path)
                 if name.split(".")[0] not in sys.stdlib_module_names
                 and not any(name == a or name.startswith(a + ".") for a in allowed)}
    assert len(list(folder.glob("*.py"))) >= 5
    assert not offending, sorted(offending)


# --- the device-by-device view ------------------------------------------------------------------------------

@pytest.fixture
def bring_up_files(tmp_path):
    """H100, MI300X (both `cuda:0` on their machines) and the new GPU, each as its own results file."""
    from reports_fixtures import bring_up_docs
    from twinbench.harness.store.results import atomic_write_json

    paths = []
    for doc, name in zip(bring_up_docs(), ("h100", "mi300x", "newgpu")):
        atomic_write_json(tmp_path / f"{name}.json", doc)
        paths.append(str(tmp_path / f"{name}.json"))
    return paths


def test_device_comparison_sets_three_machines_side_by_side(bring_up_files):
    from reports_fixtures import DEVICES
    from twinbench.harness.cli.results_commands import merge_documents
    from twinbench.reports import model

    h100, mi300x, new = bring_up_files
    view = model.device_comparison(merge_documents([new, h100, mi300x]))
    assert [(c.model, c.device, c.focus) for c in view.columns] == [
        (DEVICES[2][1], "xpu:0", True), (DEVICES[0][1], "cuda:0", False), (DEVICES[1][1], "cuda:0", False)]
    assert len(view.rows) == 15  # matmul: 3 cases x 3 impls + 4 on n=512; loop: 2
    by_key = {(r.suite, r.case_label, r.impl): r for r in view.rows}
    wrong = by_key[("matmul", "n=128", "fast")].cells
    assert (wrong[0].status, wrong[0].parity_error, wrong[0].parity_bound) == ("wrong", 0.5, 2e-6)
    assert wrong[1].status == "ok" and wrong[1].parity_error == 1e-6 and wrong[1].pct_ceiling == 10.0
    assert by_key[("loop", "steps=20", "fused")].cells[0] is None  # the new GPU has no loop results
    timed = by_key[("matmul", "n=256", "fast")].cells
    assert timed[0].focus_over_this is None  # the focus is not compared with itself
    assert timed[1].focus_over_this == pytest.approx(2.0, rel=0.05)   # the new GPU is 2x slower than H100
    assert timed[2].focus_over_this == pytest.approx(1.6, rel=0.05)   # ... and 1.6x slower than MI300X
    new_s, h100_s, mi_s = view.summaries
    assert (new_s.ok, new_s.failed, new_s.skipped, new_s.missing, new_s.geomean_focus_over_this) == (6, 4, 3, 2, None)
    assert (h100_s.missing, h100_s.compared) == (0, 6) and h100_s.geomean_focus_over_this == pytest.approx(2, rel=.05)
    assert mi_s.geomean_focus_over_this == pytest.approx(1.6, rel=0.05)


def test_merging_by_device_name_alone_would_lose_a_machine(bring_up_files):
    """The view needs one record per fingerprint: keyed by device name, H100 and MI300X (both cuda:0) collapse."""
    from twinbench.harness.cli.results_commands import merge_documents
    from twinbench.harness.store.results import load, record_key
    from twinbench.reports import model

    docs = [load(p) for p in bring_up_files]
    planted = dict(merge_documents(bring_up_files), results=list(
        {record_key(r): r for d in docs for r in d["results"]}.values()))
    assert len(model.device_columns(planted)) == 2
    assert len(model.device_columns(merge_documents(bring_up_files))) == 3


def test_a_single_device_has_no_comparison_view():
    from twinbench.reports import model

    assert model.device_comparison(make_doc()) is None
    assert 'id="device-comparison"' not in render_html(make_doc())


def test_report_focus_device_highlights_it_and_escapes_every_name(bring_up_files, tmp_path, capsys):
    h100, mi300x, new = bring_up_files
    out = tmp_path / "r.html"
    assert main(["report", h100, mi300x, new, "--out", str(out), "--focus-device", "mi300"]) == 0
    page = out.read_text()
    view = page[page.index('id="device-comparison"'):page.index("</table>", page.index('id="device-comparison"'))]
    assert 'class="device focus" data-device="00000000000a1300/cuda:0">AMD Instinct MI300X (focus)' in view
    assert view.count('class="device"') == 2 and view.count("<tbody>") == 1
    assert "NewGPU &lt;script&gt;document.title" in view and "<script>" not in view
    assert view.count("no record") == 2
    capsys.readouterr()
    assert main(["report", h100, mi300x, new, "--out", str(tmp_path / "x.html"), "--focus-device", "cuda:0"]) == 2
    err = capsys.readouterr().err
    assert "matches 2 of the devices" in err and err.count("\n") == 1
    assert not (tmp_path / "x.html").exists()


def test_verdicts_and_junit_keep_two_machines_cuda0_apart(bring_up_files):
    from twinbench.harness.cli.results_commands import merge_documents
    from twinbench.reports import model
    from twinbench.reports.junit import render_junit

    doc = merge_documents(bring_up_files)
    devices = {v["device"] for v in model.verdicts(doc) if v["suite"] == "matmul"}
    assert devices == {"cuda:0@00000000000a1100", "cuda:0@00000000000a1300", "xpu:0"}
    root = ET.fromstring(render_junit(doc).split("\n", 1)[1])
    names = [ts.get("name") for ts in root.iter("testsuite")]
    assert len(names) == len(set(names)) == 5  # matmul on 3 devices, loop on 2 (the new GPU ran none)
    assert [v["device"] for v in model.verdicts(make_doc())] == ["cpu", "cpu"]  # one machine: names as run
