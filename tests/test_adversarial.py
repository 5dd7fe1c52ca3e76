"""Our own adversarial sweep (issue "Hostile kernels and hostile files"), so the faults cannot come back.

Categories, by test-name prefix: ``test_kernel_*`` hostile plugin impls (tests/hostile/, one plugin per
fault, on toy suites of their own), ``test_parity_*`` parity blind spots, ``test_file_*`` hostile files and
paths, ``test_fuzz_*`` CLI argument fuzzing (hypothesis), ``test_concurrent_*`` concurrent writers. Each test
carries ``@pytest.mark.item(N)``, the issue's item number (0: a behaviour that already held).

Cost: every ``twinbench run`` subprocess this module needs is started at once by the module fixture
``runs`` (waiting on timeouts overlaps), so the whole module stays within a few minutes on 2 cores.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twinbench.harness.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
HOSTILE = ROOT / "tests" / "hostile"
# --timeout where impls hang. A worker's start has its own bound (supervisor.START_TIMEOUT_S), so this only has to
# outlast one step of a good impl at load; busy_loop burns a core for all of it, so it is kept short.
HANG_TIMEOUT = 6
NO_HANG_TIMEOUT = 25
KERNEL_PLUGINS = ("k02_state_leak", "k05_spawns_sleep", "k06_crash_with_child", "k12_wrong_shape", "k13_exit3",
                  "k16_stale_memory", "k17_stale_cache", "k18_nan_row_grad", "k19_wrong_dtype", "k22_nan_output",
                  "held_faults")
ITEM5_MARKER, ITEM6_MARKER = "hostile-item5-sleeper", "hostile-item6-child"
HTML_NAME = "<script>alert('impl')</script>"
HTML_ERROR = "<img src=x onerror=alert('exc')>"


def plugins(*names: str) -> list[str]:
    args = ["--plugin", str(HOSTILE / "hostile_suite.py")]
    for name in names:
        args += ["--plugin", str(HOSTILE / f"{name}.py")]
    return args


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


class Background:
    """A `twinbench` subprocess started now and waited for later; its output goes to files."""

    def __init__(self, args: list[str], cwd: Path, timeout: float):
        cwd.mkdir(parents=True, exist_ok=True)
        self.cwd, self.timeout, self.started = cwd, timeout, time.monotonic()
        self.stdout, self.stderr = open(cwd / "stdout.txt", "w+"), open(cwd / "stderr.txt", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "twinbench", *args], cwd=cwd, env=env(),
                                     stdout=self.stdout, stderr=self.stderr, start_new_session=True)
        self.returncode: int | None = None

    def wait(self) -> Background:
        if self.returncode is None:
            left = self.timeout - (time.monotonic() - self.started)
            try:
                self.returncode = self.proc.wait(timeout=max(left, 1))
            except subprocess.TimeoutExpired:
                kill_group(self.proc.pid)
                self.proc.wait()
                self.returncode = -999  # our own verdict: it did not finish in time
        return self

    @property
    def out(self) -> str:
        return (self.cwd / "stdout.txt").read_text()

    @property
    def err(self) -> str:
        return (self.cwd / "stderr.txt").read_text()


def kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def survivors(marker: str) -> list[psutil.Process]:
    """Processes whose command line holds the marker (our plugins put one in every helper they start)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if marker in " ".join(p.info["cmdline"] or []):
                found.append(p)
    return found


def reap(marker: str) -> list[int]:
    """Kill (by pid) what a scenario left behind, so a failing test leaves no process on the box."""
    left = survivors(marker)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    return [p.pid for p in left]


def strict_json(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def records(folder: Path) -> dict[tuple[str, str], dict]:
    doc = strict_json((folder / "results.json").read_text())
    return {(r["suite"], r["impl"]): r for r in doc["results"]}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below folder with its bytes: 'nothing written or overwritten' is equality of two of these."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(argv: list[str]) -> tuple[int, str, str]:
    """The `twinbench` command in this process; an exception escaping main is a traceback, returned as such."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse --help / --version
            code = exc.code if isinstance(exc.code, int) else 0
        except BaseException as exc:  # noqa: BLE001 - the property under test is "never a traceback"
            return -1, out.getvalue(), f"Traceback: {type(exc).__name__}: {exc}"
    return code, out.getvalue(), err.getvalue()


def assert_usage_error(code: int, err: str) -> None:
    assert code == 2, f"exit {code}: {err[-600:]}"
    assert "Traceback" not in err, err[-600:]
    assert err.count("\n") == 1 and err.startswith("twinbench: error:"), err[-600:]


def false_claims(reason: str) -> list[str]:
    """'err A > bound B' phrases in a reason where A is not above B."""
    bad = []
    for a, b in re.findall(r"err ([-+.\w]+) > bound ([-+.\w]+)", reason):
        with contextlib.suppress(ValueError):
            if not float(a) > float(b):
                bad.append(f"err {a} > bound {b}")
    return bad


# --------------------------------------------------------------------------------------------- the runs

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every `twinbench run`/`list` subprocess of the module, started together."""
    base = tmp_path_factory.mktemp("adversarial")
    kernel_impls = ["good", "state_leaker", "state_canary", "crash_with_child", "wrong_shape", "exits_3", "exits_3_quietly",
                    "backward_unwritten", "aten_backward_unwritten", "aten_empty_unwritten", "stale_cache", "wrong_dtype", "nan_output",
                    "segfaults", "aborts", "memory_error", "huge_allocation", "raises_html", HTML_NAME,
                    "wrong_grad_nan_row"]
    started = {
        # --timeout is also how long a worker may take to start: generous here, where nothing should hang
        # (only crash_with_child waits it out while item 6 is open); the hanging impls run apart, below.
        "kernels": Background(["run", "hostile", "hostile_nanrow", "--device", "cpu", "--no-timing", "--trials",
                               "1", "--timeout", str(NO_HANG_TIMEOUT), "--memory-limit-gb", "8", "--out", "out",
                               *plugins(*KERNEL_PLUGINS), *sum((["--impl", i] for i in kernel_impls), [])],
                              base / "kernels", timeout=240),
        "hangs": Background(["run", "hostile", "--device", "cpu", "--no-timing", "--trials", "1", "--timeout",
                             str(HANG_TIMEOUT), "--out", "out", "--no-report", *plugins("k05_spawns_sleep", "held_faults"),
                             "--impl", "good", "--impl", "hangs", "--impl", "busy_loop", "--impl", "spawns_sleep"],
                            base / "hangs", timeout=240),
        "checks": Background(["run", "hostile", "--device", "cpu", "--no-timing", "--timeout", str(HANG_TIMEOUT),
                              "--out", "out", "--no-report", *plugins("k03_available_hangs"), "--impl", "good",
                              "--impl", "available_hangs", "--impl", "supports_hangs", "--impl", "available_aborts"],
                             base / "checks", timeout=180),
        "list": Background(["list", "hostile", "--device", "cpu", *plugins("k03_available_hangs")],
                           base / "list", timeout=180),
        "replace": Background(["list", "attention", "--device", "cpu", "--plugin", str(HOSTILE / "k20_replaces_builtin.py")],
                              base / "replace", timeout=60),
        "timed": Background(["run", "hostile", "--device", "cpu", "--impl", "good", "--rounds", "7", "--budget",
                             "0.02", "--out", "out", "--no-report", *plugins()], base / "timed", timeout=120),
        "small": Background(["run", "hostile", "--profile", "two", "--device", "cpu", "--impl", "good",
                             "--no-timing", "--trials", "1", "--out", "out", "--no-report", *plugins()],
                            base / "small", timeout=120),
    }
    yield started
    for b in started.values():
        if b.proc.poll() is None:
            kill_group(b.proc.pid)
    for marker in (ITEM5_MARKER, ITEM6_MARKER):
        reap(marker)


@pytest.fixture(scope="module")
def kernels(runs):
    run = runs["kernels"].wait()
    assert run.returncode == 1 and (run.cwd / "out" / "results.json").exists(), run.err[-3000:]
    return records(run.cwd / "out")


@pytest.fixture(scope="module")
def hangs(runs):
    run = runs["hangs"].wait()
    assert run.returncode == 1 and (run.cwd / "out" / "results.json").exists(), run.err[-3000:]
    return records(run.cwd / "out")


@pytest.fixture(scope="module")
def timed_doc(runs):
    run = runs["timed"].wait()
    assert run.returncode == 0 and "Traceback" not in run.err, run.err[-3000:]
    return strict_json((run.cwd / "out" / "results.json").read_text())


# --------------------------------------------------------------------------------------- hostile kernels

@pytest.mark.item(0)
@pytest.mark.parametrize("name", ["kernels", "hangs", "checks", "timed"])
def test_kernel_runs_end_without_a_traceback(runs, name):
    """Exit 1 must come from the records (wrong, crashed, timeout), never from the harness itself failing."""
    run = runs[name].wait()
    assert run.returncode in (0, 1) and "Traceback" not in run.err, run.err[-3000:]


@pytest.mark.item(2)
def test_kernel_global_torch_state_does_not_leak_into_the_next_impl(kernels):
    assert kernels[("hostile", "state_leaker")]["status"] == "ok"
    canary = kernels[("hostile", "state_canary")]
    assert canary["status"] == "ok", canary["reason"]


@pytest.mark.item(3)
def test_kernel_hanging_or_aborting_availability_checks_do_not_take_the_case_down(runs):
    run = runs["checks"].wait()
    assert run.returncode in (0, 1), f"exit {run.returncode}: {run.err[-2000:]}"
    recs = records(run.cwd / "out")
    assert recs[("hostile", "reference")]["status"] == "ok"
    assert recs[("hostile", "good")]["status"] == "ok"
    for impl in ("available_hangs", "supports_hangs", "available_aborts"):
        rec = recs[("hostile", impl)]
        assert rec["status"] in ("skipped", "timeout", "crashed") and rec["reason"], (impl, rec)


@pytest.mark.item(3)
def test_kernel_list_finishes_despite_a_hanging_availability_check(runs):
    run = runs["list"].wait()
    assert run.returncode == 0, f"exit {run.returncode}: {run.err[-2000:]}"
    assert "available_hangs" in run.out and "good" in run.out


@pytest.mark.item(5)
def test_kernel_helper_processes_of_a_hung_impl_die_with_it(hangs):
    assert hangs[("hostile", "spawns_sleep")]["status"] == "timeout"
    assert reap(ITEM5_MARKER) == []


def start_run_hung_in_an_impl(tmp_path) -> subprocess.Popen:
    """`twinbench run` in its own session, returned once its worker hangs inside an impl that started a helper."""
    args = [sys.executable, "-m", "twinbench", "run", "hostile", "--device", "cpu", "--no-timing", "--out",
            str(tmp_path / "out"), "--no-report", "--impl", "spawns_sleep", *plugins("k05_spawns_sleep")]
    # SIGINT at its default, as under a terminal: a shell that runs the tests as a background job hands its
    # children SIGINT ignored, and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen(args, cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 90
    while not survivors(ITEM5_MARKER) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    return proc


@pytest.mark.item(5)
def test_kernel_ctrl_c_leaves_no_process_behind(tmp_path):
    proc = start_run_hung_in_an_impl(tmp_path)
    try:
        assert survivors(ITEM5_MARKER), "the impl never started its helper"
        family = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the command the user started
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 130, f"exit {code}: {proc.stderr.read()[-1000:] if code is not None else 'still running'}"
        time.sleep(0.5)
        alive = [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert alive == [] and survivors(ITEM5_MARKER) == [], f"left running: {alive}"
    finally:
        kill_group(proc.pid)
        reap(ITEM5_MARKER)


@pytest.mark.item(6)
def test_kernel_segfault_with_a_child_holding_the_pipe_is_a_crash_not_a_timeout(kernels):
    rec = kernels[("hostile", "crash_with_child")]
    assert rec["status"] == "crashed" and "SIGSEGV" in rec["reason"], rec["reason"]
    assert reap(ITEM6_MARKER) == []


@pytest.mark.item(12)
def test_kernel_wrong_output_shape_is_wrong_not_crashed(kernels):
    rec = kernels[("hostile", "wrong_shape")]
    assert rec["status"] == "wrong" and "shape" in rec["reason"], (rec["status"], rec["reason"])


@pytest.mark.item(13)
def test_kernel_exit_3_reasons_quote_each_workers_own_log(kernels):
    loud, quiet = kernels[("hostile", "exits_3")], kernels[("hostile", "exits_3_quietly")]
    assert loud["status"] == "crashed" and "code 3" in loud["reason"], loud["reason"]
    assert "hostile-item13-last-words" in loud["reason"], loud["reason"]
    assert quiet["status"] == "crashed" and "code 3" in quiet["reason"], quiet["reason"]
    assert "hostile-item13-last-words" not in quiet["reason"], f"quotes the dead worker's log: {quiet['reason']}"


@pytest.mark.item(0)
@pytest.mark.parametrize("impl,status,needle", [
    ("segfaults", "crashed", "SIGSEGV"), ("aborts", "crashed", "SIGABRT"), ("memory_error", "crashed", "out of memory"),
    ("huge_allocation", "crashed", "out of memory"), ("raises_html", "crashed", HTML_ERROR),
])
def test_kernel_held_each_fault_recorded_with_its_status_while_the_run_goes_on(kernels, impl, status, needle):
    rec = kernels[("hostile", impl)]
    assert rec["status"] == status and needle in rec["reason"], (rec["status"], rec["reason"])
    assert kernels[("hostile", "good")]["status"] == "ok" and kernels[("hostile", HTML_NAME)]["status"] == "ok"


@pytest.mark.item(0)
@pytest.mark.parametrize("impl", ["hangs", "busy_loop"])
def test_kernel_held_hang_and_busy_loop_are_timeouts_while_the_run_goes_on(hangs, impl):
    assert hangs[("hostile", impl)]["status"] == "timeout" and "no progress" in hangs[("hostile", impl)]["reason"]
    assert hangs[("hostile", "good")]["status"] == "ok"


@pytest.mark.item(0)
def test_kernel_held_html_in_impl_names_and_errors_is_escaped_in_every_report(runs, kernels):
    out = runs["kernels"].cwd / "out"
    for name in ("report.html", "summary.md", "junit.xml"):
        text = (out / name).read_text()
        for raw in (HTML_NAME, HTML_ERROR):
            assert raw not in text, f"{name} carries {raw} unescaped"
    ET.parse(out / "junit.xml")  # well-formed despite the markup in names and messages
    strict_json((out / "results.json").read_text())


@pytest.mark.item(20)
def test_kernel_plugin_cannot_silently_replace_a_built_in_impl(runs):
    run = runs["replace"].wait()
    said = run.err + run.out
    assert run.returncode in (0, 2) and "Traceback" not in run.err, run.err[-1000:]
    assert re.search(r"sdpa.*(already|replac|built-in|clash)|(already|replac|built-in|clash).*sdpa", said,
                     re.IGNORECASE | re.DOTALL) and (run.returncode == 0 or run.err.count("\n") == 1), said[-1500:]


# ---------------------------------------------------------------------------------- parity blind spots

@pytest.mark.item(16)
@pytest.mark.parametrize("impl", ["backward_unwritten", "aten_backward_unwritten", "aten_empty_unwritten"])
def test_parity_memory_never_written_is_caught_by_the_poison(kernels, impl):
    rec = kernels[("hostile", impl)]
    # Garbage alone can make it wrong by luck (or right, when a freed block comes back): the poison must say so.
    assert rec["status"] == "wrong" and "non-finite" in rec["reason"] and "unwritten" in rec["reason"], rec["reason"]


@pytest.mark.item(17)
def test_parity_stale_cached_output_fails_with_one_trial(kernels):
    rec = kernels[("hostile", "stale_cache")]
    assert rec["status"] == "wrong", rec


@pytest.mark.item(18)
def test_parity_gradients_of_finite_rows_are_compared_beside_a_nan_row(kernels):
    assert kernels[("hostile_nanrow", "good")]["status"] == "ok", kernels[("hostile_nanrow", "good")]["reason"]
    assert kernels[("hostile_nanrow", "wrong_grad_nan_row")]["status"] == "wrong"


@pytest.mark.item(19)
def test_parity_output_dtype_is_checked(kernels):
    rec = kernels[("hostile", "wrong_dtype")]
    assert rec["status"] == "wrong" and "dtype" in rec["reason"], (rec["status"], rec["reason"])


@pytest.mark.item(22)
@pytest.mark.parametrize("impl", ["nan_output", "backward_unwritten", "aten_backward_unwritten", "aten_empty_unwritten"])
def test_parity_a_nan_verdict_never_claims_an_error_above_its_bound_that_is_below_it(kernels, impl):
    rec = kernels[("hostile", impl)]
    assert rec["status"] == "wrong"
    assert "non-finite" in rec["reason"] or "NaN" in rec["reason"], rec["reason"]
    assert false_claims(rec["reason"]) == [], rec["reason"]


# ------------------------------------------------------------------------------- hostile files and paths

def hostile_variants(doc: dict, tmp: Path) -> dict[str, str]:
    """Broken results files as text, each something a user (or an attacker) could hand us."""
    good = json.dumps(doc)
    nan = copy.deepcopy(doc)
    nan["results"][-1]["timing"]["fwd"]["samples_ms"][0] = float("nan")
    inf = copy.deepcopy(doc)
    inf["results"][-1]["timing"]["fwd"]["median_ms"] = float("inf")
    wrong_type = copy.deepcopy(doc)
    wrong_type["results"] = {"not": "a list"}
    status = copy.deepcopy(doc)
    status["results"][0]["status"] = "<b>fine</b>"
    return {
        "empty": "",
        "truncated": good[: len(good) // 2],
        "nan_sample": json.dumps(nan),
        "infinite_median": json.dumps(inf),
        "overflowing_number": good.replace('"schema_version": 1', '"schema_version": 1e400', 1),
        "huge_integer": good.replace('"schema_version": 1', '"schema_version": ' + "9" * 5000, 1),
        "deep_nesting": "[" * 100_000 + "]" * 100_000,
        "wrong_type": json.dumps(wrong_type),
        "unknown_status": json.dumps(status),
        "not_utf8": "\udcff",
        "top_level_list": "[1, 2, 3]",
    }


def write_variant(path: Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8", "surrogateescape"))


@pytest.fixture()
def baseline_dir(timed_doc, tmp_path):
    src = tmp_path / "timed.json"
    src.write_text(json.dumps(timed_doc))
    folder = tmp_path / "baselines"
    code, _, err = cli(["baseline", "save", str(src), "--dir", str(folder)])
    assert code == 0, err
    return folder


@pytest.mark.item(0)
@pytest.mark.parametrize("variant", ["empty", "truncated", "nan_sample", "infinite_median", "overflowing_number",
                                     "huge_integer", "deep_nesting", "wrong_type", "unknown_status", "not_utf8",
                                     "top_level_list"])
def test_file_hostile_results_refused_by_every_command_with_nothing_written(timed_doc, baseline_dir, tmp_path, variant):
    bad = tmp_path / "bad.json"
    write_variant(bad, hostile_variants(timed_doc, tmp_path)[variant])
    out = tmp_path / "out"
    out.mkdir()
    before, bases = snapshot(tmp_path / "out"), snapshot(baseline_dir)
    commands = [["report", str(bad), "--out", str(out / "r.html"), "--markdown", str(out / "s.md")],
                ["baseline", "save", str(bad), "--dir", str(baseline_dir)],
                ["gate", str(bad), "--baseline", str(baseline_dir), "--out", str(out)],
                ["history", "add", str(bad), "--db", str(out / "h.sqlite")]]
    for argv in commands:
        code, _, err = cli(argv)
        assert_usage_error(code, err)
        assert snapshot(tmp_path / "out") == before and snapshot(baseline_dir) == bases, argv
    assert bad.read_bytes() == hostile_variants(timed_doc, tmp_path)[variant].encode("utf-8", "surrogateescape")


@pytest.mark.item(1)
@pytest.mark.parametrize("evil", ["../../escaped", "/ABS/escaped", "sub/dir", "..", ""])
def test_file_baseline_save_never_writes_outside_its_folder(timed_doc, tmp_path, evil):
    evil = evil.replace("/ABS", str(tmp_path / "abs"))
    doc = copy.deepcopy(timed_doc)
    (old_id, fp), = doc["fingerprints"].items()
    doc["fingerprints"] = {evil: dict(fp, id=evil)}
    for r in doc["results"]:
        r["fingerprint"] = evil
    src = tmp_path / "evil.json"
    src.write_text(json.dumps(doc))
    folder = tmp_path / "a" / "b" / "baselines"
    folder.mkdir(parents=True)
    before = snapshot(tmp_path)
    code, _, err = cli(["baseline", "save", str(src), "--dir", str(folder)])
    after = snapshot(tmp_path)
    outside = [p for p in after if p not in before and not p.startswith("a/b/baselines/")]
    assert outside == [], f"written outside the baseline folder: {outside}"
    if code != 0:
        assert_usage_error(code, err)


@pytest.mark.item(4)
def test_file_nan_timing_never_reaches_a_baseline_and_every_written_json_is_strict(timed_doc, tmp_path):
    doc = copy.deepcopy(timed_doc)
    doc["results"][-1]["timing"]["fwd"]["samples_ms"][0] = float("nan")
    doc["results"][-1]["timing"]["fwd"]["samples_ms"][1] = float("inf")
    src = tmp_path / "nan.json"
    src.write_text(json.dumps(doc))
    folder = tmp_path / "baselines"
    code, _, err = cli(["baseline", "save", str(src), "--dir", str(folder)])
    if code == 0:
        for path in folder.glob("*.json"):
            strict_json(path.read_text())
    else:
        assert_usage_error(code, err)
        assert not folder.exists() or snapshot(folder) == {}


@pytest.mark.item(8)
@pytest.mark.parametrize("where", ["file", "under_file", "proc"])
def test_file_unwritable_out_is_one_line_and_exit_2(timed_doc, tmp_path, where):
    src = tmp_path / "results.json"
    src.write_text(json.dumps(timed_doc))
    (tmp_path / "a_file").write_text("mine")
    target = {"file": tmp_path / "a_file", "under_file": tmp_path / "a_file" / "sub",
              "proc": Path("/proc/twinbench-sweep")}[where]
    before = snapshot(tmp_path)
    for argv in (["run", "hostile", "--device", "cpu", "--no-timing", "--trials", "1", "--out", str(target),
                  *plugins()],
                 ["report", str(src), "--out", str(target / "r.html")],
                 ["gate", str(src), "--baseline", str(tmp_path / "none"), "--out", str(target)],
                 ["baseline", "save", str(src), "--dir", str(target)],
                 ["history", "add", str(src), "--db", str(target / "h.sqlite")]):
        code, _, err = cli(argv)
        assert_usage_error(code, err)
        assert snapshot(tmp_path) == before, argv


@pytest.mark.item(9)
def test_file_report_onto_its_own_input_is_refused(timed_doc, tmp_path):
    src = tmp_path / "results.json"
    src.write_text(json.dumps(timed_doc))
    for flag in ("--out", "--markdown", "--junit", "--csv"):
        argv = ["report", str(src), "--out", str(tmp_path / "r.html")]
        argv = (["report", str(src), "--out", str(src)] if flag == "--out" else [*argv, flag, str(src)])
        before = snapshot(tmp_path)
        code, _, err = cli(argv)
        assert_usage_error(code, err)
        assert snapshot(tmp_path) == before, flag


@pytest.mark.item(9)
def test_file_run_into_a_folder_with_someone_elses_results_is_refused(tmp_path):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "results.json").write_text('{"theirs": true}\n')
    (out / "report.html").write_text("<p>theirs</p>")
    before = snapshot(tmp_path)
    code, _, err = cli(["run", "hostile", "--device", "cpu", "--no-timing", "--trials", "1", "--out", str(out),
                        *plugins()])
    assert_usage_error(code, err)
    assert snapshot(tmp_path) == before


BAD_NUMBERS = [("--timeout", "0"), ("--timeout", "-5"), ("--timeout", "nan"), ("--threads", "-1"), ("--threads", "0"),
               ("--memory-limit-gb", "-1"), ("--memory-limit-gb", "0"), ("--budget", "-1"), ("--trials", "0")]


@pytest.fixture(scope="module")
def bad_number_runs(tmp_path_factory):
    """One subprocess per bad number, all started together (a number not refused runs a whole worker)."""
    base = tmp_path_factory.mktemp("numbers")
    started = {}
    for option, value in BAD_NUMBERS:
        cwd = base / f"{option.strip('-')}{value}"
        started[(option, value)] = Background(["run", "hostile", "--device", "cpu", "--no-timing", "--out", "o",
                                               "--no-report", *plugins(), f"{option}={value}"], cwd, timeout=120)
    yield started
    for b in started.values():
        if b.proc.poll() is None:
            kill_group(b.proc.pid)


@pytest.mark.item(10)
@pytest.mark.parametrize("option,value", BAD_NUMBERS)
def test_file_bad_numbers_are_usage_errors(bad_number_runs, option, value):
    run = bad_number_runs[(option, value)].wait()
    assert_usage_error(run.returncode, run.err)
    assert not (run.cwd / "o").exists()


@pytest.mark.item(11)
@pytest.mark.parametrize("suite,case", [("attention", "seq_q=0"), ("attention", "head_dim=-1"),
                                        ("gating", "tokens=16.5"), ("gating", "top_k=9,experts=4"),
                                        ("gating", "norm=maybe")])
def test_file_case_values_are_validated(tmp_path, suite, case):
    code, _, err = cli(["run", suite, "--device", "cpu", "--case", case, "--out", str(tmp_path / "o")])
    assert_usage_error(code, err)
    assert not (tmp_path / "o").exists()


@pytest.mark.item(7)
def test_file_torn_journal_line_then_resume_gives_every_record(runs, tmp_path):
    small = runs["small"].wait()
    assert small.returncode == 0, small.err[-2000:]
    out = tmp_path / "out"
    shutil.copytree(small.cwd / "out", out)
    expected = set(records(out))
    lines = (out / "journal.jsonl").read_text().splitlines(keepends=True)
    last = max(i for i, line in enumerate(lines) if '"type": "record"' in line)
    torn = lines[last][: len(lines[last]) // 2]  # the kill landed mid-write: no newline
    (out / "journal.jsonl").write_text("".join(lines[:last]) + "".join(lines[last + 1:]) + torn)
    (out / "results.json").unlink()
    proc = subprocess.run([sys.executable, "-m", "twinbench", "run", "hostile", "--profile", "two", "--device",
                           "cpu", "--impl", "good", "--no-timing", "--trials", "1", "--out", str(out),
                           "--no-report", "--resume", *plugins()], cwd=tmp_path, env=env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    unreadable = []
    for line in (out / "journal.jsonl").read_text().splitlines():
        try:
            json.loads(line)
        except json.JSONDecodeError:
            unreadable.append(line)
    assert unreadable in ([], [torn]), f"resume glued entries onto the torn line: {unreadable}"
    doc = strict_json((out / "results.json").read_text())
    keys = [(r["suite"], r["case"], r["impl"]) for r in doc["results"]]
    assert len(keys) == len(set(keys)) == 4 and {(s, i) for s, _, i in keys} == expected, keys


@pytest.mark.item(15)
def test_file_history_keeps_a_different_run_with_the_same_provenance(timed_doc, tmp_path):
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(json.dumps(timed_doc))
    other = copy.deepcopy(timed_doc)
    for r in other["results"]:
        for mode in ("fwd", "fwdbwd"):
            t = (r.get("timing") or {}).get(mode)
            if t:
                t["samples_ms"] = [2 * s for s in t["samples_ms"]]
                t["median_ms"] *= 2
    second.write_text(json.dumps(other))
    db = tmp_path / "h.sqlite"
    said = [cli(["history", "add", str(p), "--db", str(db)]) for p in (first, second, first)]
    assert [c for c, _, _ in said] == [0, 0, 0], said
    assert "added" in said[1][1] and "already" not in said[1][1], said[1][1]
    assert "already" in said[2][1], said[2][1]


# ------------------------------------------------------------------------------------- concurrent writers

def spawn_cli(argv: list[str], cwd: Path) -> subprocess.Popen:
    code = f"import sys; from twinbench.harness.cli.main import main; sys.exit(main({argv!r}))"
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.item(0)
def test_concurrent_baseline_saves_and_history_adds_leave_valid_stores(timed_doc, tmp_path):
    docs = []
    for n in range(2):
        doc = copy.deepcopy(timed_doc)
        doc["provenance"]["started"] = f"2026-01-0{n + 1}T00:00:00+00:00"
        for r in doc["results"]:
            r["impl"] = f"{r['impl']}_{n}" if r["impl"] != "reference" else r["impl"]
        docs.append(tmp_path / f"doc{n}.json")
        docs[-1].write_text(json.dumps(doc))
    folder, db = tmp_path / "baselines", tmp_path / "h.sqlite"
    procs = [spawn_cli(["baseline", "save", str(d), "--dir", str(folder)], tmp_path) for d in docs]
    procs += [spawn_cli(["history", "add", str(d), "--db", str(db)], tmp_path) for d in docs]
    done = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in done), done
    files = list(folder.iterdir())
    assert len(files) == 1 and files[0].suffix == ".json", files  # no temporary file left behind
    strict_json(files[0].read_text())
    code, out, err = cli(["baseline", "show", str(files[0])])
    assert code == 0, err
    import sqlite3

    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 2


@pytest.mark.item(14)
def test_concurrent_two_resumes_into_one_folder_do_no_work_twice(tmp_path):
    out = tmp_path / "out"
    args = ["run", "hostile", "--profile", "two", "--device", "cpu", "--impl", "slow_good", "--no-timing",
            "--trials", "1", "--out", str(out), "--no-report", "--resume", *plugins("slow_good")]
    both = [Background(args, tmp_path / f"side{n}", timeout=150) for n in range(2)]
    codes = sorted(b.wait().returncode for b in both)
    assert codes in ([0, 0], [0, 2]), [(b.returncode, b.err[-800:]) for b in both]
    for b in both:
        if b.returncode == 2:
            assert_usage_error(b.returncode, b.err)
    journal = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines() if line.strip()]
    recorded = [(e["record"]["case"], e["record"]["impl"]) for e in journal if e.get("type") == "record"]
    assert len(recorded) == len(set(recorded)) == 4, sorted(recorded)
    doc = strict_json((out / "results.json").read_text())
    assert len(doc["results"]) == 4 and all(r["status"] == "ok" for r in doc["results"])


# ------------------------------------------------------------------------------------------ CLI fuzzing

HOSTILE_NUMBERS = ["-1", "0", "-5", "nan", "inf", "-inf", "1e400", "1e-300", "7", "9" * 30, "0x10", "", " ", "½"]
HOSTILE_TEXT = ["<script>alert(1)</script>", "ünï©ødé", "a\tb", "--", "-", "=", "k=v,,", "..", "../..",
                "\u202e", "x" * 300, "%s%n", "'; DROP TABLE runs; --"]


def _path_under(root: Path):
    """Paths that stay inside root: plain names, names under a file, existing files and folders."""
    names = st.sampled_from(["out", "a_file", "a_file/under", "a_dir", "results.json", "<b>x</b>.html", "ü/ñ",
                             "deep/" * 5 + "x", "a_dir/../a_dir/x", "broken.json"])
    return names.map(lambda n: str(root / n))


def _fuzz_workspace(tmp_path: Path) -> Path:
    ws = Path(tempfile.mkdtemp(prefix="fuzz-", dir=tmp_path))
    (ws / "a_file").write_text("someone's file")
    (ws / "a_dir").mkdir()
    (ws / "broken.json").write_text('{"schema_version": 1, "results": [')
    (ws / "results.json").write_text('{"schema_version": 1, "provenance": {}, "fingerprints": {}, "results": []}')
    return ws


@st.composite
def results_argv(draw, root: Path):
    value = st.one_of(st.sampled_from(HOSTILE_NUMBERS), st.sampled_from(HOSTILE_TEXT), _path_under(root))
    path = _path_under(root)
    command = draw(st.sampled_from(["report", "baseline save", "baseline show", "gate", "history add",
                                    "history show", "list", "devices", "calibrate", "bisect"]))
    options = {
        "report": ["--out", "--baseline", "--history", "--markdown", "--junit", "--csv"],
        "baseline save": ["--dir", "--device"], "baseline show": ["--dir"],
        "gate": ["--baseline", "--threshold", "--k", "--alpha", "--correction", "--test", "--out", "--confirm",
                 "--rounds", "--calibration"],
        "history add": ["--db"],
        "history show": ["--db", "--suite", "--metric", "--window", "--max-pvalue", "--min-magnitude"],
        "list": ["--device"], "devices": [],
        "calibrate": ["--comparisons", "--power-comparisons", "--slowdowns", "--modes", "--rounds", "--threshold"],
        "bisect": ["--repo", "--suite", "--impl", "--case", "--rounds", "--json", "--plugin"],
    }[command]
    argv = command.split()
    if command in ("report", "baseline save", "gate", "history add", "baseline show"):
        argv += draw(st.lists(path, min_size=0, max_size=2))
    for option in draw(st.lists(st.sampled_from(options), max_size=4)) if options else []:
        argv += [option, draw(value if not option.startswith(("--out", "--dir", "--db", "--markdown", "--junit",
                                                                "--csv", "--baseline", "--history", "--confirm",
                                                                "--calibration", "--repo", "--json",
                                                                "--plugin")) else path)]
    if command == "bisect":  # two refs that never both resolve: no worktree is ever built
        argv[1:1] = [draw(st.sampled_from(HOSTILE_TEXT)), "no-such-ref-\u00fc"]
    if command == "calibrate":
        argv += ["--comparisons", draw(st.sampled_from(["0", "-1", "nan", "x"]))]  # never a real calibration
    if command == "gate" and "--baseline" not in argv:
        argv += ["--baseline", str(root / "a_dir")]  # never `gate --against` (it would build a worktree)
    return argv


def check_cli_property(argv: list[str], root: Path) -> None:
    cwd = os.getcwd()
    os.chdir(root)  # default outputs (report.html, baselines/, history.sqlite, runs/) land in the workspace
    try:
        code, _, err = cli(argv)
    finally:
        os.chdir(cwd)
    assert code in (0, 1, 2), f"exit {code} for {argv}: {err[-800:]}"
    assert "Traceback" not in err, f"{argv}: {err[-800:]}"
    if code == 2:
        assert err.count("\n") == 1, f"{argv}: {err!r}"
    assert (root / "a_file").read_text() == "someone's file", argv


@pytest.mark.item(0)
@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_results_commands_exit_0_1_or_2_without_traceback(tmp_path, data):
    root = _fuzz_workspace(tmp_path)
    try:
        check_cli_property(data.draw(results_argv(root)), root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@st.composite
def run_argv(draw, root: Path):
    argv = ["run", draw(st.sampled_from(["hostile", "hostile", "<b>suite</b>", "ü"])), "--device",
            draw(st.sampled_from(["cpu", "cpu", "cuda:-1", "cpu:99", "<i>x</i>", ""])), "--no-timing",
            "--no-report", "--trials", draw(st.sampled_from(["1", "1", "0", "-1", "nan", "1.5"]))]
    number_options = ["--timeout", "--threads", "--memory-limit-gb", "--rounds", "--budget", "--seed"]
    for option in draw(st.lists(st.sampled_from(number_options), max_size=2)):
        value = draw(st.sampled_from(HOSTILE_NUMBERS))
        if option == "--threads" and value.lstrip("-").isdigit() and int(value) > 2:
            value = "2"  # a real huge thread count would start that many threads on a shared box
        argv += [f"{option}={value}"]
    if draw(st.booleans()):
        argv += ["--case", draw(st.sampled_from(["rows=0", "rows=-3,cols=2", "rows=1.5", "rows=<b>", "dtype=fp8",
                                                 "rows=4,cols=4", "colour=red", "=", ",,"]))]
    argv += ["--out", draw(_path_under(root)), *plugins()]
    if draw(st.booleans()):
        argv += ["--impl", draw(st.sampled_from(["good", "nosuch", HTML_NAME, ""]))]
    return argv


@pytest.mark.item(10)
@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_run_exit_0_1_or_2_without_traceback(tmp_path, data):
    root = _fuzz_workspace(tmp_path)
    try:
        check_cli_property(data.draw(run_argv(root)), root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_fuzz_property_can_fail():
    """The property checker itself: a planted traceback and a two-line usage error are both caught."""
    with pytest.raises(AssertionError):
        assert_usage_error(2, "twinbench: error: one\ntwo\n")
    with pytest.raises(AssertionError):
        assert_usage_error(-1, "Traceback: ValueError: boom")
    assert false_claims("out: err 2.38e-07 > bound 8.41e-06 (nan)") == ["err 2.38e-07 > bound 8.41e-06"]
    assert false_claims("out: err 4.02 > bound 1.7e-05") == []
    assert not math.isnan(strict_json("1.5"))
    with pytest.raises(ValueError):
        strict_json('{"x": NaN}')


@pytest.mark.item(5)
def test_a_supervisor_killed_outright_takes_its_hung_worker_with_it(tmp_path):
    """SIGKILL to `twinbench run` (a CI timeout, the OOM killer) while its worker hangs inside an impl: the
    supervisor cleans nothing up, so the worker must notice its parent is gone and end itself and its family."""
    proc = start_run_hung_in_an_impl(tmp_path)
    try:
        assert survivors(ITEM5_MARKER), "the impl never started its helper"
        family = psutil.Process(proc.pid).children(recursive=True)
        assert family, "no worker under the supervisor"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 15  # the worker polls its parent every second
        while time.monotonic() < deadline and (
                [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
                or survivors(ITEM5_MARKER)):
            time.sleep(0.2)
        alive = [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert alive == [] and survivors(ITEM5_MARKER) == [], f"orphans left running: {alive}"
    finally:
        for p in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
            p.kill()
        reap(ITEM5_MARKER)
