"""The run's journal: every finished record appended as it arrives, so a killed run can --resume."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from twinbench.harness.store.results import atomic_write_json, dumps_strict, new_document, now_iso, record_key


class Journal:
    """Append-only JSON lines, fsync'd per line. A torn last line (a run killed mid-write) is ignored on read
    and cut off before the first append, so the next entry never glues onto it.

    Entries: ``{"type": "start", "provenance"}``, ``{"type": "fingerprint", "fingerprint", "import_failures"}``,
    ``{"type": "ceilings", "device", "fingerprint", "ceilings"}``, ``{"type": "record", "record"}``.
    """

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.tail_checked = False

    def append(self, entry: dict[str, Any]) -> None:
        line = dumps_strict(entry, indent=None) + "\n"  # strict JSON, as every file we write
        with self.lock:
            if not self.tail_checked:
                self._cut_torn_tail()
                self.tail_checked = True
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())

    def _cut_torn_tail(self) -> None:
        """Truncate the file after its last complete line (a line is complete once its newline is written)."""
        try:
            with open(self.path, "rb+") as fh:
                data = fh.read()
                if data and not data.endswith(b"\n"):
                    fh.truncate(data.rfind(b"\n") + 1)
                    fh.flush()
                    os.fsync(fh.fileno())
        except FileNotFoundError:
            pass

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        entries = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return entries


# A record's ``meta`` key for "this case never ran": the machine that was to run it was lost (a cluster with no
# node of its kind left). The record says nothing about the impl, so ``--resume`` runs the case again.
RUN_AGAIN_ON_RESUME = "run_again_on_resume"


def finished_keys(entries: list[dict[str, Any]]) -> set[tuple]:
    """Record keys of the journal's entries that ``--resume`` does not run again: every record except those
    marked :data:`RUN_AGAIN_ON_RESUME` (a later record of the same key replaces them in the results)."""
    return {record_key(e["record"]) for e in entries
            if e.get("type") == "record" and not (e["record"].get("meta") or {}).get(RUN_AGAIN_ON_RESUME)}


def assemble(out: Path, journal: Journal, prov: dict[str, Any]) -> dict[str, Any]:
    """Results document from the journal (last record per key wins); written atomically."""
    doc = new_document(dict(prov, finished=now_iso()))
    by_key: dict[tuple, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    for entry in journal.read():
        kind = entry.get("type")
        if kind == "fingerprint":
            fp = entry["fingerprint"]
            doc["fingerprints"][fp["id"]] = fp
            failures.update(entry.get("import_failures") or {})
        elif kind == "ceilings":
            doc["ceilings"][entry["fingerprint"]] = entry["ceilings"]
        elif kind == "record":
            by_key[record_key(entry["record"])] = entry["record"]
    doc["results"] = list(by_key.values())
    if failures:
        doc["import_failures"] = failures
    atomic_write_json(out / "results.json", doc)
    return doc
