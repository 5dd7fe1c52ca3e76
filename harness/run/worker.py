"""The per-device worker process: parity, interleaved timing and memory for one case at a time.

Started by :mod:`twinbench.harness.run.runner` as ``python -m twinbench.harness.run.worker`` with a JSON config. It reads tasks as JSON
lines on stdin and writes events as JSON lines to the file descriptor named in the config. Before every
risky step it announces ``begin`` (impl, phase), so when this process segfaults, aborts or hangs the
supervisor knows whom to blame. Its stdout/stderr go to a log file (libraries print).
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import time
import traceback
from dataclasses import replace
from typing import Any


class Events:
    def __init__(self, fd: int):
        self.fh = os.fdopen(fd, "w", buffering=1, encoding="utf-8")

    def send(self, kind: str, **payload: Any) -> None:
        from twinbench.harness.store.results import json_default

        self.fh.write(json.dumps({"type": kind, **payload}, default=json_default) + "\n")
        self.fh.flush()


def _limit_memory(limit_bytes: int) -> None:
    """Cap the CPU worker's address space so a runaway allocation fails here instead of the machine."""
    if limit_bytes <= 0:
        return
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    except (ImportError, ValueError, OSError):
        pass


def failure_reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:400]
    low = text.lower()
    if "out of memory" in low or "can't allocate memory" in low or "not enough memory" in low \
            or isinstance(exc, MemoryError):
        return f"out of memory: {text}"
    return text


def _device(config: dict[str, Any]):
    from twinbench.harness.core import devices

    backend = config["backend"]
    for dev in devices.detect():
        if dev.backend == backend:
            return replace(dev, name=config["device"])
    raise RuntimeError(f"worker sees no {backend} device")


def time_callables(impl, inputs, device, with_backward: bool):
    """fwd and (optionally) fwd+bwd callables over fixed inputs, as a training step would call them."""
    import torch
    from twinbench.harness.core.parity import leaves, make_grad_outputs, normalize_outputs, split_metrics

    prepared = leaves(inputs, None, None)
    leaves = [prepared.tensors[n] for n in prepared.grad]

    def fwd():
        return impl.fn(**prepared.tensors, **prepared.static)

    calls = {"fwd": fwd}
    if with_backward and leaves:
        outs = normalize_outputs(split_metrics(fwd())[0])
        grads = make_grad_outputs(outs, 0)
        names = [n for n, o in outs.items() if n in grads and o.requires_grad]

        def fwdbwd():
            o = normalize_outputs(split_metrics(fwd())[0])
            torch.autograd.grad([o[n] for n in names], leaves, grad_outputs=[grads[n] for n in names],
                                allow_unused=True)

        if names:
            calls["fwdbwd"] = fwdbwd
    return calls


def run_case(task: dict[str, Any], device, events: Events, options: dict[str, Any]) -> None:
    from twinbench.harness.core import registry
    from twinbench.harness.core.case import Case
    from twinbench.harness.core.memory import peak_memory
    from twinbench.harness.core.parity import check_parity
    from twinbench.harness.core.timing import TimingPlan, interleaved, round_ratios, timer_for

    if task["suite"] in registry.EXPERIMENTS:  # training loops: their own path (no inputs, no timing)
        from twinbench.harness.run.experiment_case import run_experiment_case

        return run_experiment_case(task, device, events, options)
    suite = registry.get_suite(task["suite"])
    case = Case.of(task["params"])
    all_impls = registry.impls_for(suite.name)
    ref = next((i for i in all_impls if i.name == suite.reference), None)
    wanted = [i for i in all_impls if i.name in task["impls"]]
    excluded = task.get("exclude", {})  # impl -> (status, reason) decided by the supervisor
    base = {"suite": suite.name, "case": case.id, "params": case.as_dict(), "device": device.name,
            "fingerprint": options["fingerprint"]}
    records: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()

    def record(impl, status: str, reason: str = "", **fields: Any) -> None:
        records[impl.name] = {**base, "impl": impl.name, "tags": list(impl.tags), "status": status,
                              "reason": reason, "parity": None, "timing": None, "memory": None,
                              "derived": None, "meta": None, "metrics": None, **fields}

    runnable = []
    for impl in wanted:
        if impl.name in excluded:
            status, reason = excluded[impl.name]
            record(impl, status, reason)
            continue
        ok, why = impl.can_run(case, device)
        if not ok:
            record(impl, "skipped", why)
        elif dtype := case.get("dtype"):
            if not device.supports_dtype(dtype):
                record(impl, "skipped", f"{device.name} cannot compute in {dtype}")
            else:
                runnable.append(impl)
        else:
            runnable.append(impl)

    if ref is None:
        for impl in runnable:
            record(impl, "skipped", f"suite {suite.name} has no reference impl {suite.reference!r}")
        runnable = []
    ref_ok, ref_why = ref.can_run(case, device) if ref else (False, "")
    if ref and not ref_ok:
        for impl in runnable:
            record(impl, "skipped", f"reference cannot run here: {ref_why}")
        runnable = []

    passed = []
    for impl in runnable:
        events.send("begin", impl=impl.name, phase="parity")
        t0 = time.perf_counter()
        try:
            verdict = check_parity(suite, impl, ref, case, device.torch_device, trials=options.get("trials"),
                                   seed=options.get("seed", 0), reference_device=options.get("reference_device"))
        except Exception as exc:
            if impl.name == ref.name:
                for other in runnable:
                    record(other, "skipped", f"reference failed: {failure_reason(exc)}")
                record(impl, "crashed", failure_reason(exc))
                passed = []
                break
            record(impl, "crashed", failure_reason(exc), meta={"traceback": traceback.format_exc()[-2000:]})
            continue
        status = "ok" if verdict.ok else "wrong"
        reason = "" if verdict.ok else _wrong_reason(verdict)
        record(impl, status, reason, parity=verdict.to_json(), metrics=verdict.metrics or None,
               duration_s=time.perf_counter() - t0)
        if verdict.ok:
            passed.append(impl)

    if options.get("timing", True) and suite.timed and ref in passed:
        _timing(suite, case, device, ref, passed, records, events, options, TimingPlan(**options["plan"]),
                interleaved, round_ratios, timer_for, peak_memory)

    meta = None
    try:
        meta = suite.make_inputs(case, "cpu", options.get("seed", 0)).meta or None
    except Exception:
        pass
    for rec in records.values():
        if meta and rec["status"] in ("ok", "wrong"):
            rec["meta"] = {**(rec["meta"] or {}), **{k: v for k, v in meta.items() if k != "metrics"}}
        rec.setdefault("duration_s", None)
        events.send("record", record=rec)
    events.send("case_done", seconds=time.perf_counter() - started)


def _wrong_reason(verdict) -> str:
    bad = [f"{n}: err {c.error:.3g} > bound {c.bound:.3g}" + (f" ({c.detail})" if c.detail else "")
           for n, c in verdict.checks.items() if not c.ok]
    return "; ".join(verdict.problems + bad)[:600]


def _timing(suite, case, device, ref, passed, records, events, options, plan, interleaved, round_ratios,
            timer_for, peak_memory) -> None:
    import torch
    from twinbench.harness.core.timing import flops_ceiling

    timer = timer_for(device)
    timed = [i for i in passed if not i.timing_excluded(device)]
    for impl in passed:
        if impl not in timed:
            records[impl.name]["timing"] = {"mode": timer.mode, "excluded": impl.timing_excluded(device)}
    if ref not in timed:
        return
    inputs = suite.make_inputs(case, device.torch_device, options.get("seed", 0))
    calls = {}
    for impl in timed:
        events.send("begin", impl=impl.name, phase="timing-setup")
        calls[impl.name] = time_callables(impl, inputs, device, impl.backward and ref.backward)
    flops = suite.flops(case) if suite.flops else {}
    nbytes = suite.bytes(case) if suite.bytes else {}
    ceilings = options.get("ceilings") or {}
    dtype = case.get("dtype", "fp32")
    per_mode: dict[str, dict[str, Any]] = {}
    for mode in ("fwd", "fwdbwd"):
        fns = {name: c[mode] for name, c in calls.items() if mode in c}
        if ref.name not in fns:
            continue
        per_mode[mode] = interleaved(timer, fns, plan,
                                     on_round=lambda n, m=mode: events.send("begin", impl=n, phase=f"time-{m}"))
    for impl in timed:
        timing: dict[str, Any] = {"mode": timer.mode, "excluded": "", "ratio_vs_reference": {}}
        derived: dict[str, float | None] = {}
        for mode, stats in per_mode.items():
            if impl.name not in stats:
                continue
            timing[mode] = stats[impl.name]
            timing["ratio_vs_reference"][mode] = _ratio(round_ratios(stats[ref.name]["samples_ms"],
                                                                     stats[impl.name]["samples_ms"]))
            seconds = stats[impl.name]["median_ms"] / 1e3
            work = flops.get("fwd", 0) + (flops.get("bwd", 0) if mode == "fwdbwd" else 0)
            moved = nbytes.get("fwd", 0) + (nbytes.get("bwd", 0) if mode == "fwdbwd" else 0)
            if work:
                derived[f"{mode}_tflops"] = work / seconds / 1e12
                peak = flops_ceiling(ceilings, dtype)
                derived[f"{mode}_pct_peak_flops"] = 100 * derived[f"{mode}_tflops"] / peak if peak else None
            if moved:
                derived[f"{mode}_gbps"] = moved / seconds / 1e9
                bw = ceilings.get("copy_gbps")
                derived[f"{mode}_pct_peak_bw"] = 100 * derived[f"{mode}_gbps"] / bw if bw else None
        if "fwd" in timing and "fwdbwd" in timing:
            timing["bwd_median_ms"] = max(0.0, timing["fwdbwd"]["median_ms"] - timing["fwd"]["median_ms"])
        records[impl.name]["timing"] = timing
        records[impl.name]["derived"] = derived or None
        events.send("begin", impl=impl.name, phase="memory")
        fn = calls[impl.name].get("fwdbwd") or calls[impl.name]["fwd"]
        try:
            records[impl.name]["memory"] = peak_memory(device, fn)
        except Exception as exc:
            records[impl.name]["memory"] = {"peak_bytes": None, "method": f"failed: {failure_reason(exc)}"}
        if device.is_gpu:
            torch.cuda.empty_cache() if device.backend in ("cuda", "rocm") else None


def _ratio(ratios: list[float]) -> dict[str, Any] | None:
    from twinbench.harness.core.timing import summarize_ratio

    return summarize_ratio(ratios) if ratios else None


def main() -> int:
    config = json.loads(sys.argv[1])
    if config["backend"] == "cpu" and config.get("triton_interpret", True):
        os.environ["TRITON_INTERPRET"] = "1"  # before any impl (and so any @triton.jit) is imported
    faulthandler.enable(file=sys.stderr, all_threads=True)
    if config["backend"] == "cpu":
        _limit_memory(int(config.get("memory_limit_bytes", 0)))
    import torch

    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    from twinbench.harness.core import devices, registry
    from twinbench.harness.core.timing import measure_ceilings

    events = Events(int(config["event_fd"]))
    registry.load_plugins(config.get("plugins", []))
    device = _device(config)
    fp = devices.fingerprint(device)
    events.send("fingerprint", fingerprint=fp, import_failures=registry.import_failures)
    ceilings = config.get("ceilings")
    if ceilings is None and config.get("measure_ceilings", True):
        events.send("begin", impl="", phase="ceilings")
        ceilings = measure_ceilings(device)
        events.send("ceilings", fingerprint=fp["id"], ceilings=ceilings)
    options = dict(config["options"], fingerprint=fp["id"], ceilings=ceilings)
    events.send("ready")
    for line in sys.stdin:
        if not line.strip():
            continue
        task = json.loads(line)
        if task.get("type") == "stop":
            break
        try:
            run_case(task, device, events, options)
        except Exception as exc:  # a suite-level failure (bad inputs factory...): report, keep serving
            events.send("case_error", reason=failure_reason(exc), traceback=traceback.format_exc()[-3000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
