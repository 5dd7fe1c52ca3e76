"""Issue 16's planted bugs through the real command: `twinbench run fp8_linear mx_linear --plugin planted.py
--no-timing --device cpu` in a subprocess, on three --case selections, with planted impls written here (wrong
FP8 variant, E8M0 rounded up, nibble order, block boundary off by one, saturation missing) and one correct
planted impl. Each planted bug must be recorded ``wrong`` in results.json with the reason naming what broke,
and the correct one ``ok`` (the in-process judgement of the same bugs: tests/test_lowp_parity.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PLANTED = '''
import torch
from twinbench.harness.core.case import torch_dtype
from twinbench.harness.core.registry import IMPLS, register_impl
from twinbench.reference import fp8, mx
from twinbench.reference.lowp_formats import decode, encode, pack_nibbles, unpack_nibbles


def only(op, **params):
    def supports(case, device):
        ok = case["op"] == op and all(case[k] == v for k, v in params.items())
        return ok, "" if ok else "not this planted bug's case"
    return supports


@register_impl("fp8_linear", "planted_correct")
def fp8_correct(**kw):
    return IMPLS[("fp8_linear", "reference")].fn(**kw)


@register_impl("mx_linear", "planted_correct")
def mx_correct(**kw):
    return IMPLS[("mx_linear", "reference")].fn(**kw)


@register_impl("fp8_linear", "planted_wrong_variant", supports=only("gemm", x_format="e4m3fnuz"))
def wrong_variant(x_codes, x_scale, w_codes, w_scale, *, x_format, w_format, scaling, out_dtype):
    """FNUZ bytes read as OCP e4m3 (the MI300 vs MI350/RDNA4 mix-up)."""
    x = fp8.dequantize(x_codes, x_scale, "e4m3", scaling, "x")
    w = fp8.dequantize(w_codes, w_scale, "e4m3", scaling, "w")
    return (x @ w.t()).to(torch_dtype(out_dtype))


@register_impl("mx_linear", "planted_e8m0_ceil", supports=only("quantize", format="mxfp4"))
def e8m0_ceil(x, *, format):
    """The shared exponent rounded up (ceil(log2 amax)) instead of down."""
    blocks = mx._blocks(x.float(), 32)
    amax = blocks.abs().amax(dim=2)
    exponent = torch.ceil(torch.log2(amax)) - 2
    codes = encode(blocks / torch.exp2(exponent).unsqueeze(-1), "e2m1", saturate=True)
    codes = codes.reshape(x.shape[0], -1)[:, : x.shape[1]]
    return {"codes": pack_nibbles(codes), "scales": (exponent + 127).clamp(0, 254).to(torch.uint8),
            "global_scale": torch.ones(())}


def swap_nibbles(p):
    return (p >> 4) | ((p & 0x0F) << 4)


@register_impl("mx_linear", "planted_nibble_order", supports=only("gemm", format="mxfp4"))
def nibble_order(x_codes, x_scales, x_global, w_codes, w_scales, w_global, *, format, k, out_dtype):
    """The weight's packed FP4 read high nibble first."""
    y = mx.dequantize(x_codes, x_scales, x_global, format, k) @ \\
        mx.dequantize(swap_nibbles(w_codes), w_scales, w_global, format, k).t()
    return y.to(torch_dtype(out_dtype))


@register_impl("mx_linear", "planted_block_off_by_one", supports=only("gemm", format="mxfp4"))
def block_off_by_one(x_codes, x_scales, x_global, w_codes, w_scales, w_global, *, format, k, out_dtype):
    """Block scales spread over 33 elements instead of 32."""
    def deq(codes, scales, glob):
        per = (decode(scales, "e8m0") * glob.double()).repeat_interleave(33, dim=1)[:, :k]
        return decode(unpack_nibbles(codes, k), "e2m1") * per
    return (deq(x_codes, x_scales, x_global) @ deq(w_codes, w_scales, w_global).t()).to(torch_dtype(out_dtype))


@register_impl("mx_linear", "planted_no_saturation", supports=only("quantize", format="mxfp8_e4m3"))
def no_saturation(x, *, format):
    """MXFP8 e4m3 without saturation: a block's elements above 448 (the scale rule allows up to 511) become NaN."""
    q = mx.quantize(x, format)
    blocks = mx._blocks(x.float(), 32) / decode(q.scales, "e8m0").float().unsqueeze(-1)
    codes = encode(blocks, "e4m3", saturate=False).reshape(x.shape[0], -1)[:, : x.shape[1]]
    return {"codes": codes, "scales": q.scales, "global_scale": q.global_scale}
'''

# (suite, planted impl, case selector) -> words its recorded reason must hold
EXPECTED_WRONG = {
    ("fp8_linear", "planted_wrong_variant", "op=gemm"): ("out: err",),
    ("mx_linear", "planted_e8m0_ceil", "op=quantize"): ("scales:", "codes differ"),
    ("mx_linear", "planted_nibble_order", "op=gemm"): ("out: err",),
    ("mx_linear", "planted_block_off_by_one", "op=gemm"): ("out: err",),
    ("mx_linear", "planted_no_saturation", "op=quantize"): ("codes:", "stat:ulp_error", "inf/NaN codes"),
}
# keys both suites have: a match in a suite's quick grid selects it, else a new case is built from its first
CASES = ("op=gemm,m=32,n=64,k=128", "op=quantize,m=64,k=256,data=normal", "op=quantize,m=16,k=64,data=nonfinite")


def test_planted_bugs_are_recorded_wrong_by_the_real_command(tmp_path: Path):
    pytest.importorskip("torch")
    plugin = tmp_path / "planted.py"
    plugin.write_text(PLANTED)
    out = tmp_path / "run"
    impls = ["planted_correct", *sorted({impl for _, impl, _ in EXPECTED_WRONG})]
    argv = [sys.executable, "-m", "twinbench", "run", "fp8_linear", "mx_linear", "--plugin", str(plugin),
            "--no-timing", "--device", "cpu", "--no-report", "--trials", "1", "--out", str(out)]
    for case in CASES:
        argv += ["--case", case]
    for impl in impls:
        argv += ["--impl", impl]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert (out / "results.json").is_file(), done.stderr[-3000:]
    records = json.loads((out / "results.json").read_text())["results"]
    by_impl: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        by_impl.setdefault((r["suite"], r["impl"]), []).append(r)
    problems = []
    for (suite, impl, selector), words in EXPECTED_WRONG.items():
        ran = [r for r in by_impl.get((suite, impl), []) if r["status"] != "skipped"]
        if not ran or any(r["status"] != "wrong" or not r["case"].startswith(selector) for r in ran):
            problems.append(f"{suite}/{impl}: {[(r['case'], r['status']) for r in ran]}")
        problems += [f"{suite}/{impl}: reason {r['reason']!r} lacks {w!r}" for r in ran for w in words
                     if w not in r["reason"]]
    for suite in ("fp8_linear", "mx_linear"):
        correct = by_impl.get((suite, "planted_correct"), [])
        if len(correct) != len(CASES) or any(r["status"] != "ok" for r in correct):
            problems.append(f"{suite}/planted_correct: {[(r['case'], r['status'], r['reason']) for r in correct]}")
    assert problems == [], "\n".join(problems)
    assert done.returncode == 1  # parity failures: the command says so
