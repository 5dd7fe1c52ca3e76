"""The runner survives kernels that abort, hang, segfault or exhaust memory, and resumes after a kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from twinbench.harness.store.results import load

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "tests" / "plugins" / "misbehaving.py"
TINY = "batch=1,heads=2,kv_heads=2,seq_q=16,seq_k=16,head_dim=16,causal=true,dtype=fp32"


def twinbench(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "twinbench", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def by_impl(doc):
    return {r["impl"]: r for r in doc["results"]}


@pytest.mark.slow
def test_misbehaving_impls_are_recorded_and_the_run_completes(tmp_path):
    out = tmp_path / "run"
    impls = ["aborts", "hangs", "hogs_memory", "segfaults", "raises", "sdpa"]
    proc = twinbench("run", "attention", "--device", "cpu", "--case", TINY, "--plugin", str(PLUGIN),
                     "--timeout", "15", "--no-timing", "--out", str(out), "--memory-limit-gb", "8",
                     *sum((["--impl", i] for i in impls), []))
    assert proc.returncode == 1, proc.stderr
    doc = load(out / "results.json")  # validates against the schema
    recs = by_impl(doc)
    assert recs["reference"]["status"] == "ok"
    assert recs["sdpa"]["status"] == "ok"
    assert recs["aborts"]["status"] == "crashed" and "SIGABRT" in recs["aborts"]["reason"]
    assert recs["segfaults"]["status"] == "crashed" and "SIGSEGV" in recs["segfaults"]["reason"]
    assert recs["hangs"]["status"] == "timeout" and "no progress for 15s" in recs["hangs"]["reason"]
    assert recs["hogs_memory"]["status"] == "crashed" and "out of memory" in recs["hogs_memory"]["reason"]
    assert recs["raises"]["status"] == "crashed" and "invalid device function" in recs["raises"]["reason"]
    assert doc["fingerprints"] and all(r["fingerprint"] in doc["fingerprints"] for r in doc["results"])
    assert "hangs" in proc.stdout  # the console table lists every impl


def test_run_writes_results_with_timing_and_ratios(tmp_path):
    out = tmp_path / "run"
    proc = twinbench("run", "attention", "--device", "cpu", "--case", TINY, "--impl", "sdpa",
                     "--out", str(out), "--budget", "0.5", "--no-report")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    doc = load(out / "results.json")
    recs = by_impl(doc)
    t = recs["sdpa"]["timing"]
    assert len(t["fwd"]["samples_ms"]) >= 7 and len(t["fwdbwd"]["samples_ms"]) >= 7
    ratios = t["ratio_vs_reference"]["fwdbwd"]
    assert len(ratios["samples"]) == len(t["fwdbwd"]["samples_ms"]) // 2  # one per two-round block (opposite orders)
    assert ratios["p20"] <= ratios["median"] <= ratios["p80"]
    assert recs["sdpa"]["memory"]["method"] == "rss-sampler"
    assert recs["sdpa"]["derived"]["fwd_tflops"] > 0
    fp = doc["fingerprints"][recs["sdpa"]["fingerprint"]]
    assert fp["hard"]["backend"] == "cpu" and fp["hard"]["triton_interpreter"] is True
    assert doc["ceilings"][fp["id"]]["matmul_tflops"]["fp32"] > 0
    listed = json.loads(twinbench("devices", "--json").stdout)
    assert fp["id"] in [d["fingerprint"]["id"] for d in listed]  # `devices` shows the key results carry
    assert doc["provenance"]["command"].startswith("twinbench run attention")
    assert "speedup" in proc.stdout and "sdpa" in proc.stdout


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_finished_cases(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = [sys.executable, "-m", "twinbench", "run", "attention", "--device", "cpu", "--no-timing",
            "--impl", "slow_but_right", "--plugin", str(PLUGIN), "--out", str(out), "--trials", "1"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    journal = out / "journal.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if journal.exists() and journal.read_text().count('"type": "record"') >= 2:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists()
    first = [json.loads(line)["record"] for line in journal.read_text().splitlines()
             if '"type": "record"' in line]
    assert 2 <= len(first) < 8

    again = twinbench("run", "attention", "--device", "cpu", "--no-timing", "--impl", "slow_but_right",
                      "--plugin", str(PLUGIN), "--out", str(out), "--trials", "1", "--resume")
    assert again.returncode == 0, again.stderr
    doc = load(out / "results.json")
    keys = [(r["case"], r["impl"]) for r in doc["results"]]
    assert len(keys) == len(set(keys)) == 8  # 4 quick cases x (reference, slow_but_right)
    entries = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    recorded = [(e["record"]["case"], e["record"]["impl"]) for e in entries if e.get("type") == "record"]
    done_first = {(r["case"], r["impl"]) for r in first if r["impl"] == "slow_but_right"}
    for key in done_first:  # finished before the kill: not run again
        assert recorded.count(key) == 1


def test_existing_run_is_not_overwritten_without_resume(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "journal.jsonl").write_text('{"type": "start", "provenance": {}}\n')
    proc = twinbench("run", "attention", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 2
    assert "--resume" in proc.stderr and proc.stderr.count("\n") == 1
    assert (out / "journal.jsonl").read_text() == '{"type": "start", "provenance": {}}\n'


def test_a_torn_journal_tail_is_cut_before_the_next_entry(tmp_path):
    from twinbench.harness.run.journal import Journal

    path = tmp_path / "journal.jsonl"
    whole = '{"type": "start", "provenance": {}}\n'
    torn = '{"type": "record", "rec'  # the run was killed mid-write
    fingerprint = {"type": "fingerprint", "fingerprint": {"id": "f"}, "import_failures": {}}

    planted = tmp_path / "planted.jsonl"  # the old append: the entry glues onto the fragment and is lost
    planted.write_text(whole + torn)
    with open(planted, "a") as fh:
        fh.write(json.dumps(fingerprint) + "\n")
    assert fingerprint not in Journal(planted).read()

    path.write_text(whole + torn)
    journal = Journal(path)
    assert journal.read() == [{"type": "start", "provenance": {}}]  # the fragment is ignored on read
    journal.append(fingerprint)
    journal.append({"type": "record", "record": {"impl": "x"}})
    assert journal.read() == [{"type": "start", "provenance": {}}, fingerprint,
                              {"type": "record", "record": {"impl": "x"}}]
    assert path.read_text().startswith(whole + json.dumps(fingerprint))


def test_resume_runs_again_only_the_records_that_measured_nothing():
    from twinbench.harness.run.journal import RUN_AGAIN_ON_RESUME, finished_keys

    def entry(impl: str, **meta) -> dict:
        return {"type": "record", "record": {"suite": "s", "case": "c", "impl": impl, "device": "cpu", "meta": meta}}

    entries = [{"type": "start"}, entry("crashed_on_its_own"), entry("node_lost", **{RUN_AGAIN_ON_RESUME: True})]
    keys = finished_keys(entries)
    assert {key[2] for key in keys} == {"crashed_on_its_own"}
