"""Hostile results files and careless command lines: one line on stderr, exit 2, nothing written.

Every refusal test carries its own control: the same command with the hostile part removed succeeds
(and writes), so a refusal that came from somewhere else, or a check that refuses everything, fails.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
from reports_fixtures import FP, make_doc
from twinbench.harness.cli.main import build_parser, main
from twinbench.harness.core.errors import UsageError
from twinbench.harness.store import baseline, history, results
from twinbench.harness.store.results import FINGERPRINT_ID_PATTERN, Output, atomic_write_json, check_outputs


def _ok_doc() -> dict:
    doc = make_doc(planted=False)
    return dict(doc, results=[r for r in doc["results"] if r["status"] in ("ok", "skipped")])


def _write_raw(path: Path, doc: dict) -> Path:
    """As a careless or hostile tool would: Python's default json, NaN and Infinity included, no checks."""
    path.write_text(json.dumps(doc))
    return path


def _with_fingerprint_id(doc: dict, fp_id: str) -> dict:
    doc = copy.deepcopy(doc)
    fp = doc["fingerprints"].pop(FP)
    doc["fingerprints"][fp_id] = dict(fp, id=fp_id)
    doc["ceilings"] = {fp_id: doc["ceilings"].pop(FP)}
    for rec in doc["results"]:
        rec["fingerprint"] = fp_id
    return doc


def _one_line_exit_2(argv: list[str], capsys, needle: str) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert needle in captured.err, captured.err
    assert captured.err.count("\n") == 1, captured.err
    return captured.out


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 1. a fingerprint id names a file: it must be an id and stay in --dir -----------------------------

def test_fingerprint_ids_everywhere_follow_the_way_devices_make_them():
    from twinbench.harness.core import devices

    for schema in (results.SCHEMA_PATH, baseline.SCHEMA_PATH):
        assert FINGERPRINT_ID_PATTERN in schema.read_text(), schema
    import re

    real = devices.fingerprint(devices.find("cpu"))["id"]
    assert re.fullmatch(FINGERPRINT_ID_PATTERN, real)
    assert re.fullmatch(FINGERPRINT_ID_PATTERN, FP)


@pytest.mark.parametrize("hostile", ["../../escaped", "/ABSOLUTE/escaped", "0000000000c0ffee/../../x"])
@pytest.mark.parametrize("replace", [False, True])
def test_baseline_save_never_writes_where_a_results_file_says(tmp_path, capsys, hostile, replace):
    hostile = hostile.replace("/ABSOLUTE", str(tmp_path / "abs"))
    src = _write_raw(tmp_path / "hostile.json", _with_fingerprint_id(_ok_doc(), hostile))
    argv = ["baseline", "save", str(src), "--dir", str(tmp_path / "bl" / "a" / "b"), *(["--replace"] * replace)]
    _one_line_exit_2(argv, capsys, "fingerprints")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["hostile.json"]
    # control: the same document with a real id is saved, inside --dir
    good = _write_raw(tmp_path / "good.json", _ok_doc())
    assert main(["baseline", "save", str(good), "--dir", str(tmp_path / "bl" / "a" / "b"), *(["--replace"] * replace)]) == 0
    assert (tmp_path / "bl" / "a" / "b" / f"{FP}.json").exists()


def test_a_document_that_skipped_validation_is_still_confined(tmp_path):
    doc = _with_fingerprint_id(_ok_doc(), "../escaped")
    with pytest.raises(UsageError, match="not a twinbench fingerprint id"):
        baseline.plan_save(doc, tmp_path / "bl")
    with pytest.raises(UsageError, match="outside"):
        results.confined(tmp_path / "bl", "../escaped.json", "baseline file")
    assert results.confined(tmp_path / "bl", f"{FP}.json", "baseline file") == tmp_path / "bl" / f"{FP}.json"
    [(path, _)] = baseline.plan_save(_ok_doc(), tmp_path / "bl")  # control
    assert path == tmp_path / "bl" / f"{FP}.json" and not path.exists()


def test_a_fingerprint_key_that_is_not_its_id_is_refused(tmp_path, capsys):
    doc = _ok_doc()
    doc["fingerprints"][FP]["id"] = "ffffffffffffffff"
    src = _write_raw(tmp_path / "r.json", doc)
    _one_line_exit_2(["baseline", "save", str(src), "--dir", str(tmp_path / "bl")], capsys, "its id is")
    assert not (tmp_path / "bl").exists()


# --- 4. non-finite timings never reach a baseline; every JSON written is strict ------------------------

@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_samples_are_refused_and_the_baseline_is_untouched(tmp_path, capsys, bad):
    good = _write_raw(tmp_path / "good.json", _ok_doc())
    assert main(["baseline", "save", str(good), "--dir", str(tmp_path / "bl")]) == 0
    before = _tree(tmp_path / "bl")
    doc = _ok_doc()
    timed = next(r for r in doc["results"] if r["impl"] == "fast")
    timed["timing"]["fwd"]["samples_ms"][3] = bad
    src = _write_raw(tmp_path / "poison.json", doc)
    assert ("NaN" if math.isnan(bad) else "Infinity") in src.read_text()
    for replace in ([], ["--replace"]):
        _one_line_exit_2(["baseline", "save", str(src), "--dir", str(tmp_path / "bl"), *replace], capsys,
                         "non-finite timing")
        assert _tree(tmp_path / "bl") == before
    _one_line_exit_2(["gate", str(src), "--baseline", str(tmp_path / "bl")], capsys, "non-finite timing")
    assert main(["gate", str(good), "--baseline", str(tmp_path / "bl")]) == 0  # control: the folder still gates


def test_a_baseline_holding_nan_is_refused_in_one_line(tmp_path, capsys):
    good = _write_raw(tmp_path / "good.json", _ok_doc())
    assert main(["baseline", "save", str(good), "--dir", str(tmp_path / "bl")]) == 0
    path = tmp_path / "bl" / f"{FP}.json"
    data = json.loads(path.read_text())
    data["entries"][0]["samples_ms"][0] = math.nan
    path.write_text(json.dumps(data))
    _one_line_exit_2(["gate", str(good), "--baseline", str(tmp_path / "bl")], capsys, "non-finite timing")


def _strict_loads(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def test_the_json_writer_is_strict(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"error": math.nan, "ratio": math.inf, "list": [1.0, -math.inf],
                                            "ok": 0.5})
    assert _strict_loads((tmp_path / "x.json").read_text()) == {"error": None, "ratio": None,
                                                                 "list": [1.0, None], "ok": 0.5}
    with pytest.raises(ValueError):  # the baseline writer refuses rather than write NaN
        baseline.dumps({"kind": baseline.KIND, "entries": [{"suite": "s", "case": "c", "impl": "i",
                                                            "mode": "fwd", "median_ms": math.nan}]})


def test_history_show_json_is_strict(tmp_path, capsys):
    src = tmp_path / "r.json"
    atomic_write_json(src, _ok_doc())
    db = tmp_path / "h.sqlite"
    assert main(["history", "add", str(src), "--db", str(db)]) == 0
    capsys.readouterr()
    assert main(["history", "show", "--db", str(db), "--json"]) == 0
    assert _strict_loads(capsys.readouterr().out)


# --- 8 and 9. unwritable, clashing or input outputs: checked before the first write ---------------------

@pytest.fixture
def saved(tmp_path):
    src = tmp_path / "r.json"
    atomic_write_json(src, _ok_doc())
    assert main(["baseline", "save", str(src), "--dir", str(tmp_path / "bl")]) == 0
    (tmp_path / "afile").write_text("not a folder\n")
    return tmp_path, src


def _unwritable(tmp: Path) -> dict[str, Path]:
    return {"under a file": tmp / "afile" / "sub", "a file": tmp / "afile", "in /proc": Path("/proc/twinbench-x/y")}


@pytest.mark.parametrize("kind", ["under a file", "a file", "in /proc"])
def test_every_command_refuses_an_unwritable_output_in_one_line(saved, capsys, kind):
    tmp, src = saved
    bad = _unwritable(tmp)[kind]
    before = _tree(tmp)
    commands = [
        ["run", "attention", "--device", "cpu", "--out", str(bad)],
        ["report", str(src), "--out", str(bad / "r.html") if kind != "a file" else str(tmp)],
        ["report", str(src), "--out", str(tmp / "ok.html"), "--markdown", str(bad / "s.md")],
        ["baseline", "save", str(src), "--dir", str(bad)],
        ["history", "add", str(src), "--db", str(bad / "h.sqlite")],
        ["calibrate", "--json", str(bad / "c.json")],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, (argv, err)
        assert _tree(tmp) == before, argv
    out = _one_line_exit_2(["gate", str(src), "--baseline", str(tmp / "bl"), "--out", str(bad)], capsys, "--out")
    assert "PASS" not in out and _tree(tmp) == before
    # control: a writable --out gates and writes
    assert main(["gate", str(src), "--baseline", str(tmp / "bl"), "--out", str(tmp / "g")]) == 0
    assert (tmp / "g" / "gate.json").exists()


def test_report_never_overwrites_its_input(saved, capsys):
    tmp, src = saved
    before = src.read_bytes()
    _one_line_exit_2(["report", str(src), "--out", str(src)], capsys, "one of the inputs")
    _one_line_exit_2(["report", str(src), "--out", str(tmp / "r.html"), "--csv", str(src)], capsys,
                     "one of the inputs")
    _one_line_exit_2(["report", str(src), "--out", str(tmp / "r.html"), "--markdown", str(tmp / "r.html")], capsys,
                     "give each output its own path")
    assert src.read_bytes() == before and not (tmp / "r.html").exists()
    assert main(["report", str(src), "--out", str(tmp / "r.html")]) == 0  # control
    assert (tmp / "r.html").exists()


def test_a_run_folder_with_someone_elses_results_is_refused(saved, capsys):
    tmp, src = saved
    theirs = tmp / "theirs"
    theirs.mkdir()
    (theirs / "results.json").write_bytes(src.read_bytes())
    before = _tree(theirs)
    for resume in ([], ["--resume"]):
        _one_line_exit_2(["run", "attention", "--device", "cpu", "--out", str(theirs), *resume], capsys,
                         "holds a results.json")
        assert _tree(theirs) == before
    from twinbench.harness.cli.main import _check_run_folder

    (theirs / "journal.jsonl").write_text("")  # control: our own run's folder (it has the journal) is accepted
    _check_run_folder(theirs, report=True)


def test_check_outputs_accepts_fresh_paths_and_leaves_nothing_behind(tmp_path):
    check_outputs([Output("--out", tmp_path / "new" / "deeper", folder=True),
                   Output("--out", tmp_path / "new" / "deeper" / "a.json")], inputs=[])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UsageError, match="is a folder"):
        check_outputs([Output("--out", tmp_path)])


# --- 10. every numeric option is validated at parsing ------------------------------------------------

NUMERIC = [
    (["run", "attention"], "--timeout", ["0", "-5", "nan", "inf"]),
    (["run", "attention"], "--threads", ["-1", "0", "1.5"]),
    (["run", "attention"], "--memory-limit-gb", ["-1", "0"]),
    (["run", "attention"], "--budget", ["0", "-1"]),
    (["run", "attention"], "--trials", ["0"]),
    (["run", "attention"], "--seed", ["-1"]),
    (["run", "attention"], "--rounds", ["3"]),
    (["gate", "--against", "HEAD"], "--threshold", ["-0.1"]),
    (["gate", "--against", "HEAD"], "--k", ["-1"]),
    (["gate", "--against", "HEAD"], "--alpha", ["0", "1", "1.5"]),
    (["gate", "--against", "HEAD"], "--rounds", ["6"]),
    (["gate", "--against", "HEAD"], "--block-ms", ["0"]),
    (["gate", "--against", "HEAD"], "--threads", ["0"]),
    (["gate", "--against", "HEAD"], "--timeout", ["-3"]),
    (["calibrate"], "--comparisons", ["0"]),
    (["calibrate"], "--power-comparisons", ["-2"]),
    (["calibrate"], "--max-cases", ["-1", "x"]),  # 0 is valid: the whole profile
    (["history", "show"], "--window", ["0"]),
    (["history", "show"], "--max-pvalue", ["0", "2"]),
    (["history", "show"], "--min-magnitude", ["-0.5"]),
]


@pytest.mark.parametrize("argv,option,values", NUMERIC, ids=[f"{a[0]}{o}" for a, o, _ in NUMERIC])
def test_bad_numbers_are_one_line_and_exit_2(argv, option, values, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for value in values:
        _one_line_exit_2([*argv, f"{option}={value}"], capsys, f"argument {option}:")
    assert list(tmp_path.iterdir()) == []


def test_every_numeric_option_has_a_checked_type():
    """Each option taking a number uses one of harness.cli.arguments' type functions, none plain int/float."""
    from twinbench.harness.cli import arguments

    def walk(parser):
        for action in parser._actions:
            if action.choices and isinstance(action.choices, dict):
                for sub in action.choices.values():
                    yield from walk(sub)
            else:
                yield action
    plain = [a.option_strings for a in walk(build_parser()) if a.type in (int, float)]
    assert plain == []
    checked = {a.option_strings[0] for a in walk(build_parser()) if getattr(a.type, "__module__", "") == arguments.__name__}
    assert {o for _, o, _ in NUMERIC} <= checked
    # control: good values parse
    args = build_parser().parse_args(["run", "--timeout", "0.5", "--threads", "2", "--memory-limit-gb", "4",
                                      "--seed", "0", "--rounds", "7"])
    assert (args.timeout, args.threads, args.memory_limit_gb, args.seed, args.rounds) == (0.5, 2, 4.0, 0, 7)


# --- 15. history: the same content once, an edited copy is another run --------------------------------

def test_history_dedups_on_content_not_provenance(tmp_path, capsys):
    real = tmp_path / "real.json"
    atomic_write_json(real, _ok_doc())
    edited_doc = _ok_doc()
    next(r for r in edited_doc["results"] if r["impl"] == "fast")["timing"]["fwd"]["median_ms"] *= 0.5
    edited = tmp_path / "edited.json"
    atomic_write_json(edited, edited_doc)
    reordered_doc = _ok_doc()
    reordered_doc["results"].reverse()
    reordered_doc["provenance"]["command"] = "twinbench run --something-else"
    reordered = tmp_path / "reordered.json"
    atomic_write_json(reordered, reordered_doc)
    db = tmp_path / "h.sqlite"
    for path in (edited, real, real, reordered):
        assert main(["history", "add", str(path), "--db", str(db)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [("skipped" in ln) for ln in lines] == [False, False, True, True], lines
    assert history.run_key(_ok_doc()) != history.run_key(edited_doc)
