"""`twinbench doctor [--device D] [--out DIR]`: the harness checks itself on each device (docs/bring-up.md).

Prints a table per device, writes ``DIR/doctor.json`` (strict JSON, atomic) and each worker's log beside
it; exit 1 when a check fails, 2 on a usage error (one line, nothing written).
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

from twinbench.harness.cli import arguments
from twinbench.harness.core.errors import UsageError

DOCTOR_SCHEMA = "twinbench-doctor/1"
STATUS_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def register(subparsers) -> None:
    p = subparsers.add_parser("doctor", help="self-checks of the harness on a device before trusting its numbers")
    p.add_argument("--device", action="append", default=[], help="cpu, cuda:0, ... (repeatable; default all)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/doctor-<timestamp>)")
    p.add_argument("--threads", type=arguments.positive_int, default=None, help="CPU threads for the CPU worker")
    p.set_defaults(handler=cmd_doctor)


def _summary(value: Any) -> str:
    """A short one-cell rendering of a check's measured values."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def cmd_doctor(args) -> int:
    from rich.table import Table
    from twinbench.harness.cli.console import make_console
    from twinbench.harness.core import devices
    from twinbench.harness.doctor.runner import run_doctor
    from twinbench.harness.run.process import user_triton_interpret
    from twinbench.harness.store.results import atomic_write_json, now_iso, provenance

    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be >= 1")
    selected = [devices.find(d) for d in args.device] if args.device else list(devices.detect())
    out = args.out or Path("runs") / _dt.datetime.now().strftime("doctor-%Y%m%d-%H%M%S")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    doc: dict[str, Any] = {"schema": DOCTOR_SCHEMA, "provenance": provenance(), "ok": True, "devices": []}
    console = make_console()
    for device in selected:
        report = run_doctor(device, out, threads=args.threads, triton_interpret=user_triton_interpret())
        doc["devices"].append(report.to_json())
        table = Table(title=f"doctor: {device.name} ({device.model})")
        for col in ("check", "status", "measured", "expected", "why"):
            table.add_column(col, overflow="fold")
        for check in report.checks:
            style = STATUS_STYLE.get(check["status"], "")
            table.add_row(check["name"], f"[{style}]{check['status']}[/]", _summary(check["measured"]),
                          check["expected"], check["why"])
        console.print(table)
    doc["ok"] = all(d["ok"] for d in doc["devices"])
    doc["provenance"]["finished"] = now_iso()
    json.dumps(doc, allow_nan=False, default=str)  # strict JSON, or a ValueError here rather than a bad file
    atomic_write_json(out / "doctor.json", doc)
    console.print(f"wrote {out / 'doctor.json'}" + ("" if doc["ok"] else "  [bold red]a check failed[/]"))
    return 0 if doc["ok"] else 1
