"""Between-pair noise priors: `calibrate` saves them, `gate --against` reads them (or works without them)."""

from __future__ import annotations

import json

import pytest
from twinbench.harness.core.errors import UsageError
from twinbench.harness.gate import stats as gate
from twinbench.harness.gate.against import calibrated_pair_noise
from twinbench.harness.gate.stored import load_calibration

FINGERPRINT = {"id": "0123456789abcdef", "name": "cpu"}


def calibration(tmp_path, items=None, fingerprint=FINGERPRINT, name="0123456789abcdef.calibration.json"):
    doc = {"kind": "twinbench-calibration", "created": "now", "fingerprint": fingerprint,
           "against": {"threshold": 0.02, "pair_noise": {"looks": 6, "seconds": 1.0,
                                                         "items": items or {"s|c|i|fwd": 0.004}}}}
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def test_the_gate_reads_priors_saved_beside_its_fingerprint(tmp_path):
    calibration(tmp_path, {"s|c|i|fwd": 0.004, "s|d|i|fwdbwd": 0.2})
    priors, note = calibrated_pair_noise(None, FINGERPRINT, folder=tmp_path)
    assert priors == {"s|c|i|fwd": 0.004, "s|d|i|fwdbwd": 0.2} and "2 item(s)" in note
    case = {"suite": "s", "case": "d", "impl": "i", "mode": "fwdbwd"}
    assert gate.pair_sd_for(case, priors) == 0.2
    assert gate.pair_sd_for(dict(case, case="other"), priors) == gate.DEFAULT_PAIR_SD


def test_without_a_calibration_or_for_another_fingerprint_the_default_is_assumed(tmp_path):
    priors, note = calibrated_pair_noise(None, FINGERPRINT, folder=tmp_path)
    assert priors is None and "no calibration" in note and f"{gate.DEFAULT_PAIR_SD:.0%}" in note
    other = json.loads(calibration(tmp_path, fingerprint={"id": "fedcba9876543210"}, name="x.json").read_text())
    priors, note = calibrated_pair_noise(other, FINGERPRINT, path=tmp_path / "x.json")
    assert priors is None and "another fingerprint" in note


def test_a_calibration_with_a_negative_or_missing_prior_is_refused_in_one_line(tmp_path):
    path = calibration(tmp_path, {"s|c|i|fwd": -0.01})
    with pytest.raises(UsageError, match="not a twinbench calibration file") as info:
        load_calibration(path)
    assert "\n" not in str(info.value)
    doc = json.loads(path.read_text())
    doc["against"]["pair_noise"] = {"items": {}}   # no look count
    path.write_text(json.dumps(doc))
    with pytest.raises(UsageError):
        load_calibration(path)


def test_a_calibration_of_the_previous_format_still_loads(tmp_path):
    """Files saved before the priors existed (no pair_noise) are valid: the gate assumes the default."""
    path = tmp_path / "old.calibration.json"
    path.write_text(json.dumps({"kind": "twinbench-calibration", "fingerprint": FINGERPRINT,
                                "against": {"threshold": 0.02}, "baseline": {"run_to_run_noise": 0.3}}))
    priors, note = calibrated_pair_noise(load_calibration(path), FINGERPRINT, path=path)
    assert priors is None and "no between-pair sd priors" in note


def test_a_named_calibration_that_does_not_exist_is_a_usage_error(capsys, tmp_path):
    from twinbench.harness.cli.main import main

    code = main(["gate", "--against", "HEAD", "--calibration", str(tmp_path / "none.json"),
                 "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "none.json" in err[0]
    assert not (tmp_path / "g").exists()


def test_pair_looks_of_one_is_a_usage_error(capsys, tmp_path):
    from twinbench.harness.cli.main import main

    code = main(["calibrate", "--pair-looks", "1", "--json", str(tmp_path / "c.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--pair-looks" in err[0]
    assert not (tmp_path / "c.json").exists()
