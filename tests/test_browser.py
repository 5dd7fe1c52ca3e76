"""The HTML report in a real headless Chromium: it renders, every chart exists, no script error, and the
planted <script>/<img onerror> in impl names and reasons never runs."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile

import pytest
from reports_fixtures import PLANTED, bring_up_docs, make_doc
from twinbench.harness.cli.results_commands import merge_documents
from twinbench.harness.gate.stats import GateConfig, decide, summarize
from twinbench.harness.store.results import atomic_write_json
from twinbench.reports.html import write_html

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (CI installs it: apt-get install chromium)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000"]


def _chromium(*args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=120)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    cases = [{"suite": "matmul", "case": "n=64,dtype=fp32", "impl": "fast", "device": "cpu", "mode": "fwd",
              "ratio": 1.3, "ci_low": 1.2, "ci_high": 1.4, "p_value": 1e-4, "noise": 0.01}]
    config = GateConfig()
    gate = summarize(decide(cases, config), [], config, mode="baseline", mode_text="baseline", note=PLANTED)
    trends = {"series": [{"suite": "matmul", "case": "n=64,dtype=fp32", "impl": "fast", "fingerprint": "f" * 16,
                          "metric": "fwd_median_ms",
                          "points": [{"time": f"2026-11-{d:02d}", "value": 1.0 + (d > 5) * 0.3, "git_sha": "ab" * 20}
                                     for d in range(1, 11)],
                          "change_points": [{"index": 5, "change_pct": 30.0, "pvalue": 1e-5}]}]}
    folder = tmp_path_factory.mktemp("html")
    # This machine's results first, then three other machines' (H100, MI300X, a new GPU): the device view too.
    paths = [folder / f"{i}.json" for i in range(4)]
    for doc, p in zip([make_doc(), *bring_up_docs()], paths):
        atomic_write_json(p, doc)
    path = folder / "report.html"
    write_html(merge_documents([str(p) for p in paths]), path, gate=gate, trends=trends)
    done = _chromium("--dump-dom", path.as_uri())
    return path, done


def test_report_renders_every_chart_without_script_errors(page):
    path, done = page
    dom = done.stdout
    assert done.returncode == 0, done.stderr[-2000:]
    expected = int(re.search(r'data-charts-expected="(\d+)"', dom).group(1))
    rendered = int(re.search(r'data-charts-rendered="(\d+)"', dom).group(1))
    assert expected >= 10 and rendered == expected
    assert re.search(r'data-js-errors="(\d+)"', dom).group(1) == "0"
    assert dom.count('class="main-svg"') >= expected  # plotly drew an <svg> per chart
    console = [ln for ln in done.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert console == []


def test_planted_markup_is_shown_as_text_and_never_runs(page):
    _, done = page
    dom = done.stdout
    assert "<title>twinbench report</title>" in dom  # the planted scripts would have set it to 'pwned'
    assert "pwned" in dom  # ... but the text itself is visible, escaped
    assert "<img src=\"x\"" not in dom and "<img src=x" not in dom


def test_table_sorting_works(tmp_path, page):
    path, _ = page
    probe = tmp_path / "probe.html"
    script = """<script>
var t = document.getElementById('suite-matmul').nextElementSibling;
var col = Array.prototype.findIndex.call(t.tHead.rows[0].cells, function (c) { return c.textContent.indexOf('fwd ms') === 0; });
function values() { return Array.prototype.map.call(t.tBodies[0].rows, function (r) { return r.cells[col].getAttribute('data-v'); })
  .filter(function (v) { return v !== ''; }).map(parseFloat); }
function sorted(a, sign) { for (var i = 1; i < a.length; i++) { if (sign * (a[i] - a[i - 1]) < 0) return false; } return true; }
t.tHead.rows[0].cells[col].click(); var up = values();
t.tHead.rows[0].cells[col].click(); var down = values();
document.body.setAttribute('data-sorted', [up.length, sorted(up, 1), sorted(down, -1)].join('|'));
</script></body>"""
    probe.write_text(path.read_text().replace("</body>", script))
    dom = _chromium("--dump-dom", probe.as_uri()).stdout
    n, up, down = re.search(r'data-sorted="([^"]*)"', dom).group(1).split("|")
    assert int(n) >= 4 and up == "true" and down == "true"


def test_device_comparison_view_renders_with_every_row_and_no_errors(page):
    _, done = page
    dom = done.stdout
    assert done.returncode == 0, done.stderr[-2000:]
    view = re.search(r'<table id="device-comparison">(.*?)</table>', dom, re.S).group(1)
    groups = re.findall(r'<th colspan="6" class="device( focus)?"', view)
    assert groups == [" focus", "", "", ""]  # this machine's CPU (the first file) and the three GPUs
    body = view[view.index("<tbody>"):view.index("</tbody>")]
    assert body.count("<tr ") == 16  # the planted crash's case exists on the CPU only
    assert body.count(">no record<") == 2 + 3  # the new GPU's two loop rows; the planted case on the 3 GPUs
    assert re.search(r'data-js-errors="(\d+)"', dom).group(1) == "0"
    assert "<title>twinbench report</title>" in dom  # the planted model name never ran
    console = [ln for ln in done.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert console == []
