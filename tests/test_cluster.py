"""`twinbench run --cluster`: a multi-node Ray cluster on this machine (Ray's own test utilities start one
raylet per node, each with a custom resource), a planted tiny suite spread over it, compared with the same
selection run locally; a node killed mid-run loses and doubles nothing; --resume after an interrupted run.

One cluster for the module (starting raylets is most of the cost). The node-kill tests come last: they
remove nodes.
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import threading
import time
from collections import Counter, deque
from dataclasses import replace
from pathlib import Path

import pytest
from twinbench.harness.cli.main import main
from twinbench.harness.cluster.driver import (
    CPU,
    GPU,
    ClusterOptions,
    ClusterRun,
    Pending,
    device_kinds,
    plan_slots,
    run_on_cluster,
)
from twinbench.harness.cluster.node import NodeIdentity
from twinbench.harness.core.errors import UsageError
from twinbench.harness.run import runner
from twinbench.harness.run.journal import Journal
from twinbench.harness.run.plan import RunOptions, Task
from twinbench.harness.store.results import load

NODE_RESOURCE = "twinbench_test_node"
CASES = 8
# A planted suite: 8 cases (k sets the matrix size 8 + k), a right impl, a wrong one, one that kills its
# worker on k=3, and one that holds every case from k=2 on while the hold file exists: a test holds the
# nodes, kills one (or the driver) while it is certainly mid-case, then lets the rest go.
PLUGIN = textwrap.dedent('''
    import os, signal, time
    import torch
    from twinbench.harness.core.case import Case
    from twinbench.harness.core.inputs import generator, randn
    from twinbench.harness.core.registry import Inputs, Suite, register_impl, register_suite

    def make_inputs(case, device, seed):
        gen, n = generator(seed), 8 + case["k"]
        return Inputs(tensors={"x": randn((n, n), "fp32", device, gen), "w": randn((n, n), "fp32", device, gen)},
                      grad=("x", "w"))

    register_suite(Suite(name="cluster_toy", description="y = x @ w (cluster test op)",
                         profiles={"quick": [Case.of(k=k, dtype="fp32") for k in range(%(cases)d)]},
                         make_inputs=make_inputs, reference="reference", trials=1))

    @register_impl("cluster_toy", "reference", tags=("reference",))
    def reference(x, w):
        return x @ w

    @register_impl("cluster_toy", "right", tags=("ours",))
    def right(x, w):
        return torch.mm(x, w)

    @register_impl("cluster_toy", "wrong", tags=("ours",))
    def wrong(x, w):
        return torch.mm(x, w) * 1.01

    @register_impl("cluster_toy", "held", tags=("ours",))
    def held(x, w):
        while x.shape[0] >= 10 and os.path.exists(os.environ.get("CLUSTER_TOY_HOLD", "")):
            time.sleep(0.05)
        return torch.mm(x, w)

    @register_impl("cluster_toy", "segfaults_on_k3", tags=("ours",))
    def segfaults_on_k3(x, w):
        if x.shape[0] == 11:
            os.kill(os.getpid(), signal.SIGSEGV)
        return torch.mm(x, w)
''') % {"cases": CASES}
ALL_IMPLS = ("reference", "right", "wrong", "held", "segfaults_on_k3")
# The tests after the first leave the segfault out: each restart of a worker imports torch again.
SOME_IMPLS = ("reference", "right", "wrong", "held")
IMPLS = len(SOME_IMPLS)
SOLO = "twinbench_test_solo"  # only the first node offers it: the last test kills the one node of its kind


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (no CPU: it hosts only the driver) + 2 nodes with one CPU and the test resource each."""
    ray = pytest.importorskip("ray", reason="Ray is the optional 'cluster' extra (CI installs it)")
    from ray.cluster_utils import Cluster

    plugin = tmp_path_factory.mktemp("plugin") / "cluster_toy.py"
    plugin.write_text(PLUGIN)
    hold = tmp_path_factory.mktemp("hold") / "hold"
    saved = os.environ.get("CLUSTER_TOY_HOLD")
    os.environ["CLUSTER_TOY_HOLD"] = str(hold)  # raylets, their actors and the workers inherit it
    small = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 80 * 2**20,
                                                      "include_dashboard": False})  # a process less
    nodes = [c.add_node(**small, resources={NODE_RESOURCE: 1, **({SOLO: 1} if i == 0 else {})}) for i in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c, nodes, plugin, hold
    finally:
        ray.shutdown()
        c.shutdown()
        if saved is None:
            os.environ.pop("CLUSTER_TOY_HOLD", None)
        else:
            os.environ["CLUSTER_TOY_HOLD"] = saved


def options(out: Path, plugin: Path, **over) -> RunOptions:
    base = RunOptions(suites=["cluster_toy"], devices=["cpu"], out=out, plugins=[str(plugin)], timing=False,
                      timeout=60, report=False, impls=list(SOME_IMPLS[1:]))
    return replace(base, **over)


def verdicts(doc) -> dict[tuple, str]:
    return {(r["case"], r["impl"], r["device"]): r["status"] for r in doc["results"]}


def journal_records(out: Path) -> list[dict]:
    return [e["record"] for e in Journal(out / "journal.jsonl").read() if e.get("type") == "record"]


def planned_keys(impls=SOME_IMPLS) -> set[tuple[str, str]]:
    return {(f"k={k},dtype=fp32", impl) for k in range(CASES) for impl in impls}


def exactly_once(out: Path, impls=SOME_IMPLS) -> Counter:
    counts = Counter((r["case"], r["impl"]) for r in journal_records(out))
    assert set(counts) == planned_keys(impls), "a planned (case, impl) has no record"
    assert set(counts.values()) == {1}, f"doubled: {[k for k, n in counts.items() if n > 1]}"
    return counts


def wait_for_records(out: Path, count: int, node_ids: set[str] | None = None, timeout: float = 180) -> dict:
    """The first record (of ``node_ids``' nodes, if given) once ``count`` records are in the journal."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "journal.jsonl").exists():
            records = journal_records(out)
            mine = [r for r in records if node_ids is None or r["meta"]["cluster"]["node_id"] in node_ids]
            if len(records) >= count and mine:
                return mine[0]
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} records in {out} after {timeout}s")


def in_thread(target) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def body():
        try:
            result["doc"] = target()
        except BaseException as exc:  # surfaced by the test's own assertion
            result["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, result


def test_the_exactly_once_check_catches_a_doubled_or_lost_record(tmp_path):
    """The check the node-kill tests rely on, on planted journals: one record doubled, one missing."""
    journal = Journal(tmp_path / "journal.jsonl")
    keys = sorted(planned_keys())
    for case, impl in [*keys, keys[0]]:
        journal.append({"type": "record", "record": {"case": case, "impl": impl}})
    with pytest.raises(AssertionError, match="doubled"):
        exactly_once(tmp_path)
    journal.path.unlink()
    for case, impl in keys[1:]:
        journal.append({"type": "record", "record": {"case": case, "impl": impl}})
    with pytest.raises(AssertionError, match="no record"):
        exactly_once(tmp_path)


def test_plan_slots_and_kinds_without_a_cluster():
    nodes = [
        {"NodeID": "a", "Alive": True, "Resources": {"CPU": 4, "GPU": 2, "accelerator_type:H100": 1}},
        {"NodeID": "b", "Alive": True, "Resources": {"CPU": 8}},
        {"NodeID": "c", "Alive": False, "Resources": {"CPU": 8, "GPU": 8}},
    ]
    slots = plan_slots(nodes, [CPU, GPU], ())
    assert [(s.node_id, s.kind, s.num_cpus, s.num_gpus) for s in slots] == [
        ("a", CPU, 4, 0), ("a", GPU, 0, 1), ("a", GPU, 0, 1), ("b", CPU, 8, 0)]
    assert [(s.node_id, s.kind) for s in plan_slots(nodes, [GPU], ("accelerator_type:H100",))] == [("a", GPU)] * 2
    assert device_kinds([]) == [CPU, GPU] and device_kinds(["cuda:1", "rocm", "cpu"]) == [GPU, CPU]
    with pytest.raises(UsageError, match="mps"):
        device_kinds(["mps"])


def test_a_nodes_cpu_cases_wait_for_its_gpu_cases():
    """docs/method.md §6 on a cluster: a node's CPU is timed after its GPUs are done, other nodes' CPUs not."""
    run = ClusterRun(RunOptions(), ClusterOptions("auto"), ray=None)
    gpu_node = {kind: NodeIdentity("a", "host-a", "", kind) for kind in (CPU, GPU)}
    cpu_only = NodeIdentity("b", "host-b", "", CPU)
    run.slots = {"a-cpu": gpu_node[CPU], "a-gpu": gpu_node[GPU], "b-cpu": cpu_only}
    task = Pending(Task("s", {}, "c", ["reference"]))
    run.queues = {CPU: deque([task]), GPU: deque([task])}
    assert run.cpu_waits(gpu_node[CPU], {}) and not run.cpu_waits(cpu_only, {})
    assert not run.cpu_waits(gpu_node[GPU], {})
    run.queues[GPU].clear()
    assert run.cpu_waits(gpu_node[CPU], {"ref": ("a-gpu", gpu_node[GPU], task)})  # still running there
    assert not run.cpu_waits(gpu_node[CPU], {})


def test_without_ray_a_cluster_run_is_a_usage_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` finds when the extra is not installed
    with pytest.raises(UsageError, match=r"twinbench\[cluster\]"):
        run_on_cluster(RunOptions(out=tmp_path / "run"), ClusterOptions("auto"))
    assert not (tmp_path / "run").exists()


def test_cluster_run_matches_the_local_run(cluster, tmp_path):
    c, nodes, plugin, hold = cluster
    start = time.monotonic()
    doc = run_on_cluster(options(tmp_path / "cluster", plugin, impls=[]), ClusterOptions(c.address, (NODE_RESOURCE,)))
    cluster_s = time.monotonic() - start
    start = time.monotonic()
    local = runner.run(options(tmp_path / "local", plugin, impls=[]))
    local_s = time.monotonic() - start
    load(tmp_path / "cluster" / "results.json")  # a valid results document
    assert verdicts(doc) == verdicts(local)
    assert Counter(verdicts(doc).values()) == Counter(ok=CASES * 4 - 1, wrong=CASES, crashed=1)
    crashed = next(r for r in doc["results"] if r["status"] == "crashed")
    assert crashed["impl"] == "segfaults_on_k3" and "SIGSEGV" in crashed["reason"]  # only its worker died
    exactly_once(tmp_path / "cluster", ALL_IMPLS)
    served = {r["meta"]["cluster"]["node_id"] for r in doc["results"]}
    assert len(served) >= 2 and served <= {n.node_id for n in nodes}  # spread over the nodes
    assert served <= {n["node_id"] for n in doc["cluster"]["nodes"]}  # each one's fingerprint is there
    assert all(r["fingerprint"] in doc["fingerprints"] for r in doc["results"])
    print(f"\ncluster: {len(nodes)} nodes, {CASES} cases x {len(ALL_IMPLS)} impls: {cluster_s:.1f}s; "
          f"local: {local_s:.1f}s; load {os.getloadavg()[0]:.1f}")


def test_resume_after_an_interrupted_cluster_run(cluster, tmp_path, monkeypatch, capsys):
    """Through the CLI, in this process (its Ray connection is reused): SIGTERM mid-run, then --resume."""
    c, _, plugin, hold = cluster
    out = tmp_path / "run"
    argv = ["run", "cluster_toy", "--device", "cpu", "--plugin", str(plugin), "--no-timing", "--no-report",
            "--out", str(out), "--cluster", c.address, "--cluster-resource", SOLO,  # one node, one actor
            *(arg for impl in SOME_IMPLS[1:] for arg in ("--impl", impl))]
    hold.touch()

    def interrupt():
        wait_for_records(out, IMPLS * 2)  # k=0 and k=1 done; k=2 held on the node
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=interrupt, daemon=True)
    killer.start()
    try:
        with pytest.raises(SystemExit) as stopped:
            main(argv)
    finally:
        hold.unlink()
    assert stopped.value.code == 128 + signal.SIGTERM
    before = journal_records(out)
    assert len(before) == IMPLS * 2, "interrupted mid-run, after two cases"
    assert main([*argv, "--resume"]) == 1  # the wrong impl is a failure
    exactly_once(out)
    assert journal_records(out)[:len(before)] == before  # kept, not redone
    assert len(load(out / "results.json")["results"]) == CASES * IMPLS
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    capsys.readouterr()
    assert main(["run", "cluster_toy", "--plugin", str(plugin), "--cluster-resource", SOLO,
                 "--out", str(tmp_path / "x")]) == 2
    assert "--cluster-resource needs --cluster" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_node_killed_mid_run_loses_and_doubles_nothing(cluster, tmp_path):
    c, nodes, plugin, hold = cluster
    out = tmp_path / "run"
    hold.touch()
    try:
        thread, result = in_thread(lambda: run_on_cluster(options(out, plugin),
                                                          ClusterOptions(c.address, (NODE_RESOURCE,))))
        victim = nodes[1]  # nodes[0] offers SOLO, for the last test
        wait_for_records(out, 1, {victim.node_id})
        c.remove_node(victim)  # mid-case: the driver handed it the next case, held on the node (k >= 2)
    finally:
        hold.unlink()
    thread.join(timeout=240)
    assert "doc" in result, result.get("error")
    doc = result["doc"]
    exactly_once(out)
    requeued = [r for r in doc["results"] if victim.node_id in r["meta"]["cluster"].get("requeued_from", [])]
    assert len(requeued) == IMPLS and all(r["meta"]["cluster"]["node_id"] != victim.node_id for r in requeued)
    assert Counter(verdicts(doc).values()) == Counter(ok=CASES * 3, wrong=CASES)
    assert [lost["node_id"] for lost in doc["cluster"]["lost"]] == [victim.node_id]
    assert doc["cluster"]["lost"][0]["reason"].startswith("node lost")
    print(f"\nnode kill: {len(requeued)} records re-queued from the lost node; load {os.getloadavg()[0]:.1f}")


def test_the_last_node_of_a_kind_lost_records_its_cases_with_the_reason(cluster, tmp_path):
    c, nodes, plugin, hold = cluster
    out = tmp_path / "run"
    hold.touch()
    try:
        thread, result = in_thread(lambda: run_on_cluster(options(out, plugin),
                                                          ClusterOptions(c.address, (NODE_RESOURCE, SOLO))))
        wait_for_records(out, IMPLS * 2)  # k=2 is held on the node
        c.remove_node(nodes[0])  # the only node offering SOLO
    finally:
        hold.unlink()
    thread.join(timeout=240)
    assert "doc" in result, result.get("error")
    exactly_once(out)
    lost = [r for r in result["doc"]["results"] if r["reason"].startswith("node lost")]
    assert len(lost) == (CASES - 2) * IMPLS
    assert all(r["status"] == "crashed" and "no other node of kind cpu left" in r["reason"] for r in lost)
    # Those records measured nothing: a --resume with a node of that kind back runs exactly those cases again.
    before = len(journal_records(out))
    c.add_node(num_cpus=1, object_store_memory=80 * 2**20, resources={NODE_RESOURCE: 1, SOLO: 1})
    c.wait_for_nodes()
    doc = run_on_cluster(options(out, plugin, resume=True), ClusterOptions(c.address, (NODE_RESOURCE, SOLO)))
    rerun = journal_records(out)[before:]
    assert Counter((r["case"], r["impl"]) for r in rerun) == Counter((r["case"], r["impl"]) for r in lost)
    assert Counter(verdicts(doc).values()) == Counter(ok=CASES * 3, wrong=CASES)  # last record per key wins
