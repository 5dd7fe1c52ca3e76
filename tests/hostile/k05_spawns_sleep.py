"""Item 5: an impl that starts a helper process (in its own process group) and then hangs."""

import subprocess
import time

from twinbench.harness.core.registry import register_impl

MARKER = "hostile-item5-sleeper"


@register_impl("hostile", "spawns_sleep")
def spawns_sleep(x):
    subprocess.Popen(["/bin/sh", "-c", f"sleep 600; : {MARKER}"])
    time.sleep(10_000)
