"""A hostile kernel must not skew its neighbours or take a case down (the "hostile kernels" issue).

Torch state an impl changes stays with it; a probe that hangs or crashes costs only its impl (in `run` and
in `list`); nothing an impl or worker starts outlives its case or the run, on any exit path; a second run
into a locked folder is refused; a long step that sends heartbeats is not a hang. The impls live in
tests/plugins/misbehaving.py and note what they saw or started in $TWINBENCH_TEST_NOTES. Every end-to-end
run and in-process planted check runs in a child process, so the hostile plugin never enters this
process's registry.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from twinbench.harness.core import progress
from twinbench.harness.core.errors import UsageError
from twinbench.harness.run.process import descendants, kill_pids
from twinbench.harness.run.runner import locked_folder
from twinbench.harness.store.results import load

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "tests" / "plugins" / "misbehaving.py"
TINY = "batch=1,heads=2,kv_heads=2,seq_q=16,seq_k=16,head_dim=16,causal=true,dtype=fp32"


def env_with(notes: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), TWINBENCH_TEST_NOTES=str(notes))


def twinbench(notes: Path, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "twinbench", *args], capture_output=True, text=True,
                          timeout=timeout, env=env_with(notes), cwd=ROOT)


def run_args(out: Path, *impls: str, extra: tuple[str, ...] = ()) -> list[str]:
    return ["run", "attention", "--device", "cpu", "--case", TINY, "--plugin", str(PLUGIN), "--out", str(out),
            "--no-report", "--trials", "1", *extra, *sum((["--impl", i] for i in impls), [])]


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(alive(p) for p in pids)


def wait_for(path: Path, seconds: float = 120) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text()
        time.sleep(0.1)
    raise AssertionError(f"{path} never appeared")


# --- 2. torch state -------------------------------------------------------------------------------------


def test_global_state_an_impl_changes_stays_with_it_and_is_recorded(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    proc = twinbench(notes, *run_args(tmp_path / "run", "sets_global_state", "sees_threads",
                                      extra=("--threads", "2", "--budget", "0.3")))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    recs = {r["impl"]: r for r in load(tmp_path / "run" / "results.json")["results"]}
    assert recs["sets_global_state"]["state_changed"] == ["default_dtype", "threads"]
    assert recs["sees_threads"]["state_changed"] is None and recs["reference"]["state_changed"] is None
    assert recs["sees_threads"]["timing"]["fwd"]["samples_ms"]  # it was timed, interleaved with the hostile one
    seen = set((notes / "sees_threads").read_text().splitlines())
    assert seen == {"2 torch.float32"}  # parity, timing and memory calls all saw the worker's own state


# In-process run_case, first with the guard kept, then with it planted away: the same probe impl must then see
# the hostile state, which proves the end-to-end check above can fail. Both in one child process (one torch
# import); each writes its notes into its own folder and starts from the same torch state.
UNGUARDED = textwrap.dedent('''
    import contextlib, json, os, sys
    import torch
    from twinbench.harness.core import devices, registry
    from twinbench.harness.run import worker
    from twinbench.harness.run.process import RunCase, RunWorkerConfig

    registry.load_plugins([sys.argv[1]])
    device = next(d for d in devices.detect() if d.backend == "cpu")
    config = RunWorkerConfig(device="cpu", backend="cpu", trials=1,
                             plan={"rounds": 7, "block_ms": 1.0, "warmup_ms": 1.0, "budget_s": 0.1})
    ctx = worker.CaseContext(device=device, fingerprint="f", ceilings={}, config=config)

    class Events:
        def __init__(self):
            self.sent = []
        def send(self, message):
            self.sent.append(message)

    params = {"batch": 1, "heads": 2, "kv_heads": 2, "seq_q": 16, "seq_k": 16, "head_dim": 16, "causal": True,
              "dtype": "fp32"}
    recorded = {}
    for guard in ("kept", "planted"):
        if guard == "planted":  # no guard at all
            worker.StateLedger.kept = lambda self, name: contextlib.nullcontext()
            worker.StateLedger.guarded = lambda self, impl: impl
            worker.RoundKeeper.switch = lambda self, name: None
        os.environ["TWINBENCH_TEST_NOTES"] = os.path.join(sys.argv[2], guard)
        torch.set_num_threads(2)
        torch.set_default_dtype(torch.float32)
        events = Events()
        worker.run_case(RunCase(suite="attention", params=params, impls=["reference", "sets_global_state",
                                                                         "sees_threads"]), ctx, events)
        recorded[guard] = {m.record["impl"]: m.record["state_changed"] for m in events.sent if m.TYPE == "record"}
    print(json.dumps(recorded))
''')


@pytest.fixture(scope="module")
def unguarded(tmp_path_factory):
    notes = tmp_path_factory.mktemp("notes")
    for guard in ("kept", "planted"):
        (notes / guard).mkdir()
    proc = subprocess.run([sys.executable, "-c", UNGUARDED, str(PLUGIN), str(notes)], capture_output=True,
                          text=True, timeout=300, env=env_with(notes), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return notes, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("guard", ["kept", "planted"])
def test_without_the_guard_the_next_impl_sees_the_hostile_state(unguarded, guard):
    notes, recorded_by_guard = unguarded
    seen = set((notes / guard / "sees_threads").read_text().splitlines())
    recorded = recorded_by_guard[guard]
    if guard == "kept":
        assert seen == {"2 torch.float32"}
        assert recorded["sets_global_state"] == ["default_dtype", "threads"]
    else:
        assert "1 torch.float64" in seen  # the leak the guard exists for
        assert recorded["sets_global_state"] is None


# --- 3. probes ----------------------------------------------------------------------------------------------


def test_a_hanging_or_crashing_probe_costs_only_its_impl(tmp_path):
    proc = twinbench(tmp_path, *run_args(tmp_path / "run", "probe_hangs", "probe_segfaults", "sdpa",
                                         extra=("--no-timing", "--timeout", "10")))
    assert proc.returncode == 1, proc.stderr
    recs = {r["impl"]: r for r in load(tmp_path / "run" / "results.json")["results"]}
    assert recs["reference"]["status"] == "ok" and recs["sdpa"]["status"] == "ok"
    assert recs["probe_hangs"]["status"] == "timeout"
    assert recs["probe_hangs"]["reason"] == "no progress for 10s during probe"
    assert recs["probe_segfaults"]["status"] == "crashed"
    assert "SIGSEGV" in recs["probe_segfaults"]["reason"] and "(during probe)" in recs["probe_segfaults"]["reason"]


# One `twinbench list` (its main(), in a child process) whose probe_impls call is recorded: the list's table and
# the probes' own verdicts come from the same probe workers, so two tests read them without probing twice.
PROBE_AND_LIST = textwrap.dedent('''
    import contextlib, io, json, sys
    from twinbench.harness.cli.main import main
    from twinbench.harness.run import supervisor

    found = {}
    real_probe_impls = supervisor.probe_impls

    def recorded_probe_impls(*args, **kwargs):
        result = real_probe_impls(*args, **kwargs)
        found.update(result)
        return result

    supervisor.probe_impls = recorded_probe_impls  # cmd_list imports it from the module when it runs
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        code = main(["list", "attention", "--device", "cpu", "--plugin", sys.argv[1], "--timeout", sys.argv[2]])
    print(json.dumps({"code": code, "table": table.getvalue(),
                      "found": {impl: [ok, why] for (suite, impl), (ok, why) in found.items()}}))
''')


@pytest.fixture(scope="module")
def probed_list(tmp_path_factory):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", PROBE_AND_LIST, str(PLUGIN), "5"], capture_output=True, text=True,
                          timeout=400, env=env_with(tmp_path_factory.mktemp("notes")), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return time.monotonic() - t0, json.loads(proc.stdout.strip().splitlines()[-1])


def test_list_probes_are_bounded_and_blamed_on_their_impl(probed_list):
    took, listed = probed_list
    assert took < 200
    found = listed["found"]
    assert found["probe_hangs"] == [False, "probe timed out (no answer in 5s)"]
    ok, why = found["probe_segfaults"]
    assert not ok and why.startswith("probe crashed: probe worker died with SIGSEGV")
    assert found["sdpa"] == [True, ""] and found["reference"] == [True, ""]
    assert found["sees_threads"][0]  # probed by a fresh worker after both failures


@pytest.mark.slow
def test_twinbench_list_returns_with_a_hanging_probe(probed_list):
    _, listed = probed_list
    assert listed["code"] == 0, listed["table"][-2000:]
    lines = {line.split("│")[2].strip(): line for line in listed["table"].splitlines() if line.count("│") >= 4}
    assert "probe timed out" in lines["probe_hangs"] and "probe crashed" in lines["probe_segfaults"]
    assert "yes" in lines["sdpa"]


# --- 5. orphans ---------------------------------------------------------------------------------------------


def test_a_process_an_impl_leaves_behind_dies_with_its_case(tmp_path):
    proc = twinbench(tmp_path, *run_args(tmp_path / "run", "leaves_a_process", extra=("--no-timing",)))
    assert proc.returncode == 0, proc.stderr
    pids = [int(p) for p in (tmp_path / "leaves_a_process").read_text().split()]
    assert pids  # one per call: the parity run and its stability rerun
    assert gone_within(pids, 10)


def test_leftovers_are_found_outside_the_process_group(tmp_path):
    """A child in its own session escapes killpg; the /proc walk still finds it (and only while it is ours)."""
    child = subprocess.Popen(["sleep", "1004"], start_new_session=True)
    try:
        assert os.getpgid(child.pid) != os.getpgid(0)  # what a process-group kill alone would miss
        assert child.pid in descendants(os.getpid())
        kill_pids([child.pid])
        child.wait(timeout=10)
        assert child.pid not in descendants(os.getpid())
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_leaves_no_worker_or_child_behind(tmp_path, sig):
    notes = tmp_path / "notes"
    notes.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "twinbench",
                             *run_args(tmp_path / "run", "hangs_with_a_child", extra=("--no-timing",))],
                            cwd=ROOT, env=env_with(notes), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as under a terminal
    try:
        worker, child = (int(p) for p in wait_for(notes / "hangs_with_a_child").split())
        assert alive(worker) and alive(child)
        os.kill(proc.pid, sig)  # the run only: its workers sit in their own sessions, as under a terminal
        proc.wait(timeout=30)
        assert proc.returncode in (130, 128 + signal.SIGTERM)
        assert gone_within([worker, child], 10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- 14. one run per folder -------------------------------------------------------------------------------


def test_a_second_run_into_a_locked_folder_is_refused(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "twinbench",
                              *run_args(out, "hangs_with_a_child", extra=("--no-timing",))],
                             cwd=ROOT, env=env_with(notes), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        wait_for(notes / "hangs_with_a_child")
        before = (out / "journal.jsonl").read_bytes()
        second = twinbench(notes, *run_args(out, "hangs_with_a_child", extra=("--no-timing", "--resume")))
        assert second.returncode == 2
        assert second.stderr.count("\n") == 1 and "another twinbench run is writing to" in second.stderr
        assert (out / "journal.jsonl").read_bytes() == before  # nothing written by the refused run
    finally:
        os.kill(first.pid, signal.SIGTERM)
        first.wait(timeout=30)


def test_the_folder_lock_is_exclusive_and_released(tmp_path):
    with locked_folder(tmp_path):
        with pytest.raises(UsageError, match="another twinbench run"):
            with locked_folder(tmp_path):
                pass
    with locked_folder(tmp_path):  # released on exit
        pass


# --- 8. heartbeats ------------------------------------------------------------------------------------------


def test_note_is_a_rate_limited_no_op_outside_a_worker():
    progress.set_sink(None)
    progress.note("nobody listens")  # no sink: nothing happens, nothing raises
    got: list[str] = []
    progress.set_sink(got.append)
    try:
        for i in range(5):
            progress.note(f"config {i}")
        assert got == ["config 0"]  # the rest fall inside MIN_INTERVAL_S
        progress.set_sink(lambda text: 1 / 0)
        progress.note("a broken sink never reaches the kernel")
    finally:
        progress.set_sink(None)


def test_heartbeats_keep_a_long_step_from_being_a_hang(tmp_path):
    proc = twinbench(tmp_path, *run_args(tmp_path / "run", "slow_with_heartbeats", "slow_without_heartbeats",
                                         extra=("--no-timing", "--timeout", "3")))
    recs = {r["impl"]: r for r in load(tmp_path / "run" / "results.json")["results"]}
    assert recs["slow_with_heartbeats"]["status"] == "ok", recs["slow_with_heartbeats"]["reason"]
    assert recs["slow_without_heartbeats"]["status"] == "timeout"  # the same step, silent: a hang
    assert proc.returncode == 1
