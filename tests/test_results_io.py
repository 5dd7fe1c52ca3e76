"""Small harness rules: files others can read, a ceiling that a 16-bit case cannot exceed by upcasting."""

import os
import stat

from twinbench.harness.core.timing import flops_ceiling
from twinbench.harness.store.results import atomic_write_json


def test_atomic_writes_are_readable_by_others(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_json(target, {"a": 1})
    mode = stat.S_IMODE(os.stat(target).st_mode)
    assert mode & stat.S_IRGRP and mode & stat.S_IROTH
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left behind


def test_16bit_ceiling_is_at_least_the_fp32_one():
    cpu_like = {"matmul_tflops": {"fp32": 0.2, "bf16": 0.4, "fp16": 0.001}}
    assert flops_ceiling(cpu_like, "fp16") == 0.2  # slow fp16 GEMM: kernels upcast, fp32 is the ceiling
    assert flops_ceiling(cpu_like, "bf16") == 0.4
    assert flops_ceiling(cpu_like, "fp64") == 0.2
    assert flops_ceiling({}, "fp32") is None
