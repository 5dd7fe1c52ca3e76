"""Timing worker for `gate --against` and `calibrate`: serves one source tree's implementations.

Run as a script (``python /head/harness/gate/worker.py CONFIG``) with cwd and PYTHONPATH at the tree
to measure: the base commit's worktree or the working tree. Only this file comes from the head; the
suites, impls and harness it imports are the tree's own, so base and head each run their own code.
It uses only long-standing harness APIs (registry, Case, timer_for) so it can drive older commits.

Protocol: the one worker protocol of harness/run/process.py (requests on stdin, events on the pipe named
in the config; stdout and stderr go to the log). This worker loads the head's process.py by file path, so
the protocol is the head's whatever the tree: ``Ready`` (harness folder, fingerprint) once, then
``Prepare`` -> ``Prepared`` (ok, why, per_call_ms, parity) and ``Time`` -> ``Timed`` (ms per call of
``number`` calls, ``extra`` calls on top), until ``Stop``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import math
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
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


WARMUP_S = 0.05  # allocator, compilation: calls before the per-call estimate counts


@dataclass(frozen=True)
class GateWorkerConfig:
    """What the supervisor tells a gate worker (argv[1], JSON); the environment is already set (process.py)."""

    device: str
    plugins: list[str] = field(default_factory=list)
    threads: int | None = None
    cpus: list[int] | None = None  # pinned before torch starts its threads

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GateWorkerConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _module(role: str):
    return importlib.import_module(LAYOUT[role])


@functools.lru_cache(maxsize=1)
def _protocol():
    """The head's harness/run/process.py beside this file, loaded by path: never the measured tree's copy."""
    name = "_twinbench_worker_process"
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "run", "process.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the classes are created
    spec.loader.exec_module(module)
    return module


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


def _prepare(msg, device, prepared: dict[str, Any]) -> dict[str, Any]:
    """A Prepare request's reply fields."""
    registry, Case, timer_for = _module("registry"), _module("case").Case, _module("timing").timer_for
    suite = registry.SUITES.get(msg.suite)
    impl = registry.IMPLS.get((msg.suite, msg.impl))
    if suite is None or impl is None:
        return {"ok": False, "missing": True, "why": f"{msg.suite}/{msg.impl} does not exist in this tree"}
    case = Case.of(msg.params)
    ok, why = impl.can_run(case, device)
    if not ok:
        return {"ok": False, "why": f"cannot run: {why}"}
    parity = None
    if msg.parity:
        parity = _parity(suite, impl, case, device)
    fns = _callables(suite, impl, case, device, int(msg.seed))
    fn = fns.get(msg.mode)
    if fn is None:
        return {"ok": False, "why": f"no {msg.mode} path", "parity": parity}
    timer = timer_for(device)
    warm_until = time.perf_counter() + WARMUP_S
    per_call = math.inf
    while True:  # warm-up (allocator, compilation); keep the fastest single call as the estimate
        per_call = min(per_call, timer.block(fn, 1))
        if time.perf_counter() >= warm_until:
            break
    prepared[msg.key] = (timer, fn)
    return {"ok": True, "per_call_ms": per_call, "parity": parity}


def _time(msg, prepared: dict[str, Any]) -> dict[str, Any]:
    """A Time request's reply fields."""
    timer, fn = prepared[msg.key]
    number, extra = int(msg.number), int(msg.extra)
    # `extra` calls are the calibrated slowdown: the same kernel's own work, so it scales with contention.
    if msg.clock == "process" and timer.mode == "cpu-wallclock":
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
    proto = _protocol()
    proto.die_with_parent()
    raw = json.loads(sys.argv[1])
    config = GateWorkerConfig.from_json(raw)
    events = proto.EventWriter(int(raw["event_fd"]))
    if config.cpus and hasattr(os, "sched_setaffinity"):
        # Before torch starts its thread pool, so every thread inherits it (see against.shared_cpus).
        os.sched_setaffinity(0, config.cpus)
    import torch

    if config.threads:
        torch.set_num_threads(int(config.threads))
    harness, devices, registry = _module("harness"), _module("devices"), _module("registry")

    registry.load_plugins(config.plugins)
    device = devices.find(config.device)
    # Gate workers see every GPU (not narrowed), and the tree's timers may predate explicit devices: pin first.
    proto.pin_worker_device(device.torch_device)
    events.send(proto.Ready(harness=os.path.dirname(os.path.abspath(harness.__file__)),
                            fingerprint=devices.fingerprint(device)))
    prepared: dict[str, Any] = {}
    for msg in proto.requests(sys.stdin):
        reply_type = proto.Prepared if isinstance(msg, proto.Prepare) else proto.Timed
        try:
            reply = _prepare(msg, device, prepared) if isinstance(msg, proto.Prepare) else _time(msg, prepared)
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
            reply = {"ok": False, "why": text, "traceback": traceback.format_exc()[-1500:]}
        events.send(reply_type(**reply))
    return 0


if __name__ == "__main__":
    # Run as a script, Python puts this file's folder (harness/gate/) first on the path; drop it so that
    # `harness` and its modules resolve to the tree under measurement (PYTHONPATH), never to bare names.
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)
    _protocol().exit_worker(main())
