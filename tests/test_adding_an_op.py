"""Adding an operation, end to end (docs/adding-an-op.md): a toy op written as files in a temporary folder.

The files import only the documented public API (``twinbench.harness.core.registry``, ``.case``, ``.inputs``)
and their own sibling module; nothing in the harness changes. ``twinbench run --plugin`` runs them in a
worker process like any built-in op: the right impls pass, a planted wrong one is recorded ``wrong``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The reference: plain and dtype-following (the harness runs it upcast as ref_hi and in the test dtype).
REFERENCE = '''
import torch


def silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)
'''

# The suite: case grid, input factory, cost model, and the reference impl (a thin wrapper).
SUITE = '''
from twinbench.harness.core.case import Case
from twinbench.harness.core.inputs import generator, randn
from twinbench.harness.core.registry import Inputs, Suite, register_impl, register_suite

from toy_silu_reference import silu


def make_inputs(case: Case, device, seed: int) -> Inputs:
    gen = generator(seed)
    x = randn((case["rows"], case["cols"]), case["dtype"], device, gen)
    return Inputs(tensors={"x": x}, grad=("x",))


register_suite(Suite(
    name="toy_silu", description="y = x * sigmoid(x) (adding-an-op test)",
    profiles={"quick": [Case.of(rows=16, cols=64, dtype="fp32"), Case.of(rows=8, cols=32, dtype="fp16")]},
    make_inputs=make_inputs, reference="reference", trials=2,
    flops=lambda case: {"fwd": 4.0 * case["rows"] * case["cols"]},
    bytes=lambda case: {"fwd": 8.0 * case["rows"] * case["cols"]},
))


@register_impl("toy_silu", "reference", tags=("reference",))
def reference(x):
    return silu(x)
'''

IMPL_FUNCTIONAL = '''
import torch.nn.functional as F

from twinbench.harness.core.registry import register_impl


@register_impl("toy_silu", "functional", tags=("library",), deterministic=True)
def functional(x):
    return F.silu(x)
'''

IMPL_EXP = '''
import torch

from twinbench.harness.core.registry import register_impl


@register_impl("toy_silu", "exp_form", tags=("ours",), available=lambda device: (True, ""))
def exp_form(x):
    return x / (1 + torch.exp(-x))
'''

# Planted: a 1% error in the sigmoid's argument, far beyond the three-way bound in fp32 and fp16.
IMPL_WRONG = '''
import torch

from twinbench.harness.core.registry import register_impl


@register_impl("toy_silu", "slightly_off", tags=("ours",))
def slightly_off(x):
    return x * torch.sigmoid(1.01 * x)
'''

FILES = {"toy_silu_reference.py": REFERENCE, "toy_silu_suite.py": SUITE, "toy_silu_functional.py": IMPL_FUNCTIONAL,
         "toy_silu_exp.py": IMPL_EXP, "toy_silu_wrong.py": IMPL_WRONG}


def _run(folder: Path, out: Path, plugins: list[str], *extra: str) -> tuple[int, list[dict]]:
    # The toy folder on PYTHONPATH stands for a vendor's installed package: the suite imports its reference
    # by name. The harness itself comes from this checkout.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(ROOT)])}
    args = [sys.executable, "-m", "twinbench", "run", "toy_silu", "--device", "cpu", "--no-report",
            "--out", str(out), *extra]
    for name in plugins:
        args += ["--plugin", str(folder / name)]
    proc = subprocess.run(args, env=env, cwd=folder, capture_output=True, text=True, timeout=120)
    assert (out / "results.json").exists(), proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.returncode, json.loads((out / "results.json").read_text())["results"]


def test_a_toy_op_from_plugin_files_runs_end_to_end(tmp_path):
    folder = tmp_path / "vendor"
    folder.mkdir()
    for name, text in FILES.items():
        (folder / name).write_text(textwrap.dedent(text).lstrip())

    code, records = _run(folder, tmp_path / "right",
                         ["toy_silu_suite.py", "toy_silu_functional.py", "toy_silu_exp.py"],
                         "--rounds", "7", "--budget", "0.05")
    assert code == 0
    by_key = {(r["case"], r["impl"]): r for r in records}
    assert set(by_key) == {(case, impl) for case in ("rows=16,cols=64,dtype=fp32", "rows=8,cols=32,dtype=fp16")
                           for impl in ("reference", "functional", "exp_form")}
    for (case, impl), r in by_key.items():
        assert (r["suite"], r["device"], r["status"]) == ("toy_silu", "cpu", "ok"), (case, impl, r["reason"])
        assert r["timing"], f"{case} {impl} was not timed"
    assert by_key[("rows=16,cols=64,dtype=fp32", "functional")]["tags"] == ["library"]

    code, records = _run(folder, tmp_path / "wrong", ["toy_silu_suite.py", "toy_silu_wrong.py"], "--no-timing")
    assert code == 1
    statuses = {(r["case"], r["impl"]): r["status"] for r in records}
    assert statuses == {("rows=16,cols=64,dtype=fp32", "reference"): "ok",
                        ("rows=16,cols=64,dtype=fp32", "slightly_off"): "wrong",
                        ("rows=8,cols=32,dtype=fp16", "reference"): "ok",
                        ("rows=8,cols=32,dtype=fp16", "slightly_off"): "wrong"}
    wrong = next(r for r in records if r["impl"] == "slightly_off")
    assert "out" in wrong["reason"] and "bound" in wrong["reason"]
