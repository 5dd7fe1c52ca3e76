"""Tests run on the CPU; Triton kernels go through the interpreter (set before any impl import)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
