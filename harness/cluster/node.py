"""The node side of a cluster run: one device's :class:`DeviceRun` living in a Ray actor on its node.

The actor holds the same supervisor and the same isolated worker process as a local run (a crashing kernel
takes down only that worker, never the actor or the node), and keeps the worker between cases so torch and
the impls are imported once per (node, device). Nothing here imports ray: :mod:`.driver` wraps the class.
"""

from __future__ import annotations

import platform
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from twinbench.harness.core import devices as devices_mod
from twinbench.harness.core import registry
from twinbench.harness.run.plan import RunOptions, Task
from twinbench.harness.run.supervisor import DeviceRun


@dataclass(frozen=True)
class NodeIdentity:
    """Which node and device an actor serves; the driver's progress lines and the results' ``cluster``."""

    node_id: str
    hostname: str
    address: str
    device: str

    @property
    def label(self) -> str:
        return f"{self.hostname}:{self.node_id[:6]}/{self.device}"

    def to_json(self) -> dict[str, str]:
        return {"node_id": self.node_id, "hostname": self.hostname, "address": self.address, "device": self.device}


class EntrySink:
    """Stands in for the journal on the node: the driver owns the one journal, so entries wait here until
    the case's call returns them."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def append(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self.entries.append(entry)

    def drain(self) -> list[dict[str, Any]]:
        with self.lock:
            out, self.entries = self.entries, []
        return out


class QuietProgress:
    """The supervisor's progress interface on a node: the driver shows progress, per node, as cases return."""

    def status(self, text: str) -> None:
        pass

    def case_done(self, device: str, task: Task, records: list[dict[str, Any]]) -> None:
        pass

    def close(self) -> None:
        pass


class NodeDeviceRunner:
    """One (node, device): runs the cases the driver hands it, one call per case, in one kept worker."""

    def __init__(self, options: RunOptions, device: str, reference: dict[str, str], node_id: str, address: str):
        registry.load_plugins(options.plugins)  # the records of a dead worker carry their impl's tags
        # Worker logs stay on the node (the driver's --out is another machine's folder).
        scratch = Path(tempfile.mkdtemp(prefix="twinbench-node-"))
        self.identity = NodeIdentity(node_id=node_id, hostname=platform.node(), address=address, device=device)
        self.sink = EntrySink()
        self.device_run = DeviceRun(devices_mod.find(device), [], replace(options, out=scratch), self.sink,
                                    QuietProgress(), None, reference)

    def whoami(self) -> dict[str, str]:
        return self.identity.to_json()

    def run_case(self, task: Task) -> list[dict[str, Any]]:
        """Every journal entry the case produced: the worker's fingerprint/ceilings when it (re)started,
        then one record per impl."""
        self.device_run.tasks.append(task)
        self.device_run.run(keep_worker=True)
        return self.sink.drain()

    def cancel(self) -> None:
        """The driver is stopping (Ctrl-C, SIGTERM): kill the worker and its process group now; the actor
        takes calls concurrently so this runs while a case is in flight."""
        self.device_run.cancel()

    def stop(self) -> None:
        worker = self.device_run.worker
        if worker is not None:
            worker.stop()
            self.device_run.worker = None
