"""Impls that misbehave the ways a kernel on a new GPU does: abort, hang, exhaust memory, segfault, and the
ways a hostile one does to its neighbours: global torch state, leftover processes, broken probes."""

import ctypes
import os
import subprocess
import time

import torch
from twinbench.harness.core.progress import note
from twinbench.harness.core.registry import register_impl
from twinbench.reference.attention import attention


@register_impl("attention", "aborts")
def aborts(q, k, v, *, causal, scale):
    os.abort()


@register_impl("attention", "hangs")
def hangs(q, k, v, *, causal, scale):
    time.sleep(10_000)


@register_impl("attention", "hogs_memory")
def hogs_memory(q, k, v, *, causal, scale):
    torch.empty(64 * 2**30, dtype=torch.uint8).fill_(1)  # 64 GiB: far beyond the worker's cap
    return attention(q, k, v, causal=causal, scale=scale)


@register_impl("attention", "segfaults")
def segfaults(q, k, v, *, causal, scale):
    ctypes.string_at(0)


@register_impl("attention", "raises")
def raises(q, k, v, *, causal, scale):
    raise RuntimeError("kernel launch failed: invalid device function")


@register_impl("attention", "slow_but_right")
def slow_but_right(q, k, v, *, causal, scale):
    time.sleep(0.3)
    return attention(q, k, v, causal=causal, scale=scale)


# --- hostile to their neighbours: global state, leftover processes, probes (tests/test_hostile_run.py) -------
# They write what they saw or started into the folder $TWINBENCH_TEST_NOTES names, one line per call.


def _note(name: str, text: str) -> None:
    folder = os.environ.get("TWINBENCH_TEST_NOTES")
    if folder:
        with open(os.path.join(folder, name), "a") as fh:
            fh.write(text + "\n")


def _sleeper(seconds: int) -> int:
    """A process in its own session (so killing the worker's process group misses it), left running."""
    return subprocess.Popen(["sleep", str(seconds)], start_new_session=True).pid


@register_impl("attention", "sets_global_state")
def sets_global_state(q, k, v, *, causal, scale):
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    return attention(q, k, v, causal=causal, scale=scale)


@register_impl("attention", "sees_threads")
def sees_threads(q, k, v, *, causal, scale):
    _note("sees_threads", f"{torch.get_num_threads()} {torch.get_default_dtype()}")
    return attention(q, k, v, causal=causal, scale=scale)


@register_impl("attention", "leaves_a_process")
def leaves_a_process(q, k, v, *, causal, scale):
    _note("leaves_a_process", str(_sleeper(1001)))
    return attention(q, k, v, causal=causal, scale=scale)


@register_impl("attention", "hangs_with_a_child")
def hangs_with_a_child(q, k, v, *, causal, scale):
    _note("hangs_with_a_child", f"{os.getpid()} {_sleeper(1003)}")
    time.sleep(10_000)


def _probe_hangs(device):
    time.sleep(10_000)
    return True, ""


def _probe_segfaults(device):
    ctypes.string_at(0)
    return True, ""


@register_impl("attention", "probe_hangs", available=_probe_hangs)
def probe_hangs(q, k, v, *, causal, scale):
    return attention(q, k, v, causal=causal, scale=scale)


@register_impl("attention", "probe_segfaults", available=_probe_segfaults)
def probe_segfaults(q, k, v, *, causal, scale):
    return attention(q, k, v, causal=causal, scale=scale)


def _long_step(heartbeats: bool) -> None:
    """About 4 s of work in three parts: longer than the tests' --timeout 3 unless it sends heartbeats."""
    for part in range(3):
        if heartbeats:
            note(f"part {part + 1}/3")
        time.sleep(1.3)


@register_impl("attention", "slow_with_heartbeats")
def slow_with_heartbeats(q, k, v, *, causal, scale):
    _long_step(heartbeats=True)
    return attention(q, k, v, causal=causal, scale=scale)


@register_impl("attention", "slow_without_heartbeats")
def slow_without_heartbeats(q, k, v, *, causal, scale):
    _long_step(heartbeats=False)
    return attention(q, k, v, causal=causal, scale=scale)
