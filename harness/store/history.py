"""Nightly history: results appended to a database, change points per (suite, case, impl, fingerprint).

The store is SQLite by default (a file path, or a ``sqlite:///`` URL) and PostgreSQL for a history that
a fleet shares (``postgresql+psycopg://...``), both through SQLAlchemy Core with one schema and its
migrations (``history_schema``); several processes may add at once. Change points come
from Apache Otava's E-divisive with the Hunter merge step (``otava.series.Series.analyze``, offline),
docs/method.md §4: window 50, p < 0.001, a minimum relative magnitude.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path
from typing import Any

from twinbench.harness.core.errors import UsageError
from twinbench.harness.store.results import dumps_strict, now_iso, to_long_rows

TREND_METRICS = ("fwd_median_ms", "fwdbwd_median_ms")
# How long a SQLite writer waits for another's write lock: many nightly jobs may add at the same minute.
SQLITE_BUSY_TIMEOUT_S = 60.0


class HistoryStore:
    """A history database: SQLite (a file path, or a ``sqlite:///`` URL) or PostgreSQL (a SQLAlchemy URL).

    One schema for both (``history_schema``), brought to the latest version when opened. Several writers
    may add at once from separate processes: a run's row and its points go in one transaction, and the
    database itself decides whether the run key is new (INSERT ... ON CONFLICT DO NOTHING), so the same
    run added twice at the same moment is stored once.
    """

    def __init__(self, db: str | Path):
        try:
            import sqlalchemy as sa
            from twinbench.harness.store import history_schema
        except ImportError as exc:
            raise UsageError(f"the history needs the history extra: pip install 'twinbench[history]' ({exc})") from None
        self.sa, self.schema = sa, history_schema
        self.engine, self.name = _engine(db)
        try:
            history_schema.migrate(self.engine, self.name)
        except BaseException as exc:
            self.engine.dispose()
            if isinstance(exc, sa.exc.SQLAlchemyError):  # unreachable server, wrong password, not a database
                raise UsageError(f"history database {self.name}: {_one_line(exc)}") from None
            raise

    def add(self, run: dict[str, Any], points: list[dict[str, Any]]) -> bool:
        """Store a run whole, or nothing when its run key is already there; True when stored."""
        runs, pts = self.schema.runs, self.schema.points
        insert = _dialect_insert(self.engine)(runs).values(**run)
        insert = insert.on_conflict_do_nothing(index_elements=[runs.c.run_key]).returning(runs.c.id)
        with self.schema.write_transaction(self.engine) as conn:
            run_id = conn.execute(insert).scalar()
            if run_id is None:
                return False
            if points:
                conn.execute(pts.insert(), [dict(p, run_id=run_id) for p in points])
        return True

    def points(self, metric: str | None, suite: str | None) -> list[dict[str, Any]]:
        p, r = self.schema.points, self.schema.runs
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


def _one_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(getattr(exc, 'orig', None) or exc).__name__}: {text[0][:200] if text else ''}"


def display_name(db: str | Path) -> str:
    """The database as printed and put into reports: a URL without its password."""
    text = str(db)
    if "://" not in text:
        return text
    try:
        import sqlalchemy as sa

        return sa.make_url(text).render_as_string(hide_password=True)
    except Exception:  # no SQLAlchemy, or not a URL it can parse: never print what may be a password
        return text.split("://", 1)[0] + "://..."


def _engine(db: str | Path):
    """The engine for a path or URL, and its display name; only SQLite and PostgreSQL (the tested backends)."""
    import sqlalchemy as sa

    text = str(db)
    if "://" not in text:
        path = Path(text).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        text = f"sqlite:///{path}"
    name = display_name(db)
    try:
        url = sa.make_url(text)
    except sa.exc.ArgumentError as exc:
        raise UsageError(f"history database URL {name}: {exc}") from None
    if url.get_backend_name() == "postgresql":
        if url.drivername == "postgresql":  # psycopg 3 is what the history extra installs
            url = url.set(drivername="postgresql+psycopg")
        try:
            return sa.create_engine(url, pool_pre_ping=True), name
        except ImportError as exc:
            raise UsageError(f"history database {name}: {exc} (pip install 'twinbench[history]')") from None
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url), name
    raise UsageError(f"history database {name}: only SQLite (a path or sqlite:///...) and PostgreSQL "
                     "(postgresql+psycopg://...) are supported")


def _sqlite_engine(url):
    """SQLite for several writers: WAL (readers do not block the writer), a busy timeout, and write
    transactions that take the write lock at BEGIN (``history_schema.write_transaction``)."""
    import sqlalchemy as sa

    engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None  # the driver's own BEGIN handling off: the "begin" hook below decides
        dbapi_conn.execute("PRAGMA journal_mode=WAL")

    @sa.event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("twinbench_write") else "BEGIN")

    return engine


def _dialect_insert(engine):
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


def open_store(db: str | Path) -> HistoryStore:
    return HistoryStore(db)


def run_key(doc: dict[str, Any]) -> str:
    """What makes a run "already in the history": its records' content, not its provenance.

    A sha256 of the records' canonical JSON (keys sorted, records in sorted order): the same file added
    twice is one run, while an edited copy with the same provenance is another and does not hide the real one.
    """
    canonical = sorted(dumps_strict(rec, indent=None, sort_keys=True) for rec in doc["results"])
    return hashlib.sha256("\n".join(canonical).encode()).hexdigest()[:32]


def run_row(doc: dict[str, Any], source: str | Path) -> dict[str, Any]:
    """The ``runs`` row of one results document."""
    prov = doc.get("provenance") or {}
    return {"run_key": run_key(doc), "started": prov.get("started", ""), "git_sha": prov.get("git_sha", ""),
            "git_dirty": int(bool(prov.get("git_dirty"))), "command": prov.get("command", ""),
            "source": str(source), "added": now_iso()}


def point_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``points`` rows of one results document (numbers only), without their run id."""
    return [{"suite": r["suite"], "case_id": r["case"], "impl": r["impl"], "device": r["device"],
             "fingerprint": r["fingerprint"], "status": r["status"], "metric": r["metric"], "value": float(r["value"])}
            for r in to_long_rows(doc) if isinstance(r["value"], (int, float)) and r["value"] is not None]


def add(db: str | Path, results_path: str | Path) -> bool:
    """Append one results file; False when this run is already in the history."""
    from twinbench.harness.store.results import load

    doc = load(results_path)
    store = open_store(db)
    try:
        return store.add(run_row(doc, results_path), point_rows(doc))
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
        # one fingerprint is one device kind; the device name (cuda:0) is what a re-run on that host selects
        out.append({"suite": s, "case": case, "impl": impl, "fingerprint": fp, "device": pts[-1]["device"] or "",
                    "metric": m, "points": points,
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
    return {"db": display_name(db), "series": found}


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
        return f"no {metric} points in {display_name(db)}" + (f" for suite {suite}" if suite else "")
    lines = [f"{'suite':<14} {'impl':<18} {'fp':<8} {'runs':>5} {'first':>10} {'latest':>10}  change points / case"]
    for s in found:
        vals = [p["value"] for p in s["points"]]
        cps = "; ".join(f"run {c['index'] + 1} ({s['points'][c['index']]['git_sha'][:8]}) {c['change_pct']:+.1f}% "
                        f"p={c['pvalue']:.2g}" for c in s["change_points"]) or "none"
        lines.append(f"{s['suite']:<14} {s['impl']:<18} {s['fingerprint'][:8]:<8} {len(vals):>5} {vals[0]:>10.4g} "
                     f"{vals[-1]:>10.4g}  {cps}  [{s['case']}]")
        lines += [f"    find the commit: {c['bisect']}" for c in s["change_points"] if c["bisect"]]
    return "\n".join(lines)
