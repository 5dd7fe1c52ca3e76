"""Item 6: a child that inherits every descriptor (the event pipe too), then a segfault of the impl."""

import ctypes
import os
import subprocess

from twinbench.harness.core.registry import register_impl

MARKER = "hostile-item6-child"


@register_impl("hostile", "crash_with_child")
def crash_with_child(x):
    for fd in range(3, 256):
        try:
            os.set_inheritable(fd, True)
        except OSError:
            pass
    subprocess.Popen(["/bin/sh", "-c", f"sleep 600; : {MARKER}"], close_fds=False)
    ctypes.string_at(0)
