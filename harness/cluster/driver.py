"""`twinbench run --cluster ADDRESS`: the same selection spread over a Ray cluster (docs/cluster.md).

Each (node, device) is one Ray actor (:class:`.node.NodeDeviceRunner`) pinned to its node, with the
resource request of its device (one CPU, or one GPU) plus a sliver of every ``--cluster-resource`` (a custom
resource or ``accelerator_type:H100``), so only nodes offering them serve. On its node the actor runs the
same supervisor and isolated worker process as a local run. The driver hands each actor one case at a time;
a finished case's entries (fingerprint, ceilings, records) come back with the call and the driver, alone,
appends them to its journal, so ``--resume`` works as for a local run and the results document is
assembled the same way. Each case runs once per device kind (``cpu``, ``cuda:0``: the name the worker on
its node sees), on whichever node of that kind is free: record keys are those of a local run.

A node that disappears mid-case (its actor's call fails) is dropped; its case goes back to the queue of
its kind and the records it finally gets say where it was lost (``meta.cluster.requeued_from``). When no
node of that kind is left, its impls are recorded crashed with reason ``node lost: ...``.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from twinbench.harness.cluster.node import NodeDeviceRunner, NodeIdentity
from twinbench.harness.core import registry
from twinbench.harness.core.errors import UsageError
from twinbench.harness.run.journal import RUN_AGAIN_ON_RESUME, Journal, assemble, finished_keys
from twinbench.harness.run.plan import RunOptions, Task, plan_tasks
from twinbench.harness.run.runner import pending_tasks, run_folder
from twinbench.harness.run.supervisor import START_TIMEOUT_S, Progress
from twinbench.harness.store.record import Record, Status
from twinbench.harness.store.results import atomic_write_json, provenance

CPU = "cpu"
GPU = "cuda:0"  # a Ray GPU actor's worker sees only its own GPU (CUDA or ROCm), as index 0
# What users may type for --device on a cluster, per kind; XPU and MPS have no Ray resource to ask for.
DEVICE_KINDS = {"cpu": CPU, "cuda": GPU, "gpu": GPU, "rocm": GPU, "hip": GPU}
# A sliver of each --cluster-resource: any node offering the resource serves every one of its devices
# (Ray's own `accelerator_type` option asks 0.001 of `accelerator_type:X` the same way).
RESOURCE_SLIVER = 0.001
# How often the driver looks up, while waiting on cases, so Ctrl-C and lost nodes are seen promptly.
WAIT_S = 1.0


@dataclass(frozen=True)
class ClusterOptions:
    """`--cluster ADDRESS` (or RAY_ADDRESS; ``local`` starts a one-machine Ray) and `--cluster-resource`."""

    address: str
    resources: tuple[str, ...] = ()
    start_timeout_s: float = START_TIMEOUT_S


@dataclass(frozen=True)
class SlotSpec:
    """One actor to start: a device kind on a node, with its Ray resource request."""

    node_id: str
    address: str
    kind: str
    num_cpus: float
    num_gpus: float


@dataclass
class Pending:
    """A case waiting for a node of its kind; ``lost_on`` names the nodes it was running on when they went."""

    task: Task
    lost_on: list[str] = field(default_factory=list)


def device_kinds(devices: list[str]) -> list[str]:
    """The selection's device names as cluster kinds (default: every kind a node offers)."""
    if not devices:
        return [CPU, GPU]
    kinds = []
    for name in devices:
        kind = DEVICE_KINDS.get(name.split(":")[0].lower())
        if kind is None:
            raise UsageError(f"--device {name}: a cluster run schedules {', '.join(sorted(DEVICE_KINDS))} "
                             f"(Ray has no resource for the others)")
        if kind not in kinds:
            kinds.append(kind)
    return kinds


def plan_slots(nodes: list[dict[str, Any]], kinds: list[str], resources: tuple[str, ...]) -> list[SlotSpec]:
    """One slot per (alive node, device) of the selected kinds on nodes offering every required resource.

    ``nodes`` as ``ray.nodes()`` gives them. A node's CPU kind is one slot asking for every CPU of the node
    (the CPU worker times with all the node's threads, and nothing Ray schedules may share them); its GPU
    kind is one slot per GPU, asking no CPU.
    """
    slots = []
    for node in nodes:
        have = node.get("Resources") or {}
        if not node.get("Alive") or any(have.get(r, 0) <= 0 for r in resources):
            continue
        node_id, address = node["NodeID"], node.get("NodeManagerAddress", "")
        if CPU in kinds and have.get("CPU", 0) >= 1:  # all its cores: Ray sets OMP_NUM_THREADS to the ask,
            slots.append(SlotSpec(node_id, address, CPU, num_cpus=have["CPU"], num_gpus=0))  # as a local run has
        if GPU in kinds:
            slots += [SlotSpec(node_id, address, GPU, num_cpus=0, num_gpus=1) for _ in range(int(have.get("GPU", 0)))]
    return slots


def import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--cluster needs Ray: pip install 'twinbench[cluster]'") from None
    return ray


class ClusterRun:
    """The driver: actors per (node, device), one case in flight per actor, one journal."""

    def __init__(self, options: RunOptions, cluster: ClusterOptions, ray):
        self.options, self.cluster, self.ray = options, cluster, ray
        self.slots: dict[Any, NodeIdentity] = {}  # live actor -> what it serves
        self.queues: dict[str, deque[Pending]] = {}
        self.lost: list[dict[str, Any]] = []

    def plan(self, kinds: list[str], explicit: bool) -> list[SlotSpec]:
        """The actors to start; a kind the user named (``--device``) that no node offers is a usage error,
        as a device this machine lacks is for a local run."""
        specs = plan_slots(self.ray.nodes(), kinds, self.cluster.resources)
        missing = [k for k in kinds if not any(s.kind == k for s in specs)]
        if not specs or (explicit and missing):
            want = f" offering {', '.join(self.cluster.resources)}" if self.cluster.resources else ""
            raise UsageError(f"no alive node of the Ray cluster at {self.cluster.address}{want} has a "
                             f"{' or '.join(missing)} device")
        return specs

    def start_actors(self, specs: list[SlotSpec], reference: dict[str, str]) -> None:
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        remote = ray.remote(NodeDeviceRunner)
        actors = []
        for spec in specs:
            actor = remote.options(
                num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, max_restarts=0, max_concurrency=2,
                resources={r: RESOURCE_SLIVER for r in self.cluster.resources},
                scheduling_strategy=NodeAffinitySchedulingStrategy(spec.node_id, soft=False),
            ).remote(self.options, spec.kind, reference, spec.node_id, spec.address)
            actors.append((actor, actor.whoami.remote()))
        ready, _ = ray.wait([ref for _, ref in actors], num_returns=len(actors),
                            timeout=self.cluster.start_timeout_s)
        for actor, ref in actors:
            if ref in ready:
                try:
                    self.slots[actor] = NodeIdentity(**ray.get(ref))
                    continue
                except ray.exceptions.RayError as exc:
                    why = str(exc).splitlines()[0]
            else:
                why = f"not started within {self.cluster.start_timeout_s:.0f}s (resources taken?)"
            print(f"twinbench: cluster: an actor was dropped: {why}", file=sys.stderr)
            ray.kill(actor)
        if not self.slots:
            raise UsageError(f"no actor of the Ray cluster at {self.cluster.address} started")

    def run(self, journal: Journal, planned, kinds: list[str]) -> None:
        previous = journal.read()
        done = finished_keys(previous)
        kinds = [k for k in kinds if any(ident.device == k for ident in self.slots.values())]
        self.queues = {k: deque(Pending(t) for t in pending_tasks(planned, k, done)) for k in kinds}
        progress = Progress(sum(len(q) for q in self.queues.values()))
        terminated = threading.Event()
        with sigterm_noted(terminated):
            self._loop(journal, progress, terminated)

    def _loop(self, journal: Journal, progress: Progress, terminated: threading.Event) -> None:
        in_flight: dict[Any, tuple[Any, NodeIdentity, Pending]] = {}  # ObjectRef -> (actor, where, case)
        try:
            while True:
                busy = {actor for actor, _, _ in in_flight.values()}
                for actor, ident in self.slots.items():
                    queue = self.queues[ident.device]
                    if actor not in busy and queue and not self.cpu_waits(ident, in_flight):
                        item = queue.popleft()
                        progress.status(f"{ident.label} {item.task.suite} {item.task.case_id}")
                        in_flight[actor.run_case.remote(item.task)] = (actor, ident, item)
                self._record_unservable(journal, progress)
                if not in_flight:
                    return
                ready, _ = self.ray.wait(list(in_flight), num_returns=1, timeout=WAIT_S)
                if terminated.is_set():
                    raise SystemExit(128 + signal.SIGTERM)  # as a local run exits on SIGTERM
                for ref in ready:
                    actor, ident, item = in_flight.pop(ref)
                    self._finish(journal, progress, ref, actor, ident, item)
        finally:
            progress.close()

    def cpu_waits(self, ident: NodeIdentity, in_flight: dict[Any, tuple[Any, NodeIdentity, Pending]]) -> bool:
        """A node's CPU cases wait until its GPUs have nothing left (docs/method.md §6: the CPU worker runs
        after the GPU workers, alone; their host threads would disturb its timings)."""
        if ident.device != CPU:
            return False
        gpus = [i for i in self.slots.values() if i.node_id == ident.node_id and i.device == GPU]
        running = any(i.node_id == ident.node_id and i.device == GPU for _, i, _ in in_flight.values())
        return bool(gpus) and (bool(self.queues.get(GPU)) or running)

    def _finish(self, journal: Journal, progress: Progress, ref, actor, ident: NodeIdentity, item: Pending) -> None:
        ray = self.ray
        try:
            entries = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                ray.exceptions.ObjectLostError) as exc:
            self._drop(ident, actor, item, exc)
            return
        records = []
        for entry in entries:
            if entry.get("type") == "record":
                rec = entry["record"]
                where: dict[str, Any] = {"node_id": ident.node_id, "hostname": ident.hostname}
                if item.lost_on:
                    where["requeued_from"] = list(item.lost_on)
                rec["meta"] = {**(rec.get("meta") or {}), "cluster": where}
                records.append(rec)
            journal.append(entry)
            if entry.get("type") == "fingerprint":
                journal.append({"type": "node", "node": {**ident.to_json(), "fingerprint": entry["fingerprint"]}})
        progress.case_done(ident.label, item.task, records)

    def _drop(self, ident: NodeIdentity, actor, item: Pending, exc: Exception) -> None:
        """The actor's call failed: its node went (or the actor process died); re-queue the case."""
        alive = any(n["NodeID"] == ident.node_id and n.get("Alive") for n in self.ray.nodes())
        why = ("node lost" if not alive else "actor died") + f": {ident.label}: {type(exc).__name__}"
        print(f"twinbench: cluster: {why}; {item.task.suite} {item.task.case_id} re-queued", file=sys.stderr)
        self.slots.pop(actor, None)  # gone already when another device of its node reported first
        self.lost.append({**ident.to_json(), "reason": why})
        item.lost_on.append(ident.node_id)
        self.queues[ident.device].appendleft(item)
        if not alive:  # the node's other devices went with it: their calls fail and re-queue their own
            for other in [a for a, i in self.slots.items() if i.node_id == ident.node_id]:
                del self.slots[other]

    def _record_unservable(self, journal: Journal, progress: Progress) -> None:
        """Cases of a kind whose every node is gone: crashed, with the reason, instead of waiting forever."""
        served = {ident.device for ident in self.slots.values()}
        for kind, queue in self.queues.items():
            if kind in served:
                continue
            lost = [entry["reason"] for entry in self.lost if entry["device"] == kind]
            why = f"{lost[-1] if lost else 'node lost'}; no other node of kind {kind} left"
            while queue:
                item = queue.popleft()
                records = []
                for impl in item.task.impls:
                    found = registry.IMPLS.get((item.task.suite, impl))
                    rec = Record.new(suite=item.task.suite, case=item.task.case_id, params=item.task.params,
                                     device=kind, fingerprint="", impl=impl, tags=found.tags if found else [],
                                     status=Status.CRASHED, reason=why,
                                     meta={"cluster": {"requeued_from": list(item.lost_on)},
                                           RUN_AGAIN_ON_RESUME: True}).to_json()
                    journal.append({"type": "record", "record": rec})
                    records.append(rec)
                progress.case_done(f"(no node)/{kind}", item.task, records)

    @contextlib.contextmanager
    def cancelled_on_error(self) -> Iterator[None]:
        """Ctrl-C, SIGTERM or an error in the driver: no actor or worker is left running on the nodes."""
        try:
            yield
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        """Kill every actor's worker, then the actors (Ctrl-C, SIGTERM, an error in the driver)."""
        refs = [actor.cancel.remote() for actor in self.slots]
        self.ray.wait(refs, num_returns=len(refs), timeout=10)
        for actor in self.slots:
            self.ray.kill(actor)

    def stop(self) -> None:
        refs = [actor.stop.remote() for actor in self.slots]
        self.ray.wait(refs, num_returns=len(refs), timeout=30)
        for actor in self.slots:
            self.ray.kill(actor)


@contextlib.contextmanager
def sigterm_noted(terminated: threading.Event) -> Iterator[None]:
    """SIGTERM only sets ``terminated`` while the driver waits on Ray: an exception raised by a handler
    inside ``ray.wait`` comes out of Ray as ``SystemExit(1)``, so the loop raises the run's own exit
    (143) itself. Outside the main thread (tests drive runs from threads) signals cannot be handled."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: terminated.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_on_cluster(options: RunOptions, cluster: ClusterOptions) -> dict[str, Any]:
    """Run the selection on the cluster; returns the results document (also ``options.out/results.json``)."""
    ray = import_ray()
    registry.load_plugins(options.plugins)
    planned = plan_tasks(options)
    kinds = device_kinds(options.devices)
    reference = {suite.name: suite.reference for suite, _ in planned}
    started_ray = not ray.is_initialized()
    if started_ray:  # before run_folder: ray.init installs its own SIGTERM handler, run_folder's must win
        try:
            ray.init(address=None if cluster.address == "local" else cluster.address, log_to_driver=False)
        except ConnectionError as exc:
            raise UsageError(f"--cluster {cluster.address}: {str(exc).splitlines()[0]}") from None
    try:
        driver = ClusterRun(options, cluster, ray)
        specs = driver.plan(kinds, explicit=bool(options.devices))
        with run_folder(options) as journal, driver.cancelled_on_error():
            driver.start_actors(specs, reference)  # before the journal's first entry: a failure leaves none
            previous = journal.read()
            prov = next((e["provenance"] for e in previous if e.get("type") == "start"), None)
            if prov is None:
                prov = provenance()
                journal.append({"type": "start", "provenance": prov})
            journal.append({"type": "cluster", "address": cluster.address, "resources": list(cluster.resources)})
            driver.run(journal, planned, kinds)
            driver.stop()
            for entry in driver.lost:
                journal.append({"type": "node_lost", "node": entry})
            doc = assemble(options.out, journal, prov)
            doc["cluster"] = cluster_section(journal.read())
            atomic_write_json(options.out / "results.json", doc)
            return doc
    finally:
        if started_ray:
            ray.shutdown()


def cluster_section(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Every node that served (its fingerprint, in full: equal ids hide different hosts) and every loss,
    over all the journal's sessions (a resumed run adds its own)."""
    nodes: dict[tuple[str, str], dict[str, Any]] = {}
    lost = []
    addresses = []
    for entry in entries:
        if entry.get("type") == "node":
            node = entry["node"]
            nodes[(node["node_id"], node["device"])] = node
        elif entry.get("type") == "node_lost":
            lost.append(entry["node"])
        elif entry.get("type") == "cluster" and entry["address"] not in addresses:
            addresses.append(entry["address"])
    return {"addresses": addresses, "nodes": list(nodes.values()), "lost": lost}
