"""Databases for the history tests: nightly results files, a fresh PostgreSQL database per test, row counts.

PostgreSQL is the real server that .ci/run starts (``TWINBENCH_TEST_POSTGRES_URL``). Without it the
PostgreSQL tests skip with the reason locally, and fail under CI (``CI=true``), where it must be there.
"""

from __future__ import annotations

import copy
import importlib
import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pytest
from reports_fixtures import make_doc
from twinbench.harness.store.results import atomic_write_json

POSTGRES_URL_VARIABLE = "TWINBENCH_TEST_POSTGRES_URL"


def nightly_files(folder: Path, n: int = 30, step_at: int | None = 20, factor: float = 1.3,
                  records: int | None = None) -> list[Path]:
    """n nightly results files; from ``step_at`` on, impl 'fast' takes ``factor`` x longer.

    ``records``: keep only the first ones (the n=64 reference, then 'fast'), for small, quick files."""
    rng = np.random.default_rng(0)
    base = make_doc(planted=False)
    base["results"] = base["results"][:records]
    paths = []
    for night in range(n):
        doc = copy.deepcopy(base)
        doc["provenance"].update(started=f"2026-11-{night % 30 + 1:02d}T{night // 30:02d}:00:00+00:00",
                                 git_sha=f"{night + 1:x}" * 8)
        for rec in doc["results"]:
            t = rec.get("timing")
            if t:
                slow = factor if step_at is not None and night >= step_at and rec["impl"] == "fast" else 1.0
                t["fwd"]["median_ms"] *= slow * float(rng.normal(1.0, 0.02))
        path = folder / f"night{night:03d}.json"
        atomic_write_json(path, doc)
        paths.append(path)
    return paths


def missing(problem: str, env: Mapping[str, str] = os.environ) -> NoReturn:
    """Skip with the reason locally; fail under CI (``CI=true``), where .ci/run installs and starts everything."""
    if env.get("CI") == "true":
        pytest.fail(f"CI=true: {problem}", pytrace=False)
    pytest.skip(problem, allow_module_level=True)


def optional_module(name: str, extra: str = "history"):
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"{name} is not installed (pip install 'twinbench[{extra}]')")


def postgres_server_url(env: Mapping[str, str] = os.environ) -> str:
    """The test server's URL; skips without one, or fails under CI, where .ci/run must have started it."""
    url = env.get(POSTGRES_URL_VARIABLE, "")
    if not url:
        missing(f"{POSTGRES_URL_VARIABLE} is not set (.ci/run starts a PostgreSQL server and sets it)", env)
    optional_module("psycopg")
    return url


@contextmanager
def fresh_postgres_database(server_url: str) -> Iterator[str]:
    """A new, empty database on the test server for one test; dropped afterwards."""
    import sqlalchemy as sa

    name = f"twinbench_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:  # NullPool: no connection stays open for a forked writer to inherit
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield sa.make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@contextmanager
def connect(db: str | Path):
    """A plain SQLAlchemy connection to a history (path or URL), to look at its tables directly."""
    import sqlalchemy as sa

    engine = sa.create_engine(str(db) if "://" in str(db) else f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def row_counts(db: str | Path) -> dict[str, Any]:
    """runs, points, distinct run keys, points without a run, and the set of points-per-run counts."""
    with connect(db) as conn:
        def one(sql: str) -> int:
            return int(conn.exec_driver_sql(sql).scalar())

        return {"runs": one("SELECT count(*) FROM runs"), "points": one("SELECT count(*) FROM points"),
                "run_keys": one("SELECT count(DISTINCT run_key) FROM runs"),
                "orphan_points": one("SELECT count(*) FROM points WHERE run_id NOT IN (SELECT id FROM runs)"),
                "points_per_run": sorted({r[0] for r in conn.exec_driver_sql(
                    "SELECT count(p.run_id) FROM runs r LEFT JOIN points p ON p.run_id = r.id GROUP BY r.id")})}


def schema_versions(db: str | Path) -> list[int]:
    with connect(db) as conn:
        return [r[0] for r in conn.exec_driver_sql("SELECT version FROM schema_version ORDER BY version")]
