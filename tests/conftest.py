"""Tests run on the CPU; Triton kernels go through the interpreter (set before any impl import)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests' own `twinbench` commands must not write into a real CI job's summary or annotate it
# (tests/test_ci_output.py sets these per test).
for _variable in ("GITHUB_STEP_SUMMARY", "GITHUB_ACTIONS"):
    os.environ.pop(_variable, None)
