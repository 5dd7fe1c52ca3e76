"""Faults that already held: each is recorded with its status while the run goes on."""

import ctypes
import os
import time

import torch
from twinbench.harness.core.registry import register_impl

HTML_NAME = "<script>alert('impl')</script>"
HTML_ERROR = "<img src=x onerror=alert('exc')>"


@register_impl("hostile", "segfaults")
def segfaults(x):
    ctypes.string_at(0)


@register_impl("hostile", "aborts")
def aborts(x):
    os.abort()


@register_impl("hostile", "hangs")
def hangs(x):
    time.sleep(10_000)


@register_impl("hostile", "busy_loop")
def busy_loop(x):
    while True:
        pass


@register_impl("hostile", "memory_error")
def memory_error(x):
    raise MemoryError("hostile: cannot allocate")


@register_impl("hostile", "huge_allocation")
def huge_allocation(x):
    torch.empty(64 * 2**30, dtype=torch.uint8).fill_(1)  # far beyond --memory-limit-gb
    return x * torch.sigmoid(x)


@register_impl("hostile", "raises_html")
def raises_html(x):
    raise RuntimeError(HTML_ERROR)


@register_impl("hostile", HTML_NAME)
def html_named(x):
    return x * torch.sigmoid(x)
