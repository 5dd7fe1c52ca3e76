"""One result record: one impl on one case on one device. Serialised exactly as results.schema.json says.

Built in one place (:meth:`Record.new`): the run worker makes the records it measures, the supervisor the
ones a dead or hung worker could not finish. Journals and results files keep the plain JSON form.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from typing import Any


class Status(str, enum.Enum):
    OK = "ok"
    WRONG = "wrong"        # ran, failed parity
    SKIPPED = "skipped"    # cannot run here (device, dtype, reference) or excluded after another's failure
    CRASHED = "crashed"    # raised, or its worker died
    TIMEOUT = "timeout"    # its worker made no progress within --timeout

    @property
    def failed(self) -> bool:
        """Whether the run's exit code is 1 because of it."""
        return self in (Status.WRONG, Status.CRASHED, Status.TIMEOUT)


FAILED = frozenset(s.value for s in Status if s.failed)


@dataclass
class Record:
    suite: str
    case: str
    params: dict[str, Any]
    device: str
    fingerprint: str
    impl: str
    tags: list[str]
    status: Status
    reason: str = ""
    parity: dict[str, Any] | None = None
    timing: dict[str, Any] | None = None
    memory: dict[str, Any] | None = None
    derived: dict[str, Any] | None = None
    meta: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    duration_s: float | None = None
    # process-global torch state the impl changed (threads, default dtype...), undone by the worker after it
    state_changed: list[str] | None = None

    @classmethod
    def new(cls, *, suite: str, case: str, params: dict[str, Any], device: str, fingerprint: str, impl: str,
            tags: list[str] | tuple[str, ...], status: Status | str, reason: str = "", **measured: Any) -> Record:
        return cls(suite=suite, case=case, params=dict(params), device=device, fingerprint=fingerprint, impl=impl,
                   tags=list(tags), status=Status(status), reason=reason, **measured)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["status"] = self.status.value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        return cls(**{f.name: data.get(f.name) for f in fields(cls)} | {"status": Status(data["status"])})
