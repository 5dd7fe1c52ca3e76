"""Timing worker for `gate --against` and `calibrate`: serves one source tree's implementations.

Run as a script (``python /head/harness/gate/worker.py CONFIG``) with cwd and PYTHONPATH at the tree
to measure: the base commit's worktree or the working tree. Only this file comes from the head; the
suites, impls and harness it imports are the tree's own, so base and head each run their own code.
It uses only long-standing harness APIs (registry, Case, timer_for) so it can drive older commits.

Protocol: JSON lines on stdin, JSON replies on the original stdout (library prints go to stderr).
  {"op": "prepare", "key", "suite", "params", "impl", "mode", "seed", "parity"} -> {"ok", "why", "per_call_ms"}
  {"op": "time", "key", "number", "extra", "clock"} -> {"ok", "ms"}  # ms per call of `number` (+`extra`) calls
  {"op": "stop"}
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import time
import traceback
from typing import Any

# The tree's own modules by role. Trees from before the layered layout (docs/architecture.md) kept the
# engine in a top-level `harness` package; `gate --against` such a commit still drives it.
LAYOUTS = {
    "layered": {"harness": "twinbench.harness", "registry": "twinbench.harness.core.registry",
                "case": "twinbench.harness.core.case", "timing": "twinbench.harness.core.timing",
                "parity": "twinbench.harness.core.parity", "devices": "twinbench.harness.core.devices",
                "worker": "twinbench.harness.run.worker"},
    "flat": {"harness": "harness", "registry": "harness.registry", "case": "harness.case",
             "timing": "harness.timing", "parity": "harness.parity", "devices": "harness.devices",
             "worker": "harness.worker"},
}
LAYOUT = LAYOUTS["layered"]


def tree_layout(root: str) -> dict[str, str]:
    """Which layout the tree at ``root`` has: its `twinbench` package marks the layered one."""
    return LAYOUTS["layered" if os.path.isfile(os.path.join(root, "twinbench", "__init__.py")) else "flat"]


def _module(role: str):
    return importlib.import_module(LAYOUT[role])


def _reply(proto, **payload: Any) -> None:
    proto.write(json.dumps(payload) + "\n")
    proto.flush()


def _callables(suite, impl, case, device, seed: int) -> dict[str, Any]:
    inputs = suite.make_inputs(case, device.torch_device, seed)
    try:
        worker = _module("worker")
    except ImportError:
        worker = None
    # The helper's name in this layout and in trees before it; a tree without it is timed forward only.
    helper = getattr(worker, "time_callables", None) or getattr(worker, "_time_callables", None)
    if helper is None:
        return {"fwd": lambda: impl.fn(**inputs.tensors, **inputs.static)}
    return helper(impl, inputs, device, impl.backward)


def _parity(suite, impl, case, device) -> tuple[bool, str]:
    registry, check_parity = _module("registry"), _module("parity").check_parity
    ref = registry.IMPLS[(suite.name, suite.reference)]
    verdict = check_parity(suite, impl, ref, case, device.torch_device)
    if verdict.ok:
        return True, ""
    bad = [f"{n}: err {c.error:.3g} > bound {c.bound:.3g}" for n, c in verdict.checks.items() if not c.ok]
    return False, "; ".join(list(verdict.problems) + bad)[:600]


def _prepare(msg: dict[str, Any], device, prepared: dict[str, Any]) -> dict[str, Any]:
    registry, Case, timer_for = _module("registry"), _module("case").Case, _module("timing").timer_for
    suite = registry.SUITES.get(msg["suite"])
    impl = registry.IMPLS.get((msg["suite"], msg["impl"]))
    if suite is None or impl is None:
        return {"ok": False, "missing": True, "why": f"{msg['suite']}/{msg['impl']} does not exist in this tree"}
    case = Case.of(msg["params"])
    ok, why = impl.can_run(case, device)
    if not ok:
        return {"ok": False, "why": f"cannot run: {why}"}
    parity = None
    if msg.get("parity"):
        parity = _parity(suite, impl, case, device)
    fns = _callables(suite, impl, case, device, int(msg.get("seed", 0)))
    fn = fns.get(msg["mode"])
    if fn is None:
        return {"ok": False, "why": f"no {msg['mode']} path", "parity": parity}
    timer = timer_for(device)
    warm_until = time.perf_counter() + float(msg.get("warmup_s", 0.05))
    per_call = math.inf
    while True:  # warm-up (allocator, compilation); keep the fastest single call as the estimate
        per_call = min(per_call, timer.block(fn, 1))
        if time.perf_counter() >= warm_until:
            break
    prepared[msg["key"]] = (timer, fn)
    return {"ok": True, "per_call_ms": per_call, "parity": parity}


def _time(msg: dict[str, Any], prepared: dict[str, Any]) -> dict[str, Any]:
    timer, fn = prepared[msg["key"]]
    number, extra = int(msg["number"]), int(msg.get("extra", 0))
    # `extra` calls are the calibrated slowdown: the same kernel's own work, so it scales with contention.
    if msg.get("clock") == "process" and timer.mode == "cpu-wallclock":
        # CPU time of this process: time spent descheduled on a shared box does not count.
        start = time.process_time()
        for _ in range(number + extra):
            fn()
        return {"ok": True, "ms": (time.process_time() - start) * 1e3 / number}
    ms = timer.block(fn, number + extra) * (number + extra) / number
    return {"ok": True, "ms": ms}


def main() -> int:
    global LAYOUT
    LAYOUT = tree_layout(os.getcwd())
    proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    config = json.loads(sys.argv[1])
    if config.get("cpus") and hasattr(os, "sched_setaffinity"):
        # Before torch starts its thread pool, so every thread inherits it (see gate_against.shared_cpus).
        os.sched_setaffinity(0, config["cpus"])
    if config["backend"] == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # as the run worker: before any impl is imported
    import torch

    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    harness, devices, registry = _module("harness"), _module("devices"), _module("registry")

    registry.load_plugins(config.get("plugins", []))
    device = devices.find(config["device"])
    _reply(proto, ok=True, ready=True, harness=os.path.dirname(os.path.abspath(harness.__file__)),
           fingerprint=devices.fingerprint(device))
    prepared: dict[str, Any] = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        if msg["op"] == "stop":
            break
        try:
            reply = _prepare(msg, device, prepared) if msg["op"] == "prepare" else _time(msg, prepared)
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
            reply = {"ok": False, "why": text, "traceback": traceback.format_exc()[-1500:]}
        _reply(proto, **reply)
    return 0


if __name__ == "__main__":
    # Run as a script, Python puts this file's folder (harness/gate/) first on the path; drop it so that
    # `harness` and its modules resolve to the tree under measurement (PYTHONPATH), never to bare names.
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)
    sys.exit(main())
