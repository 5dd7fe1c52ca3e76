"""Nightly history: results appended to a database, change points per (suite, case, impl, fingerprint).

The store is SQLite through the standard library by default (a file path); a database URL
(``postgresql://...``, ``sqlite:///...``) goes through SQLAlchemy Core instead. Change points come
from Apache Otava's E-divisive with the Hunter merge step (``otava.series.Series.analyze``, offline),
docs/method.md §4: window 50, p < 0.001, a minimum relative magnitude.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections import defaultdict
from pathlib import Path
from typing import Any

from twinbench.harness.core.errors import UsageError
from twinbench.harness.store.results import dumps_strict, now_iso, to_long_rows

POINT_COLUMNS = ("run_id", "suite", "case_id", "impl", "device", "fingerprint", "status", "metric", "value")
RUN_COLUMNS = ("run_key", "started", "git_sha", "git_dirty", "command", "source", "added")
TREND_METRICS = ("fwd_median_ms", "fwdbwd_median_ms")


class _Sqlite:
    def __init__(self, path: str):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(path)
            self.conn.executescript(
                "CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY AUTOINCREMENT, run_key TEXT UNIQUE, "
                "started TEXT, git_sha TEXT, git_dirty INTEGER, command TEXT, source TEXT, added TEXT);"
                "CREATE TABLE IF NOT EXISTS points (run_id INTEGER, suite TEXT, case_id TEXT, impl TEXT, "
                "device TEXT, fingerprint TEXT, status TEXT, metric TEXT, value REAL);"
                "CREATE INDEX IF NOT EXISTS points_series ON points (suite, case_id, impl, fingerprint, metric);")
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"history database {path}: {exc}") from None

    def has_run(self, key: str) -> bool:
        return self.conn.execute("SELECT 1 FROM runs WHERE run_key = ?", (key,)).fetchone() is not None

    def add(self, run: dict[str, Any], points: list[dict[str, Any]]) -> None:
        with self.conn:  # one transaction: a run is stored whole or not at all
            cur = self.conn.execute(f"INSERT INTO runs ({', '.join(RUN_COLUMNS)}) VALUES ({', '.join('?' * len(RUN_COLUMNS))})",
                                    [run[c] for c in RUN_COLUMNS])
            rows = [[cur.lastrowid, *[p[c] for c in POINT_COLUMNS[1:]]] for p in points]
            self.conn.executemany(f"INSERT INTO points ({', '.join(POINT_COLUMNS)}) VALUES "
                                  f"({', '.join('?' * len(POINT_COLUMNS))})", rows)

    def points(self, metric: str | None, suite: str | None) -> list[dict[str, Any]]:
        sql = ("SELECT p.suite, p.case_id, p.impl, p.device, p.fingerprint, p.status, p.metric, p.value, "
               "r.started, r.git_sha, r.id FROM points p JOIN runs r ON p.run_id = r.id WHERE 1 = 1")
        args: list[Any] = []
        if metric:
            sql += " AND p.metric = ?"
            args.append(metric)
        if suite:
            sql += " AND p.suite = ?"
            args.append(suite)
        cols = ("suite", "case", "impl", "device", "fingerprint", "status", "metric", "value", "time", "git_sha", "run")
        return [dict(zip(cols, row)) for row in self.conn.execute(sql + " ORDER BY r.started, r.id", args)]

    def close(self) -> None:
        self.conn.close()


class _SqlAlchemy:
    """The same tables through SQLAlchemy Core, for PostgreSQL or any other URL."""

    def __init__(self, url: str):
        import sqlalchemy as sa

        self.sa = sa
        try:
            self.engine = sa.create_engine(url)
        except Exception as exc:
            raise UsageError(f"history database URL {url!r}: {exc}") from None
        meta = sa.MetaData()
        self.runs = sa.Table("runs", meta, sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                             sa.Column("run_key", sa.String(64), unique=True), sa.Column("started", sa.String(40)),
                             sa.Column("git_sha", sa.String(64)), sa.Column("git_dirty", sa.Integer),
                             sa.Column("command", sa.Text), sa.Column("source", sa.Text), sa.Column("added", sa.String(40)))
        self.pts = sa.Table("points", meta, sa.Column("run_id", sa.Integer, index=True),
                            *[sa.Column(c, sa.Text) for c in POINT_COLUMNS[1:-1]], sa.Column("value", sa.Float))
        try:
            meta.create_all(self.engine)
        except Exception as exc:
            raise UsageError(f"history database {url!r}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None

    def has_run(self, key: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(self.sa.select(self.runs.c.id).where(self.runs.c.run_key == key)).first() is not None

    def add(self, run: dict[str, Any], points: list[dict[str, Any]]) -> None:
        with self.engine.begin() as conn:
            run_id = conn.execute(self.runs.insert().values(**run)).inserted_primary_key[0]
            if points:
                conn.execute(self.pts.insert(), [dict(p, run_id=run_id) for p in points])

    def points(self, metric: str | None, suite: str | None) -> list[dict[str, Any]]:
        p, r = self.pts, self.runs
        q = self.sa.select(p.c.suite, p.c.case_id, p.c.impl, p.c.device, p.c.fingerprint, p.c.status, p.c.metric,
                           p.c.value, r.c.started, r.c.git_sha, r.c.id).join(r, p.c.run_id == r.c.id)
        if metric:
            q = q.where(p.c.metric == metric)
        if suite:
            q = q.where(p.c.suite == suite)
        cols = ("suite", "case", "impl", "device", "fingerprint", "status", "metric", "value", "time", "git_sha", "run")
        with self.engine.connect() as conn:
            return [dict(zip(cols, row)) for row in conn.execute(q.order_by(r.c.started, r.c.id))]

    def close(self) -> None:
        self.engine.dispose()


def open_store(db: str | Path):
    text = str(db)
    return _SqlAlchemy(text) if "://" in text else _Sqlite(text)


def run_key(doc: dict[str, Any]) -> str:
    """What makes a run "already in the history": its records' content, not its provenance.

    A sha256 of the records' canonical JSON (keys sorted, records in sorted order): the same file added
    twice is one run, while an edited copy with the same provenance is another and does not hide the real one.
    """
    canonical = sorted(dumps_strict(rec, indent=None, sort_keys=True) for rec in doc["results"])
    return hashlib.sha256("\n".join(canonical).encode()).hexdigest()[:32]


def add(db: str | Path, results_path: str | Path) -> bool:
    """Append one results file; False when this run is already in the history."""
    from twinbench.harness.store.results import load

    doc = load(results_path)
    store = open_store(db)
    try:
        key = run_key(doc)
        if store.has_run(key):
            return False
        prov = doc.get("provenance") or {}
        run = {"run_key": key, "started": prov.get("started", ""), "git_sha": prov.get("git_sha", ""),
               "git_dirty": int(bool(prov.get("git_dirty"))), "command": prov.get("command", ""),
               "source": str(results_path), "added": now_iso()}
        points = [{"suite": r["suite"], "case_id": r["case"], "impl": r["impl"], "device": r["device"],
                   "fingerprint": r["fingerprint"], "status": r["status"], "metric": r["metric"],
                   "value": float(r["value"])}
                  for r in to_long_rows(doc) if isinstance(r["value"], (int, float)) and r["value"] is not None]
        store.add(run, points)
        return True
    finally:
        store.close()


def change_points(values: list[float], *, window: int = 50, max_pvalue: float = 0.001,
                  min_magnitude: float = 0.05) -> list[dict[str, Any]]:
    """Otava E-divisive change points of one series: index of the first point after each change."""
    if len(values) < 4:
        return []
    from otava.series import AnalysisOptions, Metric, Series

    options = AnalysisOptions()
    options.window_len, options.max_pvalue, options.min_magnitude = window, max_pvalue, min_magnitude
    series = Series("twinbench", None, list(range(len(values))), {"v": Metric(1, 1.0, "")},
                    {"v": list(values)}, {})
    found = series.analyze(options).change_points.get("v", [])
    return [{"index": int(cp.index), "change_pct": float(cp.forward_change_percent()),
             "pvalue": float(cp.stats.pvalue), "mean_before": float(cp.mean_before()),
             "mean_after": float(cp.mean_after())} for cp in found]


def series(db: str | Path, *, metric: str | None = None, suite: str | None = None, window: int = 50,
           max_pvalue: float = 0.001, min_magnitude: float = 0.05) -> list[dict[str, Any]]:
    """Every (suite, case, impl, fingerprint, metric) series with its points and change points."""
    store = open_store(db)
    try:
        rows = store.points(metric, suite)
    finally:
        store.close()
    grouped: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["value"] is not None and r["status"] == "ok":
            grouped[(r["suite"], r["case"], r["impl"], r["fingerprint"], r["metric"])].append(r)
    out = []
    for (s, case, impl, fp, m), pts in sorted(grouped.items()):
        points = [{"time": p["time"], "value": p["value"], "git_sha": p["git_sha"] or ""} for p in pts]
        out.append({"suite": s, "case": case, "impl": impl, "fingerprint": fp, "metric": m, "points": points,
                    "change_points": change_points([p["value"] for p in points], window=window,
                                                   max_pvalue=max_pvalue, min_magnitude=min_magnitude)})
    return out


def trends(db: str | Path, doc: dict[str, Any]) -> dict[str, Any]:
    """History of the timing series that the given results document has, for the report."""
    if "://" not in str(db) and not Path(db).exists():
        raise UsageError(f"history database not found: {db}")
    wanted = {(r["suite"], r["case"], r["impl"], r["fingerprint"]) for r in doc["results"]}
    found = []
    for metric in TREND_METRICS:
        found += [s for s in series(db, metric=metric) if (s["suite"], s["case"], s["impl"], s["fingerprint"]) in wanted
                  and len(s["points"]) >= 2]
    return {"db": str(db), "series": found}


def show(db: str | Path, *, suite: str | None = None, metric: str = "fwd_median_ms", window: int = 50,
         max_pvalue: float = 0.001, min_magnitude: float = 0.05, as_json: bool = False) -> str:
    if "://" not in str(db) and not Path(db).exists():
        raise UsageError(f"history database not found: {db}")
    found = series(db, metric=metric, suite=suite, window=window, max_pvalue=max_pvalue,
                   min_magnitude=min_magnitude)
    from twinbench.harness.store.bisect_hint import bisect_command

    for s in found:
        for c in s["change_points"]:
            c["bisect"] = bisect_command(s, c)
    if as_json:
        return dumps_strict(found)
    if not found:
        return f"no {metric} points in {db}" + (f" for suite {suite}" if suite else "")
    lines = [f"{'suite':<14} {'impl':<18} {'fp':<8} {'runs':>5} {'first':>10} {'latest':>10}  change points / case"]
    for s in found:
        vals = [p["value"] for p in s["points"]]
        cps = "; ".join(f"run {c['index'] + 1} ({s['points'][c['index']]['git_sha'][:8]}) {c['change_pct']:+.1f}% "
                        f"p={c['pvalue']:.2g}" for c in s["change_points"]) or "none"
        lines.append(f"{s['suite']:<14} {s['impl']:<18} {s['fingerprint'][:8]:<8} {len(vals):>5} {vals[0]:>10.4g} "
                     f"{vals[-1]:>10.4g}  {cps}  [{s['case']}]")
        lines += [f"    find the commit: {c['bisect']}" for c in s["change_points"] if c["bisect"]]
    return "\n".join(lines)
