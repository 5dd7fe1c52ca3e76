"""Synthetic results documents for the report, gate and history tests (valid against the schema).

Every status appears, a loop suite carries a loss curve, and a planted ``<script>`` sits in an impl
name, a case id and a failure reason so the escaping of every renderer is tested.
"""

from __future__ import annotations

import copy

import numpy as np
from twinbench.harness.store.results import validate

PLANTED = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"
FP = "0000000000c0ffee"  # a fingerprint id as harness.core.devices makes them: 16 hex digits


def fingerprint(fp_id: str = FP, threads: int = 2) -> dict:
    return {"id": fp_id, "name": "cpu",
            "hard": {"backend": "cpu", "device": "Test CPU", "arch": "x86_64", "compute_units": 2,
                     "memory_gb": 24.0, "torch": "2.13.0+cpu", "cuda": "", "hip": "", "triton": "3.9.0",
                     "driver": "", "cpu": "Test CPU", "cpu_threads": threads, "timing_mode": "cpu-wallclock",
                     "triton_interpreter": True},
            "soft": {"python": "3.11", "hostname": "test", "env": {}}}


def _stats(samples: list[float], calls: int = 10) -> dict:
    a = np.asarray(samples)
    p20, p25, med, p75, p80 = np.percentile(a, [20, 25, 50, 75, 80])
    return {"samples_ms": [float(x) for x in a], "median_ms": float(med), "iqr_ms": float(p75 - p25),
            "p20_ms": float(p20), "p80_ms": float(p80), "calls_per_sample": calls}


def _ratio(ref: list[float], impl: list[float]) -> dict:
    r = np.asarray(ref) / np.asarray(impl)
    p20, med, p80 = np.percentile(r, [20, 50, 80])
    return {"samples": [float(x) for x in r], "median": float(med), "p20": float(p20), "p80": float(p80)}


def record(suite: str, case: dict, impl: str, status: str = "ok", *, reason: str = "", ms: float | None = None,
           ref_ms: float | None = None, rounds: int = 11, seed: int = 0, ratio: float = 0.5,
           tags: tuple[str, ...] = ("ours",), metrics: dict | None = None, fp: str = FP) -> dict:
    case_id = ",".join(f"{k}={v}" for k, v in case.items())
    rec = {"suite": suite, "case": case_id, "params": dict(case), "impl": impl, "device": "cpu", "fingerprint": fp,
           "tags": list(tags), "status": status, "reason": reason, "parity": None, "timing": None, "memory": None,
           "derived": None, "meta": None, "metrics": metrics, "duration_s": 0.1}
    if status in ("ok", "wrong"):
        rec["parity"] = {"ok": status == "ok", "checks": {
            "out": {"name": "out", "ok": status == "ok", "error": 1e-6 if status == "ok" else 3e-3,
                    "bound": 2e-6, "ratio": 0.5 if status == "ok" else 1500.0, "metric": "max", "detail": ""},
            "grad:x": {"name": "grad:x", "ok": True, "error": 1e-6, "bound": 4e-6, "ratio": 0.25,
                       "metric": "max", "detail": ""}}, "problems": [], "trials": 3}
    if status == "ok" and ms is not None:
        rng = np.random.default_rng(seed)
        ref = list(np.exp(rng.normal(np.log(ref_ms or ms), 0.02, rounds)))
        mine = list(np.exp(rng.normal(np.log(ms), 0.02, rounds)))
        rec["timing"] = {"mode": "cpu-wallclock", "excluded": "", "fwd": _stats(mine),
                         "fwdbwd": _stats([3 * x for x in mine]),
                         "ratio_vs_reference": {"fwd": _ratio(ref, mine), "fwdbwd": _ratio(ref, mine)},
                         "bwd_median_ms": 2 * float(np.median(mine))}
        flops = 2e6 * case.get("n", 64)
        rec["derived"] = {"fwd_tflops": flops / (np.median(mine) / 1e3) / 1e12, "fwd_pct_peak_flops": 10.0,
                          "fwd_gbps": 1e6 / (np.median(mine) / 1e3) / 1e9, "fwd_pct_peak_bw": 5.0,
                          "fwd_pct_read_bw": 7.25}
        rec["memory"] = {"peak_bytes": int(1e6 * case.get("n", 64)), "method": "test"}
    return rec


def make_doc(*, planted: bool = True, fp_id: str = FP, threads: int = 2, scale: float = 1.0,
             seed: int = 0) -> dict:
    """Two suites: 'matmul' (timed, every status) and 'loop' (a loss curve); ``scale`` slows 'fast'."""
    results = []
    for i, n in enumerate((64, 128, 256)):
        case = {"n": n, "dtype": "fp32"}
        results.append(record("matmul", case, "reference", ms=n / 64, tags=("reference",), seed=seed + i))
        results.append(record("matmul", case, "fast", ms=scale * n / 128, ref_ms=n / 64, seed=seed + 10 + i))
        results.append(record("matmul", case, "skips", "skipped", reason="needs CUDA", tags=("library",)))
    bad_case = {"n": 512, "dtype": "fp32"}
    results.append(record("matmul", bad_case, "reference", ms=8.0, tags=("reference",), seed=seed + 20))
    results.append(record("matmul", bad_case, "wrong_one", "wrong", reason="out: err 3e-3 > bound 2e-6"))
    results.append(record("matmul", bad_case, "crashy", "crashed", reason="worker died with SIGSEGV"))
    results.append(record("matmul", bad_case, "slowpoke", "timeout", reason="no progress for 600s"))
    if planted:
        results.append(record("matmul", {"n": 64, "dtype": "fp32", "tag": PLANTED}, f"evil{PLANTED}", "crashed",
                              reason=f"RuntimeError: {PLANTED} | pipes | too"))
    loss = [0.693 - 0.01 * k for k in range(20)]
    results.append(record("loop", {"steps": 20}, "reference", tags=("reference",), metrics={"loss_curve": loss}))
    results.append(record("loop", {"steps": 20}, "fused", metrics={"loss_curve": [x + 1e-6 for x in loss],
                                                                    "final_loss": loss[-1]}))
    doc = {"schema_version": 1, "tool": "twinbench test",
           "provenance": {"git_sha": "a" * 40, "git_dirty": False, "command": "twinbench run",
                          "started": "2026-12-01T00:00:00+00:00", "finished": "2026-12-01T00:01:00+00:00"},
           "fingerprints": {fp_id: fingerprint(fp_id, threads)},
           "ceilings": {fp_id: {"matmul_tflops": {"fp32": 0.06}, "copy_gbps": 30.0}},
           "results": results}
    validate(doc, "synthetic")
    return doc


def slowed(doc: dict, impl: str, factor: float) -> dict:
    """A copy where one impl's timing samples are ``factor`` times longer."""
    out = copy.deepcopy(doc)
    for rec in out["results"]:
        if rec["impl"] == impl and rec.get("timing"):
            for mode in ("fwd", "fwdbwd"):
                st = rec["timing"][mode]
                st["samples_ms"] = [x * factor for x in st["samples_ms"]]
                st["median_ms"] *= factor
    return out


# Three machines' results of the same cases, as `twinbench report` merges them for the device-by-device view.
DEVICES = (("00000000000a1100", "NVIDIA H100 80GB HBM3", "cuda:0", 1.0),
           ("00000000000a1300", "AMD Instinct MI300X", "cuda:0", 1.25),
           ("00000000000bbbbb", f"NewGPU {PLANTED}", "xpu:0", 2.0))


def device_doc(fp_id: str, model: str, device: str, scale: float, *, seed: int = 0) -> dict:
    """make_doc's results on one device of one machine; ``scale`` slows every timed impl."""
    doc = slowed(slowed(make_doc(planted=False, fp_id=fp_id, seed=seed), "fast", scale), "reference", scale)
    doc["fingerprints"][fp_id]["hard"].update(device=model, backend=device.split(":")[0])
    for rec in doc["results"]:
        rec.update(device=device, fingerprint=fp_id)
    validate(doc, "synthetic")
    return doc


def bring_up_docs() -> list[dict]:
    """H100 and MI300X (both cuda:0 on their machines) and a new GPU where one impl is wrong and one case missing."""
    docs = [device_doc(*spec, seed=i) for i, spec in enumerate(DEVICES)]
    new = docs[-1]
    for rec in new["results"]:
        if rec["impl"] == "fast" and rec["params"].get("n") == 128:
            rec.update(status="wrong", reason="out: err 0.5 > bound 2e-6", timing=None, derived=None, memory=None)
            rec["parity"]["ok"] = False
            rec["parity"]["checks"]["out"].update(ok=False, error=0.5, ratio=250000.0)
    new["results"] = [r for r in new["results"] if r["suite"] != "loop"]
    return docs
