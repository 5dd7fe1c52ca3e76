"""GitHub Actions annotations: one ``::error``/``::warning`` workflow command per finding of a run or a gate.

A parity failure, a crash or hang, a gate regression and a head-side parity failure of ``gate --against``
are errors (each fails the command's exit code); a module that failed to import, and a gate case that could
not be compared, are warnings (they pass, but a reader should know). Every value is escaped by GitHub's
workflow-command rules, so no case id, impl name or reason can end the command early or inject another.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twinbench.reports import model

# GitHub truncates long annotation messages anyway; keep every line readable in the raw log too.
MAX_MESSAGE = 2000


class Level(enum.Enum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class Annotation:
    level: Level
    title: str
    message: str
    file: str | None = None  # relative to the workspace: GitHub attaches the annotation to that file


def escape_data(text: str) -> str:
    """The message part: '%', CR and LF are percent-encoded (GitHub's ``escapeData``)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """A property value (file=, title=): also ':' and ',' which would end it (GitHub's ``escapeProperty``)."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def format_annotation(a: Annotation) -> str:
    props = ([f"file={escape_property(a.file)}"] if a.file else []) + [f"title={escape_property(a.title)}"]
    return f"::{a.level.value} {','.join(props)}::{escape_data(a.message[:MAX_MESSAGE])}"


def _source_file(rec: dict[str, Any], workspace: Path) -> str | None:
    """The impl's source file relative to the workspace, or None when it lies outside it (or is unknown)."""
    file = (((rec.get("meta") or {}).get("origin") or {}).get("file")) or None
    if not file:
        return None
    try:
        relative = Path(os.path.realpath(file)).relative_to(os.path.realpath(workspace))
    except ValueError:
        return None
    return relative.as_posix()


def annotations_for(doc: dict[str, Any], *, gate: dict[str, Any] | None = None,
                    workspace: str | Path = ".") -> list[Annotation]:
    workspace = Path(workspace)
    found = []
    for rec in model.failures(doc):
        what = "parity failure" if rec["status"] == "wrong" else rec["status"]
        found.append(Annotation(
            Level.ERROR, f"twinbench {what}: {rec['suite']}/{rec['impl']} on {rec['device']}",
            f"{rec['suite']} case {rec['case']}, impl {rec['impl']}, device {rec['device']}: "
            f"{rec.get('reason') or rec['status']}", _source_file(rec, workspace)))
    for module, why in sorted((doc.get("import_failures") or {}).items()):
        found.append(Annotation(Level.WARNING, f"twinbench import failed: {module}", str(why)))
    for c in (gate or {}).get("cases", []):
        where = f"{c['suite']} case {c['case']}, impl {c['impl']}, {c['mode']}"
        if c["verdict"].startswith("regression"):
            ratio = model.fmt(c.get("ratio"), ".4f")
            interval = f"{model.fmt(c.get('ci_low'), '.4f')}-{model.fmt(c.get('ci_high'), '.4f')}"
            found.append(Annotation(
                Level.ERROR, f"twinbench gate {c['verdict']}: {c['suite']}/{c['impl']}",
                f"{where}: new/base {ratio} (95% interval {interval}), adjusted p "
                f"{model.fmt(c.get('p_adjusted'), '.2g')}, min effect {model.fmt(c.get('min_effect'), '.3f')}"
                + (f"; {c['note']}" if c.get("note") else "")))
        elif c.get("p_value") is None:
            found.append(Annotation(Level.WARNING, f"twinbench gate not compared: {c['suite']}/{c['impl']}",
                                    f"{where}: {c['verdict']}" + (f"; {c['note']}" if c.get("note") else "")))
    already = {(r["suite"], r["case"], r["impl"]) for r in model.failures(doc)}
    for r in (gate or {}).get("parity_failures", []):
        if (r["suite"], r["case"], r["impl"]) in already:  # the stored mode lists the run's own failures
            continue
        found.append(Annotation(
            Level.ERROR, f"twinbench gate parity failure: {r['suite']}/{r['impl']}",
            f"{r['suite']} case {r['case']}, impl {r['impl']} ({r.get('status', 'wrong')}): {r.get('reason', '')}"))
    return found


def render_annotations(doc: dict[str, Any], *, gate: dict[str, Any] | None = None,
                       workspace: str | Path = ".") -> str:
    return "".join(format_annotation(a) + "\n" for a in annotations_for(doc, gate=gate, workspace=workspace))
