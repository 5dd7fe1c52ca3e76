"""The history on PostgreSQL (a real server, started by .ci/run) and SQLite: migrations, concurrent writers.

Every test that takes ``db`` runs on both backends; the PostgreSQL half skips locally without
``TWINBENCH_TEST_POSTGRES_URL`` and fails under CI without it (tests/history_db.py).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import resource
import sqlite3
import time
from pathlib import Path

import pytest
from history_db import (
    connect,
    fresh_postgres_database,
    nightly_files,
    optional_module,
    postgres_server_url,
    row_counts,
    schema_versions,
)
from twinbench.harness.cli.main import main
from twinbench.harness.store import history
from twinbench.harness.store.results import load

sa = optional_module("sqlalchemy")
from twinbench.harness.store import history_schema  # noqa: E402  (imports sqlalchemy)

# The first version's tables exactly as it created them (before the schema version table existed).
V1_SQLITE = ("CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, run_key TEXT UNIQUE, started TEXT, "
             "git_sha TEXT, git_dirty INTEGER, command TEXT, source TEXT, added TEXT);"
             "CREATE TABLE points (run_id INTEGER, suite TEXT, case_id TEXT, impl TEXT, device TEXT, "
             "fingerprint TEXT, status TEXT, metric TEXT, value REAL);"
             "CREATE INDEX points_series ON points (suite, case_id, impl, fingerprint, metric);")
V1_POSTGRES = ("CREATE TABLE runs (id SERIAL PRIMARY KEY, run_key VARCHAR(64) UNIQUE, started VARCHAR(40), "
               "git_sha VARCHAR(64), git_dirty INTEGER, command TEXT, source TEXT, added VARCHAR(40));"
               "CREATE TABLE points (run_id INTEGER, suite TEXT, case_id TEXT, impl TEXT, device TEXT, "
               "fingerprint TEXT, status TEXT, metric TEXT, value FLOAT);"
               "CREATE INDEX ix_points_run_id ON points (run_id);")


@pytest.fixture
def pg_url():
    with fresh_postgres_database(postgres_server_url()) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    if request.param == "sqlite":
        yield str(tmp_path / "history.sqlite")
    else:
        with fresh_postgres_database(postgres_server_url()) as url:
            yield url


def _write_v1(db: str, files) -> None:
    """A first-version history holding ``files``, written the way the first version wrote it."""
    docs = [(load(f), f) for f in files]
    if "://" not in db:
        conn = sqlite3.connect(db)
        conn.executescript(V1_SQLITE)
        for doc, f in docs:
            run = history.run_row(doc, f)
            run_id = conn.execute(f"INSERT INTO runs ({', '.join(run)}) VALUES ({', '.join('?' * len(run))})",
                                  list(run.values())).lastrowid
            conn.executemany("INSERT INTO points VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             [[run_id, *p.values()] for p in history.point_rows(doc)])
        conn.commit()
        conn.close()
        return
    with connect(db) as conn:
        for statement in V1_POSTGRES.split(";")[:-1]:
            conn.exec_driver_sql(statement)
        for doc, f in docs:
            run_id = conn.execute(history_schema.runs.insert().values(**history.run_row(doc, f))
                                  .returning(history_schema.runs.c.id)).scalar()
            conn.execute(history_schema.points.insert(), [dict(p, run_id=run_id) for p in history.point_rows(doc)])
        conn.commit()


def test_a_fresh_history_gets_every_migration_once(db, tmp_path):
    [f] = nightly_files(tmp_path, n=1, records=2)
    assert history.add(db, f)
    assert schema_versions(db) == [1, 2]
    assert history.add(db, f) is False  # opening again applies nothing and the run is there already
    assert schema_versions(db) == [1, 2]
    with connect(db) as conn:
        indexes = {i["name"] for i in sa.inspect(conn).get_indexes("points")}
    assert {"ix_points_run_id", "points_series"} <= indexes


def test_a_first_version_history_migrates_and_keeps_its_rows(db, tmp_path):
    files = nightly_files(tmp_path, n=6, step_at=None, records=2)
    _write_v1(db, files[:5])
    before = row_counts(db)
    assert before["runs"] == 5 and before["points"] > 0
    assert [history.add(db, f) for f in files] == [False] * 5 + [True]  # the old run keys still count
    assert schema_versions(db) == [1, 2]
    after = row_counts(db)
    assert after["runs"] == 6 and after["points"] == before["points"] * 6 // 5
    with connect(db) as conn:
        assert conn.exec_driver_sql("SELECT description FROM schema_version WHERE version = 1").scalar() \
            == "first version, found without a version table"
    assert len(history.series(db, metric="fwd_median_ms")[0]["points"]) == 6


def test_a_newer_schema_is_refused_with_one_line_and_nothing_written(db, tmp_path, capsys):
    first, second = nightly_files(tmp_path, n=2, records=2)
    assert history.add(db, first)
    with connect(db) as conn:
        conn.execute(history_schema.schema_version.insert().values(version=3, description="from the future",
                                                                   applied="2027-01-01T00:00:00+00:00"))
        conn.commit()
    assert main(["history", "add", str(second), "--db", db]) == 2
    assert main(["history", "show", "--db", db]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("schema version 3, newer than this twinbench knows (2)" in line for line in err)
    assert row_counts(db)["runs"] == 1 and schema_versions(db) == [1, 2, 3]


def test_migrations_run_in_order_once_each_and_a_failing_one_changes_nothing(db, tmp_path):
    history.open_store(db).close()
    applied = []

    def planted(version):
        def apply(conn):
            applied.append(version)
            conn.execute(sa.text(f"CREATE TABLE planted_{version} (x INTEGER)"))
        return history_schema.Migration(version, f"planted {version}", apply)

    def broken(conn):
        conn.execute(sa.text("CREATE TABLE planted_broken (x INTEGER)"))
        conn.execute(sa.text("INSERT INTO runs (run_key) VALUES ('half-done')"))
        raise RuntimeError("planted failure halfway through a migration")

    more = history_schema.MIGRATIONS + (planted(3), planted(4))
    engine, name = history._engine(db)
    try:
        assert history_schema.migrate(engine, name, migrations=more) == 4
        assert history_schema.migrate(engine, name, migrations=more) == 4
        assert applied == [3, 4]
        with pytest.raises(RuntimeError, match="planted failure"):
            history_schema.migrate(engine, name, migrations=more + (history_schema.Migration(5, "broken", broken),))
        with engine.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
        assert {"planted_3", "planted_4"} <= tables and "planted_broken" not in tables
        assert schema_versions(db) == [1, 2, 3, 4] and row_counts(db)["runs"] == 0
        with pytest.raises(AssertionError, match="numbered"):
            history_schema.migrate(engine, name, migrations=(planted(2),))
    finally:
        engine.dispose()


WRITERS, FILES_PER_WRITER, SHARED = 8, 20, 5


def _writer(db: str, files: list, start, out: Path) -> None:
    start.wait(timeout=120)  # every writer begins at the same moment
    out.write_text(json.dumps([history.add(db, f) for f in files]))


def test_concurrent_writers_lose_nothing_and_double_nothing(db, tmp_path):
    """8 processes add 20 results files each at the same time: 5 files every one of them adds first (the
    same run keys, raced), 15 of its own. Fresh database, so they also race through the migrations.

    Forked after the imports, so the time goes into the adds rather than 8 interpreters starting."""
    files = nightly_files(tmp_path, n=SHARED + WRITERS * (FILES_PER_WRITER - SHARED), step_at=None, records=2)
    shared, own = files[:SHARED], files[SHARED:]
    per_run = len(history.point_rows(load(files[0])))
    fork = multiprocessing.get_context("fork")
    start, outs = fork.Barrier(WRITERS), [tmp_path / f"writer{w}.json" for w in range(WRITERS)]
    procs = [fork.Process(target=_writer, args=(db, shared + own[w::WRITERS], start, outs[w]))
             for w in range(WRITERS)]
    cpu0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=240)
    finally:
        for p in procs:
            if p.is_alive():  # a writer stuck past the limit: the test fails, the process does not linger
                p.kill()
    wall, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
    assert [p.exitcode for p in procs] == [0] * WRITERS
    added = [flag for out in outs for flag in json.loads(out.read_text())]
    counts = row_counts(db)
    print(f"\nconcurrent writers on {db.split(':')[0] if '://' in db else 'sqlite'}: {WRITERS} processes x "
          f"{FILES_PER_WRITER} files, {counts['runs']} runs, {counts['points']} points, {wall:.1f} s wall, "
          f"{cpu:.1f} s writer CPU, load {os.getloadavg()[0]:.1f}")
    assert len(added) == WRITERS * FILES_PER_WRITER
    assert sum(added) == len(files) and added.count(False) == (WRITERS - 1) * SHARED
    assert counts == {"runs": len(files), "points": len(files) * per_run, "run_keys": len(files),
                      "orphan_points": 0, "points_per_run": [per_run]}
    assert schema_versions(db) == [1, 2]


def test_the_row_check_sees_a_doubled_or_lost_run(tmp_path):
    """The concurrency test's counts can fail: a run stored twice (another key, same points) or lost."""
    files = nightly_files(tmp_path, n=3, step_at=None, records=2)
    db = str(tmp_path / "h.sqlite")
    for f in files:
        history.add(db, f)
    good = row_counts(db)
    with connect(db) as conn:
        conn.exec_driver_sql("INSERT INTO runs (run_key) VALUES ('doubled')")
        conn.exec_driver_sql("INSERT INTO points SELECT (SELECT max(id) FROM runs), suite, case_id, impl, device, "
                             "fingerprint, status, metric, value FROM points WHERE run_id = 1")
        conn.commit()
    doubled = row_counts(db)
    assert doubled["runs"] == good["runs"] + 1 and doubled["points_per_run"] == good["points_per_run"]
    with connect(db) as conn:
        conn.exec_driver_sql("DELETE FROM runs WHERE id = 2")
        conn.commit()
    lost = row_counts(db)
    assert lost["orphan_points"] == good["points"] // 3 and lost != good


def test_show_and_trends_read_the_same_from_sqlite_and_postgresql(pg_url, tmp_path, capsys):
    files = nightly_files(tmp_path, n=16, step_at=8, factor=1.5, records=2)
    sqlite_db = str(tmp_path / "h.sqlite")
    for f in files:
        assert history.add(sqlite_db, f) and history.add(pg_url, f)
    shown = []
    for db in (sqlite_db, pg_url):
        assert main(["history", "show", "--db", db, "--suite", "matmul"]) == 0
        assert main(["history", "show", "--db", db, "--json"]) == 0
        shown.append(capsys.readouterr().out)
    assert shown[0] == shown[1] and re.search(r"run 9 \(\w+\) \+(4\d|5\d)\.\d%", shown[0]), shown
    doc = load(files[-1])
    from_sqlite, from_pg = history.trends(sqlite_db, doc), history.trends(pg_url, doc)
    assert from_sqlite["series"] == from_pg["series"] and any(s["change_points"] for s in from_pg["series"])
    assert from_pg["db"] == history.display_name(pg_url)  # the report shows the URL without its password
    assert main(["history", "show", "--db", pg_url, "--suite", "no-such-suite"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("no fwd_median_ms points in postgresql")
    password = sa.make_url(pg_url).password
    assert not password or (password not in out and password not in from_pg["db"])


def test_a_url_password_is_never_printed_and_a_dead_server_is_exit_2(tmp_path, capsys):
    [f] = nightly_files(tmp_path, n=1, records=2)
    url = "postgresql+psycopg://nightly:s3cret@127.0.0.1:1/history"  # nothing listens on port 1
    assert main(["history", "add", str(f), "--db", url]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "127.0.0.1:1" in err and "s3cret" not in err
    assert history.display_name(url) == "postgresql+psycopg://nightly:***@127.0.0.1:1/history"
    assert main(["history", "add", str(f), "--db", "mysql://u@h/db"]) == 2
    assert "only SQLite" in capsys.readouterr().err


def test_without_a_server_url_postgres_tests_skip_locally_and_fail_under_ci():
    with pytest.raises(pytest.skip.Exception, match="TWINBENCH_TEST_POSTGRES_URL is not set"):
        postgres_server_url({})
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        postgres_server_url({"CI": "true"})
    assert postgres_server_url({"TWINBENCH_TEST_POSTGRES_URL": "postgresql://x"}) == "postgresql://x"
