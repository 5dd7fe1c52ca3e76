"""Microscaling linear: MXFP8 / MXFP4 (OCP MX v1.0) and NVFP4 quantise and GEMM (reference/mx.py).

Two operations (the ``op`` parameter):

- ``gemm``: ``y = deq(x) @ deq(w).T`` from the reference quantiser's codes. Inputs ``x_codes`` (uint8; FP4
  packed two per byte, element 2i in the low nibble: (M, ceil(K/2))), ``x_scales`` (uint8: E8M0 for MX, E4M3
  for NVFP4; (M, ceil(K/block))), ``x_global`` (fp32 ``()``: NVFP4's per-tensor scale, 1 for MX formats, which
  have none), the same three for ``w`` (N x K); static ``format``, ``k``, ``out_dtype``.
- ``quantize``: ``x`` (case dtype) -> ``{"codes", "scales", "global_scale"}``; codes and scale codes are
  compared bit for bit, the global scale by the rule, and the values' error against fp64 is judged against
  the format's bound (``quantizer_statistics``, docs/low_precision.md §Parity).

Parity as fp8_linear (docs/low_precision.md): the dequantised operands are exact in fp64, so the three-way
rule judges the GEMM (``ref_hi`` fp64, ``ref_lo`` fp32 accumulation rounded to the output dtype).
Traps (``data``, suites/fp8_linear.py ``draw``): ``zero_block`` (amax 0: scale code 0, zero codes),
``nonfinite`` (a NaN scale, the block all NaN), ``outliers`` (one block's large value costs only that block),
``tiny``/``huge`` (the E8M0 exponent clamps at 2^-127 / E4M3 block scales saturate); ``k`` not a multiple of
the block (a partial last block) and odd (a padding nibble).
"""

from __future__ import annotations

import torch
from twinbench.harness.core.case import Case, Param, torch_dtype
from twinbench.harness.core.devices import lowp_summary
from twinbench.harness.core.inputs import elem_bytes, generator
from twinbench.harness.core.registry import Inputs, Statistic, Suite, Tolerance, register_impl, register_suite
from twinbench.reference.lowp_formats import Format, decode, rounding_error, unpack_nibbles
from twinbench.reference.mx import (
    SPECS,
    MxFormat,
    dequantize,
    element_scales,
    quantize,
    saturation_bound,
    scales_shape,
)
from twinbench.suites.fp8_linear import DATA, code_checker, draw, rounding_statistics

OPS = ("gemm", "quantize")


def _case(op, m, n, k, fmt="mxfp4", dtype="fp32", data="normal") -> Case:
    return Case.of(op=op, m=m, n=n, k=k, format=fmt, dtype=dtype, data=data)


QUICK = [
    _case("gemm", 64, 128, 256, "mxfp4"),
    _case("gemm", 48, 72, 97, "mxfp4", "bf16"),            # odd K: a partial block and a padding nibble
    _case("gemm", 64, 128, 256, "mxfp8_e4m3", "bf16"),
    _case("gemm", 32, 64, 96, "mxfp8_e5m2"),
    _case("gemm", 64, 128, 256, "nvfp4"),
    _case("gemm", 40, 24, 72, "nvfp4", data="outliers"),
    _case("gemm", 16, 32, 64, "mxfp4", data="zero_block"),
    _case("gemm", 16, 32, 64, "mxfp4", data="nonfinite"),
    _case("quantize", 64, 1, 256, "mxfp4"),
    _case("quantize", 33, 1, 97, "mxfp4", data="outliers"),
    _case("quantize", 16, 1, 64, "mxfp8_e4m3", data="nonfinite"),
    _case("quantize", 16, 1, 96, "mxfp8_e5m2", data="tiny"),
    _case("quantize", 16, 1, 80, "nvfp4", data="zero_block"),
    _case("quantize", 16, 1, 64, "nvfp4", data="huge"),
]
SHAPES = [(512, 4096, 4096), (1, 4096, 4096), (333, 1000, 1100)]
FULL = QUICK + [_case("gemm", m, n, k, f.value, "bf16") for (m, n, k) in SHAPES for f in MxFormat] + [
    _case("quantize", 512, 1, 4096, f.value) for f in MxFormat]
SEED = [QUICK[0], QUICK[1], QUICK[4], QUICK[9], QUICK[12]]


def make_inputs(case: Case, device, seed: int) -> Inputs:
    gen = generator(seed)
    m, n, k, fmt = case["m"], case["n"], case["k"], case["format"]
    x = draw(m, k, case["data"], gen)
    if case["op"] == "quantize":
        return Inputs(tensors={"x": x.to(torch_dtype(case["dtype"])).to(device)}, static={"format": fmt})
    w = draw(n, k, "normal", generator(seed + 104729)) / k ** 0.5
    tensors = {}
    for name, t in (("x", x), ("w", w)):
        q = quantize(t, fmt)
        tensors.update({f"{name}_codes": q.codes.to(device), f"{name}_scales": q.scales.to(device),
                        f"{name}_global": q.global_scale.to(device)})
    return Inputs(tensors=tensors, static={"format": fmt, "k": k, "out_dtype": case["dtype"]})


def _code_bytes(case: Case, rows: int) -> float:
    spec = SPECS[MxFormat(case["format"])]
    per_element = 0.5 if spec.packed else 1.0
    return rows * (case["k"] * per_element + -(-case["k"] // spec.block))


def flops(case: Case) -> dict[str, float]:
    m, n, k = case["m"], case["n"], case["k"]
    return {"fwd": 3.0 * m * k if case["op"] == "quantize" else 2.0 * m * n * k}


def bytes_moved(case: Case) -> dict[str, float]:
    m, n = case["m"], case["n"]
    e = elem_bytes(case["dtype"])
    if case["op"] == "quantize":
        return {"fwd": m * case["k"] * e + _code_bytes(case, m)}
    return {"fwd": _code_bytes(case, m) + _code_bytes(case, n) + m * n * e}


def tolerance(case: Case, output: str) -> Tolerance:
    return Tolerance(why="three-way rule on the GEMM of exactly dequantised MX/NVFP4 operands (fp64 vs fp32 "
                         "accumulation sets the budget); quantiser codes and scale codes bit-exact")


def _fp8_format_of(case: Case, output: str) -> str | None:
    """The FP8 format of a code output (NaN codes compare equal): MXFP8 elements, NVFP4's E4M3 scales."""
    spec = SPECS[MxFormat(case["format"])]
    if output == "codes" and not spec.packed:
        return spec.element.value
    if output == "scales" and spec.scale.value != "e8m0":
        return spec.scale.value
    return None


def quantizer_statistics(case: Case, outputs, inputs: Inputs) -> list[Statistic]:
    """``Suite.statistics``: the rounding error of an op=quantize output against fp64 x, each statistic within
    its format's bound (suites/fp8_linear.py ``rounding_statistics``; the saturation bound is the block scale
    rule's, reference/mx.py ``saturation_bound``). Outputs of the wrong shape or dtype give none (the code
    checks fail them already)."""
    x = inputs.tensors.get("x")
    codes, scales, glob = (outputs.get(n) for n in ("codes", "scales", "global_scale"))
    if case["op"] != "quantize" or x is None or codes is None or scales is None or glob is None:
        return []
    fmt = MxFormat(case["format"])
    spec = SPECS[fmt]
    rows, k = x.shape
    code_shape = (rows, -(-k // 2)) if spec.packed else (rows, k)
    if (tuple(codes.shape) != code_shape or codes.dtype != torch.uint8 or scales.dtype != torch.uint8
            or tuple(scales.shape) != scales_shape(fmt, rows, k) or glob.numel() != 1
            or not glob.is_floating_point()):
        return []
    codes, scales, glob = codes.cpu(), scales.cpu(), glob.detach().cpu().reshape(())
    values = decode(unpack_nibbles(codes, k) if spec.packed else codes, spec.element)
    judged = None
    if spec.scale is Format.E4M3:  # NVFP4: the saturation bound holds under a normal E4M3 block scale
        normal = decode(scales, Format.E4M3).abs() >= 2.0 ** -6
        judged = normal.repeat_interleave(spec.block, dim=1)[:, :k]
    err = rounding_error(x.detach().cpu(), values, element_scales(scales, glob, fmt, k), spec.element,
                         saturation_judged=judged)
    return rounding_statistics(err, spec.element, saturation_bound(fmt))


PARAMS = (Param("op", str, choices=OPS), Param("m", int, low=1), Param("n", int, low=1), Param("k", int, low=1),
          Param("format", str, choices=tuple(f.value for f in MxFormat)),
          Param("dtype", str, choices=("fp32", "bf16", "fp16")), Param("data", str, choices=DATA))

SUITE = register_suite(Suite(
    params=PARAMS, rules=(),
    name="mx_linear",
    description="MXFP8/MXFP4 (E8M0 per 32) and NVFP4 (E4M3 per 16 + fp32 global): quantise, GEMM "
                "y = deq(x) deq(w)^T",
    profiles={"quick": QUICK, "full": FULL, "seed": SEED},
    make_inputs=make_inputs,
    reference="reference",
    flops=flops,
    bytes=bytes_moved,
    tolerance=tolerance,
    check_discrete=code_checker(_fp8_format_of),
    statistics=quantizer_statistics,
    hi_dtype=lambda case: torch.float64,
    trials=2,
))


def reference_available(device) -> tuple[bool, str]:
    return True, lowp_summary(device, ("mxfp8", "mxfp4", "nvfp4"))


@register_impl("mx_linear", "reference", tags=("reference",), available=reference_available)
def reference(x=None, x_codes=None, x_scales=None, x_global=None, w_codes=None, w_scales=None, w_global=None, *,
              format, k=None, out_dtype=None):  # noqa: A002 (the contract's name)
    """The upcast run (fp64 global scales) computes in fp64 and keeps it; the test-dtype run computes in fp32
    and rounds to the case's dtype."""
    if x_codes is None:
        q = quantize(x, format)
        return {"codes": q.codes, "scales": q.scales, "global_scale": q.global_scale}
    compute = torch.float64 if x_global.dtype == torch.float64 else torch.float32
    y = dequantize(x_codes, x_scales, x_global, format, k, compute) @ \
        dequantize(w_codes, w_scales, w_global, format, k, compute).t()
    return y if compute == torch.float64 else y.to(torch_dtype(out_dtype))
