"""Impls that misbehave the ways a kernel on a new GPU does: abort, hang, exhaust memory, segfault."""

import ctypes
import os
import time

import torch
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
