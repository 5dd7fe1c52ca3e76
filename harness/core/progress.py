"""A heartbeat for long steps inside an impl: "still working", so the no-progress timeout does not fire.

A run worker kills a case whose impl sends nothing for ``--timeout`` seconds (600 by default): that is how
a hang is told from work (docs/method.md §6). A step that is long but alive, such as first-call autotuning
that compiles and times many kernel configurations, calls :func:`note` while it works::

    from twinbench.harness.core.progress import note

    for config in configs:
        note(f"autotune {name}: config {i + 1}/{len(configs)}")
        ...

The contract:

- ``note`` resets the worker's no-progress clock; the text is shown as the run's status line. It never
  changes whom a crash or hang is blamed on (the impl and phase the worker announced last).
- Call it at least once per ``--timeout`` while the step is alive, e.g. once per configuration tried; never
  from a loop that could itself be stuck (the heartbeat must mean progress).
- It is cheap and safe to call often and from any thread: at most one heartbeat per second leaves the
  worker, the rest are dropped.
- Outside a run worker (tests, scripts, the gate worker) it does nothing; it never raises.
- It imports only the standard library: calling it costs a kernel module nothing but this import.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

MIN_INTERVAL_S = 1.0  # heartbeats faster than this add nothing: the clock counts minutes

_sink: Callable[[str], None] | None = None
_last = 0.0
_lock = threading.Lock()


def note(text: str = "") -> None:
    """Say that the current step is making progress (see the module docstring for the contract)."""
    global _last
    sink = _sink
    if sink is None:
        return
    now = time.monotonic()
    with _lock:
        if now - _last < MIN_INTERVAL_S:
            return
        _last = now
    try:
        sink(str(text)[:200])
    except Exception:  # a heartbeat must never break the kernel that sends it
        pass


def set_sink(sink: Callable[[str], None] | None) -> None:
    """Where heartbeats go; the run worker sets this once at start (None: heartbeats are dropped)."""
    global _sink, _last
    with _lock:
        _sink, _last = sink, 0.0
