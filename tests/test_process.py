"""The one worker-process class: death reasons from the process itself, process-group kills, env policy."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest
from twinbench.harness.run import process
from twinbench.harness.run.process import (
    Begin,
    Prepared,
    Ready,
    RunCase,
    WorkerDied,
    WorkerHung,
    WorkerKind,
    WorkerProcess,
    worker_environment,
)
from twinbench.harness.store.record import Record, Status

ROOT = Path(__file__).resolve().parent.parent

# A worker that says it is ready, then misbehaves as its config's "do" says when it gets a case.
WORKER = textwrap.dedent('''
    import ctypes, json, os, subprocess, sys, time
    from twinbench.harness.run.process import Begin, EventWriter, Ready, requests

    config = json.loads(sys.argv[1])
    events = EventWriter(config["event_fd"])
    events.send(Ready())
    for request in requests(sys.stdin):
        do = config["do"]
        if do != "quiet_exit":
            print("working on", request.suite, flush=True)
        if do == "segfault":
            ctypes.string_at(0)
        elif do == "exit":
            sys.exit(3)
        elif do == "quiet_exit":
            sys.exit(5)
        elif do == "abort":
            os.abort()
        elif do == "segfault_with_a_child_holding_the_pipe":
            os.set_inheritable(config["event_fd"], True)  # as a worker before EventWriter made it private
            subprocess.Popen(["sleep", "1005"], close_fds=False)
            ctypes.string_at(0)
        elif do == "hang":
            time.sleep(10_000)
        elif do == "spawn":
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(10_000)"])
            events.send(Begin(impl="child", phase=str(child.pid)))
            time.sleep(10_000)
        elif do == "echo":
            events.send(Begin(impl=request.suite, phase="echo"))
''')


def start(tmp_path: Path, do: str) -> WorkerProcess:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = worker_environment(WorkerKind.RUN, "cpu", "cpu", root=ROOT, head_root=ROOT).env
    worker = WorkerProcess([sys.executable, str(script)], {"do": do}, cwd=ROOT, env=env,
                           log_path=tmp_path / "worker.log")
    assert isinstance(worker.next_event(60), Ready)
    worker.send(RunCase(suite="s", params={}, impls=["i"]))
    return worker


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_a_segfault_is_reported_with_its_signal_and_the_log_tail(tmp_path):
    worker = start(tmp_path, "segfault")
    with pytest.raises(WorkerDied, match=r"died with SIGSEGV \(segmentation fault\); log: .*working on s"):
        worker.next_event(60)
    worker.kill()


def test_an_exit_is_reported_with_its_code(tmp_path):
    worker = start(tmp_path, "exit")
    with pytest.raises(WorkerDied, match="exited with code 3"):
        worker.next_event(60)
    worker.kill()


def test_a_crash_is_seen_even_while_a_child_holds_the_event_pipe(tmp_path):
    """Death comes from the process, not the pipe's end: a child holding the pipe made this a 600 s timeout."""
    worker = start(tmp_path, "segfault_with_a_child_holding_the_pipe")
    t0 = time.monotonic()
    with pytest.raises(WorkerDied, match="died with SIGSEGV"):
        worker.next_event(60)
    assert time.monotonic() - t0 < 20
    worker.kill()  # and the child holding the pipe dies with the group


def test_the_log_tail_quotes_only_the_dying_worker(tmp_path):
    first = start(tmp_path, "abort")
    with pytest.raises(WorkerDied, match=r"SIGABRT.*log: .*working on s"):
        first.next_event(60)
    first.kill()
    assert "working on s" in (tmp_path / "worker.log").read_text()  # the earlier worker's lines are still there
    second = start(tmp_path, "quiet_exit")  # same log file, prints nothing before exiting
    with pytest.raises(WorkerDied) as died:
        second.next_event(60)
    second.kill()
    assert str(died.value) == f"worker exited with code 5 (log: {tmp_path / 'worker.log'})"  # nothing of the first


def test_a_hang_is_a_timeout_and_the_worker_is_killed(tmp_path):
    worker = start(tmp_path, "hang")
    t0 = time.monotonic()
    with pytest.raises(WorkerHung, match="sent nothing for 1s"):
        worker.next_event(1)
    assert time.monotonic() - t0 < 30
    assert worker.proc.poll() == -9


def test_kill_takes_the_whole_process_group(tmp_path):
    worker = start(tmp_path, "spawn")
    event = worker.next_event(60)
    assert isinstance(event, Begin) and event.impl == "child"
    child = int(event.phase)
    assert alive(child)
    worker.kill()
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child)


def test_stop_ends_a_serving_worker_cleanly(tmp_path):
    worker = start(tmp_path, "echo")
    assert worker.next_event(60) == Begin(impl="s", phase="echo")
    worker.stop()
    assert worker.proc.returncode == 0


def test_messages_round_trip_through_one_json_line():
    for message in (RunCase(suite="a", params={"n": 1}, impls=["x"], exclude={"y": ("crashed", "why")}),
                    Prepared(ok=True, per_call_ms=0.5, parity=(True, "")), Begin(impl="x", phase="parity")):
        back = process.parse(json.dumps(message.to_json()))
        assert type(back) is type(message) and back.to_json() == json.loads(json.dumps(message.to_json()))
    assert process.parse('{"type": "ready", "harness": "/h", "from_the_future": 1}') == Ready(harness="/h")


def test_the_environment_policy_per_backend_and_worker_kind(tmp_path):
    base = {"PYTHONPATH": os.pathsep.join([str(ROOT), "/elsewhere"]), "TRITON_INTERPRET": "1",
            "CUDA_VISIBLE_DEVICES": "4,6"}
    cpu = worker_environment(WorkerKind.RUN, "cpu", "cpu", root=ROOT, head_root=ROOT, base=base)
    assert cpu.env["TRITON_INTERPRET"] == "1" and cpu.threads is None and "OMP_WAIT_POLICY" not in cpu.env
    assert cpu.env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/elsewhere"]
    gpu = worker_environment(WorkerKind.RUN, "cuda", "cuda:1", root=ROOT, head_root=ROOT, base=base)
    assert "TRITON_INTERPRET" not in gpu.env and gpu.env["CUDA_VISIBLE_DEVICES"] == "6"
    asked = worker_environment(WorkerKind.RUN, "rocm", "cuda:0", root=ROOT, head_root=ROOT, base={},
                               triton_interpret=True)
    assert asked.env["TRITON_INTERPRET"] == "1" and asked.env["HIP_VISIBLE_DEVICES"] == "0"
    gate = worker_environment(WorkerKind.GATE, "cpu", "cpu", root=tmp_path, head_root=ROOT, base=base)
    assert gate.threads == 1 and gate.env["OMP_WAIT_POLICY"] == "PASSIVE"
    for worker in (gate, cpu, gpu):  # every worker: the same allocator state, no trims inside timed calls
        assert all(worker.env[var] == value for var, value in process.MALLOC_ENVIRONMENT.items())
    mine = worker_environment(WorkerKind.GATE, "cpu", "cpu", root=ROOT, head_root=ROOT,
                              base={"MALLOC_TRIM_THRESHOLD_": "0"})
    assert mine.env["MALLOC_TRIM_THRESHOLD_"] == "0"  # the user's own setting is kept
    assert gate.env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path.resolve()), "/elsewhere"]  # never the head
    gate_gpu = worker_environment(WorkerKind.GATE, "cuda", "cuda:1", root=ROOT, head_root=ROOT, base=base, threads=4)
    assert gate_gpu.env["CUDA_VISIBLE_DEVICES"] == "4,6" and gate_gpu.threads == 4


def allocation_rounds(block: int, blocks: int, warm: int, timed: int) -> str:
    """A script that allocates ``blocks`` blocks of ``block`` bytes with libc's malloc, writes and frees them,
    ``warm`` rounds and then ``timed`` rounds, and prints the page faults per timed round."""
    return textwrap.dedent(f"""
        import ctypes, resource
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        def one_round():
            taken = [libc.malloc({block}) for _ in range({blocks})]
            for b in taken:
                ctypes.memset(b, 1, {block})
            for b in taken:
                libc.free(b)
        for _ in range({warm}):
            one_round()
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range({timed}):
            one_round()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / {timed})
    """)


# Two 10 MiB blocks allocated, written and freed per round: under glibc's dynamic thresholds the heap can be
# trimmed and re-faulted every round, which is what made one gate worker twice as slow as its twin.
ALLOCATION_LOOP = allocation_rounds(10 << 20, 2, warm=5, timed=10)
# One impl's churn, then the next impl's call: 48 blocks of 2 MiB (heap, under the mmap threshold) written and
# freed, then the same again. If the frees trimmed the heap, the second round faults its pages in anew: the cost
# one impl's frees put into the next one's timed call (5-8 ms of system time on the Ice Lake VM:
# harness/run/process.py).
NEIGHBOUR_CHURN = allocation_rounds(2 << 20, 48, warm=1, timed=1)


glibc_malloc = pytest.mark.skipif(not sys.platform.startswith("linux") or os.environ.get("LD_PRELOAD"),
                                  reason="glibc's malloc variables: Linux without a preloaded allocator")


@glibc_malloc
def test_workers_reuse_freed_heap_instead_of_faulting_it_in_again():
    assert _faults_of(ALLOCATION_LOOP, process.MALLOC_ENVIRONMENT) < 50
    # planted: thresholds fixed low, every block mmapped and faulted in anew (2 x 2,560 pages): the count sees it
    assert _faults_of(ALLOCATION_LOOP, {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}) > 4000


@glibc_malloc
def test_one_impls_frees_do_not_trim_the_heap_under_the_next_call():
    assert _faults_of(NEIGHBOUR_CHURN, process.MALLOC_ENVIRONMENT) < 100
    # planted: the gate's earlier 64 MiB trim threshold hands the freed heap back, ~24,500 pages to fault again
    assert _faults_of(NEIGHBOUR_CHURN, {**process.MALLOC_ENVIRONMENT, "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}) > 4000


def _faults_of(script: str, malloc_env: dict[str, str]) -> float:
    """The number a script prints (page faults), run in a fresh Python with exactly these MALLOC_ variables."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | malloc_env
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout)


def test_a_record_serialises_to_the_schema_fields():
    schema = json.loads((ROOT / "harness" / "store" / "results.schema.json").read_text())
    record_schema = schema["$defs"]["record"]
    rec = Record.new(suite="s", case="c", params={"n": 1}, device="cpu", fingerprint="f", impl="i",
                     tags=("ours",), status="timeout", reason="no progress")
    data = rec.to_json()
    assert set(data) == set(record_schema["properties"]) and data["status"] == "timeout"
    assert set(record_schema.get("required", [])) <= set(data)
    assert {s.value for s in Status} == set(record_schema["properties"]["status"]["enum"])
    assert Record.from_json(json.loads(json.dumps(data))) == rec
