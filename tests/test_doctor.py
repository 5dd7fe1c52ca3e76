"""`twinbench doctor`: every check runs on the CPU and passes here; a planted non-linear timer and a worker
that aborts mid-run make it exit 1 with the reason; usage errors exit 2 and write nothing."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
from twinbench.harness.cli.main import main
from twinbench.harness.doctor import checks, runner


def _strict_load(path):
    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_the_supervisor_knows_every_check():
    assert runner.CHECK_NAMES == checks.CHECK_NAMES


def test_doctor_passes_on_this_cpu(tmp_path, capsys):
    assert main(["doctor", "--device", "cpu", "--out", str(tmp_path)]) == 0, capsys.readouterr().out
    doc = _strict_load(tmp_path / "doctor.json")
    assert doc["schema"] == "twinbench-doctor/1" and doc["ok"]
    (device,) = doc["devices"]
    by_name = {c["name"]: c for c in device["checks"]}
    assert tuple(by_name) == checks.CHECK_NAMES
    assert all(c["status"] in ("pass", "warn", "skip") for c in by_name.values()), by_name
    # every check that applies to a CPU ran (clocks may be unreadable in a container: then "not available")
    for name in ("timer_resolution", "timer_linearity", "dtype_support", "ceilings", "parity_self_test"):
        assert by_name[name]["status"] in ("pass", "warn"), by_name[name]
    assert by_name["events_vs_wall"]["status"] == "skip" and by_name["l2_flush"]["status"] == "skip"
    self_test = by_name["parity_self_test"]["measured"]
    assert self_test["correct"]["passed"] and not any(v["passed"] for k, v in self_test.items() if k != "correct")
    assert (tmp_path / device["log"]).is_file()
    assert "timer_linearity" in capsys.readouterr().out  # the table


PLANT = """
    import os
    import twinbench.harness.core.timing as timing
    import twinbench.harness.doctor.checks as checks

    real_block = timing.Timer.block

    def sublinear_block(self, fn, number):  # planted: per-call time shrinks as the block grows
        return real_block(self, fn, number) / number ** 0.5

    def clock_drift(ctx):  # planted: the device dies during the last check
        os.abort()

    timing.Timer.block = sublinear_block
    checks.CHECKS = (*checks.CHECKS[:-1], clock_drift)
"""


def test_a_planted_nonlinear_timer_and_a_dying_worker_exit_1(tmp_path, monkeypatch):
    plant = tmp_path / "plant"
    plant.mkdir()
    (plant / "sitecustomize.py").write_text(textwrap.dedent(PLANT))  # imported at the worker's start-up only
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(plant), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "out"
    assert main(["doctor", "--device", "cpu", "--out", str(out)]) == 1
    doc = _strict_load(out / "doctor.json")
    assert not doc["ok"]
    by_name = {c["name"]: c for c in doc["devices"][0]["checks"]}
    assert set(by_name) == set(checks.CHECK_NAMES)
    assert by_name["timer_linearity"]["status"] == "fail", by_name["timer_linearity"]
    assert by_name["clock_drift"]["status"] == "fail" and "SIGABRT" in by_name["clock_drift"]["why"]
    assert by_name["parity_self_test"]["status"] == "pass"  # the checks before the death were kept


def test_a_parity_engine_that_passes_everything_fails_its_self_test(monkeypatch):
    from twinbench.harness.core.devices import find
    from twinbench.harness.core.parity import ParityVerdict

    monkeypatch.setattr(checks, "check_parity", lambda *a, **k: ParityVerdict(ok=True, trials=1))
    result = checks.parity_self_test(checks.make_context(find("cpu")))
    assert result.status is checks.Status.FAIL and "planted_transposed passed" in result.why


@pytest.mark.parametrize("argv, needle", [
    (["doctor", "--device", "nope"], "no device 'nope'"),
    (["doctor", "--threads", "0"], "--threads"),
])
def test_usage_errors_exit_2_and_write_nothing(argv, needle, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_out_must_be_a_folder(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("keep")
    assert main(["doctor", "--device", "cpu", "--out", str(target)]) == 2
    assert target.read_text() == "keep"


def test_non_finite_measurements_become_null():
    check = checks.Check("x", checks.Status.PASS, {"a": float("nan"), "b": [float("inf"), 1.0]}, "", "")
    assert json.dumps(check.to_json(), allow_nan=False) and check.to_json()["measured"] == {"a": None, "b": [None, 1.0]}
