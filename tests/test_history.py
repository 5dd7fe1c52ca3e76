"""Nightly history: runs into SQLite (or a SQLAlchemy URL), change points with Apache Otava, trends in the report."""

from __future__ import annotations

import re

import pytest
from history_db import nightly_files
from twinbench.harness.cli.main import main
from twinbench.harness.store import history
from twinbench.reports.html import render_html


def test_a_step_is_found_where_it_happened_and_nowhere_else(tmp_path):
    db = tmp_path / "h.sqlite"
    for p in nightly_files(tmp_path):
        assert history.add(db, p)
    found = history.series(db, metric="fwd_median_ms")
    assert len(found) == 7  # 3 cases x (reference, fast) + the n=512 reference
    changed = {(s["impl"], s["case"]): s["change_points"] for s in found if s["change_points"]}
    assert set(changed) == {("fast", c) for c in ("n=64,dtype=fp32", "n=128,dtype=fp32", "n=256,dtype=fp32")}
    for cps in changed.values():
        [cp] = cps
        assert cp["index"] == 20 and 20 < cp["change_pct"] < 40 and cp["pvalue"] < 0.001


def test_a_flat_history_has_no_change_point(tmp_path):
    db = tmp_path / "h.sqlite"
    for p in nightly_files(tmp_path, n=25, step_at=None):
        history.add(db, p)
    assert all(not s["change_points"] for s in history.series(db, metric="fwd_median_ms"))


def test_the_same_run_is_added_once(tmp_path, capsys):
    [p] = nightly_files(tmp_path, n=1)
    db = tmp_path / "h.sqlite"
    assert main(["history", "add", str(p), "--db", str(db)]) == 0
    assert main(["history", "add", str(p), "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "added" in out and "already in the history" in out
    assert len(history.series(db, metric="fwd_median_ms")[0]["points"]) == 1


def test_a_database_url_goes_through_sqlalchemy(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'via_url.sqlite'}"
    for p in nightly_files(tmp_path, n=24, step_at=12, factor=1.5):
        history.add(url, p)
    assert main(["history", "show", "--db", url, "--suite", "matmul"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"run 13 \(\w+\) \+(4\d|5\d)\.\d%", out), out


def test_the_report_shows_trends_and_change_points(tmp_path):
    db = tmp_path / "h.sqlite"
    paths = nightly_files(tmp_path)
    for p in paths:
        history.add(db, p)
    from twinbench.harness.store.results import load

    doc = load(paths[-1])
    text = render_html(doc, trends=history.trends(db, doc))
    assert 'data-kind="trends"' in text and "Change points in the nightly history" in text


def test_history_show_of_a_missing_database_is_exit_2(tmp_path, capsys):
    assert main(["history", "show", "--db", str(tmp_path / "none.sqlite")]) == 2
    assert "history database not found" in capsys.readouterr().err
    assert not (tmp_path / "none.sqlite").exists()


@pytest.mark.parametrize("values,expected", [([1.0] * 3, []), ([1.0, 1.0, 1.0, 1.0], [])])
def test_short_or_constant_series_do_not_crash(values, expected):
    assert history.change_points(values) == expected
