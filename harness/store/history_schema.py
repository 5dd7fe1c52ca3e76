"""The nightly history's schema: one set of SQLAlchemy Core tables for SQLite and PostgreSQL, and its migrations.

A database records the migrations applied to it in ``schema_version`` (one row per version). Migrations
are ordered; each runs once, in its own transaction together with its version row, so a failed migration
leaves the database at the version before it. Writers that open the same database at once serialise
here: PostgreSQL through a transaction-scoped advisory lock, SQLite through ``BEGIN IMMEDIATE`` (its
write lock), and each re-reads the version after taking the lock, so no migration runs twice.

A history written before the version table existed (the first version's SQLite file or PostgreSQL
tables) has ``runs`` but no ``schema_version``: it is version 1 and migrates from there, keeping its rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import sqlalchemy as sa
from twinbench.harness.core.errors import UsageError
from twinbench.harness.store.results import now_iso

metadata = sa.MetaData()

# Column names and types as the first version created them; indexes belong to the migrations.
runs = sa.Table(
    "runs", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_key", sa.String(64), unique=True),  # the insert-or-skip of concurrent writers rests on this
    sa.Column("started", sa.String(40)), sa.Column("git_sha", sa.String(64)), sa.Column("git_dirty", sa.Integer),
    sa.Column("command", sa.Text), sa.Column("source", sa.Text), sa.Column("added", sa.String(40)),
    sqlite_autoincrement=True)
points = sa.Table(
    "points", metadata,
    sa.Column("run_id", sa.Integer),
    *[sa.Column(name, sa.Text) for name in ("suite", "case_id", "impl", "device", "fingerprint", "status", "metric")],
    sa.Column("value", sa.Float))
schema_version = sa.Table(
    "schema_version", metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", sa.Text), sa.Column("applied", sa.String(40)))

# Any fixed 64-bit number, the same in every twinbench: the key of the PostgreSQL advisory lock.
_PG_MIGRATION_LOCK = 0x7477696E62656E63  # "twinbenc"


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[sa.Connection], None]


def _create_tables(conn: sa.Connection) -> None:
    runs.create(conn, checkfirst=True)
    points.create(conn, checkfirst=True)


def _index_points(conn: sa.Connection) -> None:
    # The first version indexed SQLite by series only and PostgreSQL by run only; both need both
    # (reads join points to runs and group by series). The names are the ones each first version used.
    conn.execute(sa.text("CREATE INDEX IF NOT EXISTS ix_points_run_id ON points (run_id)"))
    conn.execute(sa.text("CREATE INDEX IF NOT EXISTS points_series ON points (suite, case_id, impl, fingerprint, metric)"))


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "runs and points tables", _create_tables),
    Migration(2, "points indexed by run and by series on every backend", _index_points),
)


def latest_version(migrations: tuple[Migration, ...] = MIGRATIONS) -> int:
    return migrations[-1].version


def current_version(conn: sa.Connection) -> int:
    """0: empty database; 1: the first version's tables without a version table; else the highest version row."""
    inspector = sa.inspect(conn)
    if inspector.has_table("schema_version"):
        return int(conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0)
    return 1 if inspector.has_table("runs") else 0


def _refuse_newer(version: int, name: str, migrations: tuple[Migration, ...]) -> None:
    if version > latest_version(migrations):
        raise UsageError(f"history database {name} has schema version {version}, newer than this twinbench knows "
                         f"({latest_version(migrations)}): upgrade twinbench to use it")


def migrate(engine: sa.Engine, name: str, *, migrations: tuple[Migration, ...] = MIGRATIONS) -> int:
    """Bring the database to the latest version; the version it is at afterwards.

    A SQLite ``engine`` must take the write lock at BEGIN when asked (``history._sqlite_engine``), so
    ``write_transaction`` serialises the writers; PostgreSQL takes the advisory lock below.
    """
    versions = [m.version for m in migrations]
    assert versions == list(range(1, len(versions) + 1)), "migrations are numbered 1, 2, ... in order"
    with engine.connect() as conn:  # the usual case, without a lock: already at the latest version
        version = current_version(conn)
    _refuse_newer(version, name, migrations)
    while version < latest_version(migrations):
        with write_transaction(engine) as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_MIGRATION_LOCK)))
            version = current_version(conn)  # another writer may have migrated while this one waited
            _refuse_newer(version, name, migrations)
            if version == latest_version(migrations):
                break
            if not sa.inspect(conn).has_table("schema_version"):
                schema_version.create(conn)
                if version == 1:
                    conn.execute(schema_version.insert().values(
                        version=1, description="first version, found without a version table", applied=now_iso()))
            step = migrations[version]
            step.apply(conn)
            conn.execute(schema_version.insert().values(version=step.version, description=step.description,
                                                        applied=now_iso()))
            version = step.version
    return version


@contextmanager
def write_transaction(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A transaction that holds the database's write lock from its start (SQLite: BEGIN IMMEDIATE).

    SQLite's default BEGIN takes the write lock at the first write; two such transactions that both read
    first deadlock, and one fails with "database is locked" at once, whatever the busy timeout. The
    engine's ``begin`` hook (``history._sqlite_engine``) reads the ``twinbench_write`` option.
    """
    with engine.connect() as conn:
        conn.execution_options(twinbench_write=True)
        with conn.begin():
            yield conn
