"""Versioned results files: one record per (suite, case, impl, device); atomic writes; CSV export.

The JSON Schema lives beside this module (``results.schema.json``); :func:`load` validates against it so a
truncated or foreign file is a clear usage error, never a crash deep in a report.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twinbench.harness import SOURCE_ROOT
from twinbench.harness.core.errors import UsageError

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("results.schema.json")
STATUSES = ("ok", "wrong", "skipped", "crashed", "timeout")
# How harness.core.devices.fingerprint makes an id: the first 16 hex digits of a sha256. Results and
# baseline schemas carry the same pattern (a test keeps the three equal): an id names a baseline file, so
# anything else (a path, "../..") is refused when the file is read.
FINGERPRINT_ID_PATTERN = "^[0-9a-f]{16}$"


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
    """The one JSON file writer: atomic and strict (docs/method.md §6)."""
    atomic_write_text(path, dumps_strict(data) + "\n")


def dumps_strict(data: Any, *, indent: int | None = 1, sort_keys: bool = False) -> str:
    """Standard JSON: a non-finite float (an unmeasurable parity error, an infinite ratio) is written as
    null, JSON's "no number", because ``NaN``/``Infinity`` are not JSON and strict readers reject them."""
    return json.dumps(_finite_or_null(data), indent=indent, sort_keys=sort_keys, allow_nan=False,
                      default=json_default)


def _finite_or_null(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_finite_or_null(v) for v in obj]
    if hasattr(obj, "item"):  # numpy scalars, 0-d tensors
        return _finite_or_null(obj.item())
    return obj


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

    exc = jsonschema.exceptions.best_match(_validator(schema_path).iter_errors(data))
    if exc is not None:  # the error jsonschema.validate would raise
        where = "/".join(str(p) for p in exc.absolute_path) or "top level"
        raise UsageError(f"{source}: not a twinbench {what} ({where}: {exc.message[:160]})") from None


@functools.cache
def _validator(schema_path: Path):
    """One checked validator per schema file: jsonschema.validate re-checks the schema itself on every call,
    three quarters of a results file's validation time (a history add of many files)."""
    import jsonschema

    schema = json.loads(schema_path.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def read_json(path: str | Path, what: str) -> Any:
    """Parse a JSON file; missing or unreadable is one clear UsageError."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{what} not found: {p}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {what} {p}: {exc}") from None
    except (RecursionError, ValueError) as exc:  # nested past Python's stack, or an integer of >4300 digits
        raise UsageError(f"cannot read {what} {p}: not a plausible JSON document ({type(exc).__name__})") from None


def validate(doc: Any, source: str = "results") -> None:
    """Schema, fingerprint keys equal to their ids, and finite timings (a NaN sample would poison a baseline)."""
    validate_against(doc, SCHEMA_PATH, source, "results file")
    for key, fp in doc["fingerprints"].items():
        if fp["id"] != key:
            raise UsageError(f"{source}: not a twinbench results file (fingerprints/{key}: its id is {fp['id']!r})")
    for i, rec in enumerate(doc["results"]):
        timing = rec.get("timing") or {}
        ratios = timing.get("ratio_vs_reference") or {}
        for where, values in (("fwd/samples_ms", (timing.get("fwd") or {}).get("samples_ms")),
                              ("fwdbwd/samples_ms", (timing.get("fwdbwd") or {}).get("samples_ms")),
                              ("fwd/median_ms", [(timing.get("fwd") or {}).get("median_ms")]),
                              ("fwdbwd/median_ms", [(timing.get("fwdbwd") or {}).get("median_ms")]),
                              ("ratio_vs_reference/fwd", (ratios.get("fwd") or {}).get("samples")),
                              ("ratio_vs_reference/fwdbwd", (ratios.get("fwdbwd") or {}).get("samples"))):
            check_finite(values, f"{source}: results/{i}/timing/{where} ({rec['suite']} {rec['case']} "
                                 f"{rec['impl']})")


def check_finite(values: Iterable[Any] | None, where: str) -> None:
    """Timing numbers must be finite: JSON Schema's number admits the NaN and Infinity Python reads."""
    bad = [v for v in values or () if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise UsageError(f"{where} holds a non-finite timing ({bad[0]}); timings must be finite numbers")


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


def confined(folder: str | Path, name: str, what: str) -> Path:
    """``folder/name`` for a name read from a file: refused unless it stays inside ``folder``."""
    base = Path(folder).resolve()
    path = (base / name).resolve()
    if path.parent != base:
        raise UsageError(f"{what} {name!r} would be written outside {folder}; refusing")
    return Path(folder) / name


@dataclass(frozen=True)
class Output:
    """A path a command will write: a file, or a folder it writes files into. ``option`` names it to the user."""
    option: str
    path: Path
    folder: bool = False


def check_outputs(outputs: Iterable[Output], inputs: Iterable[str | Path] = ()) -> None:
    """Before the first write: every output is writable, none is an input, none is named twice.

    The one check every command makes (run, report, gate, baseline save, calibrate, history add), so an
    unwritable or clashing path is one UsageError line and nothing is written. Writability is probed by
    creating and removing a temporary file in the nearest existing folder: permission bits do not say
    what root may do, nor what /proc or a read-only mount refuse.
    """
    input_ids = {_file_id(Path(p)) for p in inputs} - {None}
    named: dict[str, str] = {}
    for out in outputs:
        path = Path(out.path)
        if _file_id(path) in input_ids:
            raise UsageError(f"{out.option} {path} is one of the inputs; inputs are never overwritten")
        real = os.path.realpath(path)
        if real in named:
            raise UsageError(f"{out.option} {path} is also {named[real]}; give each output its own path")
        named[real] = f"{out.option} {path}"
        if out.folder:
            if path.exists() and not path.is_dir():
                raise UsageError(f"{out.option} {path} is a file, not a folder")
            _probe_writable(path, out)
        else:
            if path.is_dir():
                raise UsageError(f"{out.option} {path} is a folder; give a file name")
            _probe_writable(path.parent, out)


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _probe_writable(folder: Path, out: Output) -> None:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{out.option} {out.path}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".twinbench-probe.", dir=existing)
    except OSError as exc:
        raise UsageError(f"{out.option} {out.path}: cannot write in {existing} ({exc.strerror})") from None
    os.close(fd)
    os.unlink(probe)
