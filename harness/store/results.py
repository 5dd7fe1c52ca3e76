"""Versioned results files: one record per (suite, case, impl, device); atomic writes; CSV export.

The JSON Schema lives beside this module (``results.schema.json``); :func:`load` validates against it so a
truncated or foreign file is a clear usage error, never a crash deep in a report.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from twinbench.harness import SOURCE_ROOT
from twinbench.harness.core.errors import UsageError

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("results.schema.json")
STATUSES = ("ok", "wrong", "skipped", "crashed", "timeout")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temp file in the same folder + rename: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results and reports are for others to read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@functools.cache
def _umask() -> int:
    # Read once: os.umask can only be read by setting it, which would race with other threads' file creation.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=False, default=json_default) + "\n")


def json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_state(cwd: str | Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the checkout the harness runs from ('' when not a git checkout)."""
    root = cwd or SOURCE_ROOT
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10, check=True).stdout.strip())
    except Exception:
        return {"git_sha": "", "git_dirty": None}
    return {"git_sha": sha, "git_dirty": dirty}


def provenance(argv: Iterable[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv if argv is None else argv)
    return {**git_state(), "command": shlex.join(["twinbench", *argv[1:]]), "started": now_iso(),
            "finished": None}


def new_document(prov: dict[str, Any]) -> dict[str, Any]:
    from twinbench import __version__

    return {"schema_version": SCHEMA_VERSION, "tool": f"twinbench {__version__}", "provenance": prov,
            "fingerprints": {}, "ceilings": {}, "results": []}


def record_key(rec: dict[str, Any]) -> tuple[str, str, str, str]:
    return rec["suite"], rec["case"], rec["impl"], rec["device"]


def validate_against(data: Any, schema_path: Path, source: str, what: str) -> None:
    """jsonschema validation whose failure is one UsageError line naming where the file is wrong."""
    import jsonschema

    schema = json.loads(schema_path.read_text())
    try:
        jsonschema.validate(data, schema)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "top level"
        raise UsageError(f"{source}: not a twinbench {what} ({where}: {exc.message[:160]})") from None


def read_json(path: str | Path, what: str) -> Any:
    """Parse a JSON file; missing or unreadable is one clear UsageError."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{what} not found: {p}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {what} {p}: {exc}") from None


def validate(doc: Any, source: str = "results") -> None:
    validate_against(doc, SCHEMA_PATH, source, "results file")


def load(path: str | Path) -> dict[str, Any]:
    """Read and validate a results file; any problem is one clear UsageError."""
    p = Path(path)
    doc = read_json(p, "results file")
    if isinstance(doc, dict) and doc.get("schema_version") not in (None, SCHEMA_VERSION):
        raise UsageError(f"{p}: schema_version {doc.get('schema_version')} is not supported "
                         f"(this twinbench reads {SCHEMA_VERSION})")
    validate(doc, str(p))
    return doc


def to_long_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Long format: one row per (record, metric) — what pandas/plotly and spreadsheets want."""
    rows = []
    for rec in doc["results"]:
        base = {k: rec[k] for k in ("suite", "case", "impl", "device", "fingerprint", "status")}
        base["reason"] = rec.get("reason", "")
        metrics: dict[str, Any] = {}
        timing = rec.get("timing") or {}
        for mode in ("fwd", "fwdbwd"):
            t = timing.get(mode) or {}
            for stat in ("median_ms", "iqr_ms", "p20_ms", "p80_ms"):
                if t.get(stat) is not None:
                    metrics[f"{mode}_{stat}"] = t[stat]
            r = (timing.get("ratio_vs_reference") or {}).get(mode) or {}
            if r.get("median") is not None:
                metrics[f"{mode}_speedup_vs_reference"] = r["median"]
        if timing.get("bwd_median_ms") is not None:
            metrics["bwd_median_ms"] = timing["bwd_median_ms"]
        for name, value in (rec.get("derived") or {}).items():
            metrics[name] = value
        mem = rec.get("memory") or {}
        if mem.get("peak_bytes") is not None:
            metrics["peak_memory_bytes"] = mem["peak_bytes"]
        parity = rec.get("parity") or {}
        for name, chk in (parity.get("checks") or {}).items():
            metrics[f"parity_ratio:{name}"] = chk.get("ratio")
            metrics[f"parity_error:{name}"] = chk.get("error")
        for name, value in (rec.get("metrics") or {}).items():
            if isinstance(value, (int, float)):
                metrics[name] = value
        for name, value in metrics.items():
            rows.append({**base, "metric": name, "value": value})
    return rows


def write_csv(doc: dict[str, Any], path: str | Path) -> None:
    import pandas as pd

    cols = ["suite", "case", "impl", "device", "fingerprint", "status", "reason", "metric", "value"]
    frame = pd.DataFrame(to_long_rows(doc), columns=cols)
    atomic_write_text(path, frame.to_csv(index=False))
