"""CI-native output: the job summary ($GITHUB_STEP_SUMMARY), GitHub annotations (escaped against hostile
names), and junit.xml valid against the common JUnit schema that GitLab's test reports read."""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from reports_fixtures import PLANTED, make_doc, record, slowed
from twinbench.harness.cli import ci_output
from twinbench.harness.cli.main import main
from twinbench.harness.gate.stats import GateConfig, decide, summarize
from twinbench.harness.store.results import atomic_write_json
from twinbench.reports.annotations import (
    Annotation,
    Level,
    annotations_for,
    format_annotation,
    render_annotations,
)
from twinbench.reports.junit import render_junit

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "tests" / "plugins" / "toy_matmul.py"
JUNIT_XSD = ROOT / "tests" / "data" / "junit.xsd"
# Each one would end a property, end the command, or start a second command if it were not escaped.
HOSTILE = "evil,impl:x%41\r\n::error title=injected::pwned,%0A::"


def parse_workflow_command(line: str) -> tuple[str, dict[str, str], str]:
    """Read one line as the GitHub runner does: `::name k=v,k=v::message`, then undo its escapes."""
    m = re.fullmatch(r"::(\w+)(?: ([^:]*))?::(.*)", line)
    assert m, line

    def unescape(text: str) -> str:
        for esc, ch in (("%0D", "\r"), ("%0A", "\n"), ("%3A", ":"), ("%2C", ","), ("%25", "%")):
            text = text.replace(esc, ch)
        return text

    props = dict(p.split("=", 1) for p in (m.group(2) or "").split(",") if p)
    return m.group(1), {k: unescape(v) for k, v in props.items()}, unescape(m.group(3))


def _gate(impl: str = "fast", case: str = "n=64,dtype=fp32") -> dict:
    cases = [{"suite": "matmul", "case": case, "impl": impl, "device": "cpu", "mode": "fwd", "ratio": 1.3,
              "ci_low": 1.2, "ci_high": 1.4, "p_value": 1e-4, "noise": 0.01}]
    config = GateConfig()
    return summarize(decide(cases, config), [], config, mode="baseline", mode_text="baseline")


# --- annotations -----------------------------------------------------------------------------------------

def test_hostile_titles_files_and_messages_survive_as_one_command_each():
    a = Annotation(Level.ERROR, f"title {HOSTILE}", f"message {HOSTILE}", file=f"impls/{HOSTILE}.py")
    line = format_annotation(a)
    assert "\n" not in line and "\r" not in line
    assert line.startswith("::error file=impls/evil%2Cimpl%3Ax%2541%0D%0A%3A%3Aerror title=injected%3A%3A")
    assert parse_workflow_command(line) == ("error", {"file": a.file, "title": a.title}, a.message)


def test_the_roundtrip_check_catches_an_unescaped_formatter():
    """The check above can fail: the same annotation written without escaping does not survive it."""
    a = Annotation(Level.ERROR, f"title {HOSTILE}", f"message {HOSTILE}")
    naive = f"::error title={a.title}::{a.message}"
    survived = len(naive.splitlines()) == 1 and parse_workflow_command(naive) == ("error", {"title": a.title},
                                                                                   a.message)
    assert not survived


def test_every_failure_crash_hang_and_regression_is_an_error():
    doc = make_doc()  # wrong, crashed, timeout, and a planted crashing impl named with <script>
    doc["results"].append(record("matmul", {"n": 8, "dtype": "fp32"}, HOSTILE, "wrong", reason=HOSTILE))
    doc["import_failures"] = {"impls.broken": "ImportError: no module named triton"}
    text = render_annotations(doc, gate=_gate(impl=HOSTILE, case=HOSTILE))
    lines = text.splitlines()
    parsed = [parse_workflow_command(ln) for ln in lines]
    errors = [p for p in parsed if p[0] == "error"]
    assert len(errors) == 6  # wrong_one, crashy, slowpoke, the planted crash, the hostile wrong; the regression
    assert [p[1]["title"] for p in parsed if p[0] == "warning"] == ["twinbench import failed: impls.broken"]
    assert any(f"impl {HOSTILE}" in msg and msg.endswith(HOSTILE) for _, _, msg in errors)
    assert any(title.startswith("twinbench gate regression") and HOSTILE in title for _, p, _ in errors
               for title in [p["title"]])
    assert any(PLANTED in msg for _, _, msg in errors)
    assert all(ln.startswith(("::error ", "::warning ")) for ln in lines)


def test_a_passing_run_has_no_annotations_and_files_stay_inside_the_workspace(tmp_path):
    assert render_annotations(make_doc(planted=False) | {"results": []}) == ""
    rec = record("matmul", {"n": 8}, "x", "wrong", reason="r")
    rec["meta"] = {"origin": {"module": "m", "file": str(tmp_path / "impls" / "x.py")}}
    [inside] = annotations_for({"results": [rec]}, workspace=tmp_path)
    assert inside.file == "impls/x.py"
    [outside] = annotations_for({"results": [rec]}, workspace=tmp_path / "impls" / "other")
    assert outside.file is None


# --- the job summary and the wiring ----------------------------------------------------------------------

def test_summary_is_appended_never_overwritten_and_a_bad_path_is_one_warning(tmp_path):
    summary = tmp_path / "summary"
    summary.write_text("# an earlier step\n")
    env = {"GITHUB_STEP_SUMMARY": str(summary), "GITHUB_ACTIONS": "true"}
    out, err = io.StringIO(), io.StringIO()
    for _ in range(2):
        ci_output.publish(make_doc(), gate=_gate(), environ=env, stdout=out, stderr=err)
    text = summary.read_text()
    assert text.startswith("# an earlier step\n") and text.count("## twinbench: FAIL") == 2
    assert out.getvalue().count("::error ") == 2 * 5 and err.getvalue() == ""
    for bad in (tmp_path / "missing" / "summary", tmp_path):  # no such folder; a folder
        err = io.StringIO()
        ci_output.publish(make_doc(), environ={"GITHUB_STEP_SUMMARY": str(bad)}, stdout=out, stderr=err)
        assert err.getvalue().startswith("twinbench: warning: could not append the summary")
        assert err.getvalue().count("\n") == 1


@pytest.mark.parametrize("choice, env, style", [
    (None, {"GITHUB_ACTIONS": "true"}, "github"), (None, {}, "none"), ("none", {"GITHUB_ACTIONS": "true"}, "none"),
    ("github", {}, "github")])
def test_annotations_are_on_by_default_only_under_github_actions(choice, env, style):
    assert ci_output.annotation_style(choice, env).value == style


def test_an_unknown_annotation_style_is_a_usage_error(capsys):
    assert main(["gate", "--against", "HEAD", "--annotations", "gitlab"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'gitlab'" in err and err.count("\n") == 1


def test_gate_baseline_appends_its_summary_and_annotates_the_regression(tmp_path, monkeypatch, capsys):
    doc = make_doc(planted=False)
    ok_only = dict(doc, results=[r for r in doc["results"] if r["status"] in ("ok", "skipped")])
    atomic_write_json(tmp_path / "r.json", ok_only)
    assert main(["baseline", "save", str(tmp_path / "r.json"), "--dir", str(tmp_path / "bl")]) == 0
    atomic_write_json(tmp_path / "slow.json", slowed(ok_only, "fast", 1.6))
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "step.md"))
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    capsys.readouterr()
    assert main(["gate", str(tmp_path / "slow.json"), "--baseline", str(tmp_path / "bl")]) == 1
    out = capsys.readouterr().out
    assert "### Gate (stored baseline" in (tmp_path / "step.md").read_text()
    regressions = [ln for ln in out.splitlines() if ln.startswith("::error title=twinbench gate regression")]
    assert len(regressions) == 6  # fast: 3 cases x fwd and fwd+bwd
    assert main(["gate", str(tmp_path / "slow.json"), "--baseline", str(tmp_path / "bl"),
                 "--annotations", "none"]) == 1
    assert "::error" not in capsys.readouterr().out


def test_run_under_github_actions_writes_summary_and_annotates_its_source_file(tmp_path, monkeypatch, capsys):
    """The wiring of `run` (the real run under a GitHub environment: tests/test_workflows.py)."""
    from twinbench.harness.run import runner

    doc = make_doc(planted=False)
    for rec in doc["results"]:
        rec["meta"] = {"origin": {"module": "toy_matmul", "file": str(TOY)}}
    monkeypatch.setattr(runner, "run", lambda options: doc)
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "step.md"))
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_WORKSPACE", str(ROOT))
    assert main(["run", "matmul", "--device", "cpu", "--no-report", "--out", str(tmp_path / "r")]) == 1
    assert "## twinbench: FAIL" in (tmp_path / "step.md").read_text()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("::")]
    parsed = [parse_workflow_command(ln) for ln in lines]
    assert [p[1]["title"] for p in parsed] == [f"twinbench {what}: matmul/{impl} on cpu" for what, impl in (
        ("parity failure", "wrong_one"), ("crashed", "crashy"), ("timeout", "slowpoke"))]
    assert {p[1]["file"] for p in parsed} == {"tests/plugins/toy_matmul.py"}
    assert "err 3e-3 > bound 2e-6" in parsed[0][2]
    assert main(["run", "matmul", "--device", "cpu", "--no-report", "--out", str(tmp_path / "r2"),
                 "--annotations", "none"]) == 1
    assert "::" not in capsys.readouterr().out


# --- GitLab: junit.xml against the common JUnit schema ------------------------------------------------------

def validate_junit(text: str) -> None:
    xmlschema = pytest.importorskip("xmlschema", reason="xmlschema is in the test extra (.ci/run installs it)")
    xmlschema.XMLSchema(str(JUNIT_XSD)).validate(text)


def test_junit_with_every_status_gate_and_hostile_text_is_valid_against_the_schema():
    doc = make_doc()
    doc["results"].append(record("matmul", {"n": 8}, HOSTILE, "crashed", reason="\x1b[31mSIGSEGV\x1b[0m \x00\x07"))
    text = render_junit(doc, gate=_gate())
    validate_junit(text)
    validate_junit(render_junit({"results": []}, gate=_gate()))  # gate --against: the gate suite alone
    root = ET.fromstring(text.split("\n", 1)[1])
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("18", "2", "4")  # 17 records + 1 gate case
    [crash] = [tc for tc in root.iter("testcase") if "::evil,impl:x%41" in tc.get("name")]
    assert crash.find("error").text == "\ufffd[31mSIGSEGV\ufffd[0m \ufffd\ufffd"


def test_the_schema_check_can_fail():
    """A testsuite without its `errors` count (what the gate suite wrote before) is refused."""
    xmlschema = pytest.importorskip("xmlschema", reason="xmlschema is in the test extra (.ci/run installs it)")
    planted = render_junit({"results": []}, gate=_gate()).replace(' errors="0" skipped="0"', "")
    assert 'name="gate"' in planted and 'errors="0"' not in planted.split('name="gate"')[1]
    with pytest.raises(xmlschema.XMLSchemaValidationError):
        validate_junit(planted)
