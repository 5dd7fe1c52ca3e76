"""The `twinbench bisect` command line that looks for the commit behind a history change point.

`history show` offers it under each change point: GOOD is the commit of the last run before the change,
BAD the commit of the first run after it (the runs' ``provenance.git_sha``: twinbench's own checkout).
"""

from __future__ import annotations

import shlex
from typing import Any


def bisect_command(series: dict[str, Any], change_point: dict[str, Any]) -> str | None:
    """The command for one change point of one history series; None when a run around it has no commit."""
    index = change_point["index"]
    if index < 1:
        return None
    good, bad = series["points"][index - 1]["git_sha"], series["points"][index]["git_sha"]
    if not good or not bad or good == bad:
        return None
    device = ["--device", series["device"]] if series.get("device") else []  # else bisect's default, the CPU
    return shlex.join(["twinbench", "bisect", good[:12], bad[:12], "--suite", series["suite"],
                      "--impl", series["impl"], "--case", series["case"], *device])
