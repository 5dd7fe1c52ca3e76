"""CI-native output of `run` and `gate`: the markdown summary appended to the CI job's summary file, and
workflow-command annotations for every failure and regression.

- ``GITHUB_STEP_SUMMARY`` set (GitHub Actions sets it per step): the markdown summary is appended there.
  Appended, never overwritten (earlier steps wrote into the same file); a path that cannot be written is
  one warning line on stderr, never a failed command (the verdict is already printed and written).
- ``--annotations github`` (the default when ``GITHUB_ACTIONS=true``): ``::error``/``::warning`` lines
  on stdout, formatted and escaped by ``twinbench.reports.annotations``; ``--annotations none`` turns
  them off. GitLab needs neither: it reads ``junit.xml`` as its test report.
"""

from __future__ import annotations

import enum
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

STEP_SUMMARY_ENV = "GITHUB_STEP_SUMMARY"


class AnnotationStyle(enum.Enum):
    GITHUB = "github"
    NONE = "none"


def add_options(parser) -> None:
    parser.add_argument("--annotations", choices=[s.value for s in AnnotationStyle], default=None,
                        help="print ::error/::warning workflow commands for parity failures, crashes, hangs "
                             "and regressions (default: github under GitHub Actions, i.e. GITHUB_ACTIONS=true, "
                             "else none)")


def annotation_style(choice: str | None, environ: Mapping[str, str]) -> AnnotationStyle:
    if choice is not None:
        return AnnotationStyle(choice)
    return AnnotationStyle.GITHUB if environ.get("GITHUB_ACTIONS") == "true" else AnnotationStyle.NONE


def append_step_summary(markdown: str, environ: Mapping[str, str], stderr: TextIO) -> bool:
    """Append to $GITHUB_STEP_SUMMARY when it is set; True when written."""
    path = environ.get(STEP_SUMMARY_ENV)
    if not path:
        return False
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(markdown if markdown.endswith("\n") else markdown + "\n")
    except OSError as exc:
        print(f"twinbench: warning: could not append the summary to ${STEP_SUMMARY_ENV} ({path}): "
              f"{exc.strerror or exc}", file=stderr)
        return False
    return True


def publish(doc: dict[str, Any], *, gate: dict[str, Any] | None = None, annotations: str | None = None,
            environ: Mapping[str, str] | None = None, stdout: TextIO | None = None,
            stderr: TextIO | None = None) -> None:
    """The job summary and the annotations of one `run` or `gate` (doc: the results; gate: its verdict)."""
    from twinbench.reports.annotations import render_annotations
    from twinbench.reports.markdown import render_markdown

    environ = os.environ if environ is None else environ
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    append_step_summary(render_markdown(doc, gate=gate), environ, stderr)
    if annotation_style(annotations, environ) is AnnotationStyle.GITHUB:
        stdout.write(render_annotations(doc, gate=gate, workspace=environ.get("GITHUB_WORKSPACE") or "."))
        stdout.flush()
