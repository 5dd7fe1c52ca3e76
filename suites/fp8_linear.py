"""FP8 linear: quantise (E4M3/E5M2, OCP and FNUZ; per-tensor, per-row, DeepSeek-V3 block scaling) and GEMM.

One suite, three operations (the ``op`` parameter), so every impl is judged on the same codes:

- ``gemm``: ``y = deq(x) @ deq(w).T`` from the reference quantiser's codes and scales. Inputs ``x_codes``
  (uint8 M x K), ``x_scale`` (fp32), ``w_codes`` (uint8 N x K), ``w_scale`` (fp32); static ``x_format``,
  ``w_format``, ``scaling``, ``out_dtype``. Forward GEMMs are e4m3 x e4m3; the training backward's GEMMs
  are e5m2 (gradient) x e4m3 (weight or activation), the same contract with ``x_format=e5m2``.
- ``quantize``: ``x`` (the case dtype) -> ``{"codes": uint8, "scale": fp32}``; static ``x_format``,
  ``scaling``, ``saturate``. Codes are compared bit for bit.
- ``qgemm``: the training recipe on a frozen FP8 weight (reference/fp8.py ``Fp8TrainingLinear``): ``x``
  (requires grad) is quantised to ``x_format``, multiplied by ``deq(w)``; backward quantises dy to
  ``grad_format`` (E5M2) and returns dx. Static: ``x_format``, ``grad_format``, ``w_format``, ``scaling``,
  ``saturate``. A fused quantise + GEMM impl registers here.

Parity (docs/low_precision.md §Parity, docs/method.md §1): given the codes and scales the dequantised
operands are exact in fp64, so the GEMM is judged by the three-way rule like NF4: ``ref_hi`` dequantises and
multiplies in fp64, ``ref_lo`` in fp32 (what FP8 tensor cores accumulate in) and rounds to the output dtype.
The quantiser is judged bit for bit (codes), its scales by the rule, and by its error statistics against
fp64 (``quantizer_statistics``: ``stat:rel_error``, ``stat:ulp_error``, ``stat:saturated_error`` in the record,
each within the bound its format implies, docs/low_precision.md §Parity).

``data`` picks the trap: ``normal``; ``outliers`` (1% of the values 1000x the rest: E4M3's range absorbs
them, an MXFP4/NVFP4 block holding one flushes its small values); ``zero_block`` (an all-zero row and 128-tile: amax 0); ``nonfinite`` (inf and NaN in x: the
scale of that group becomes inf/NaN and its outputs NaN, which impls must keep, not hide); ``tiny`` (values
near 1e-39: the scale underflows unless raised to 2^-126); ``huge`` (values near 2^100: a scale kept in fp16
or bf16-rounded overflows or drifts).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from twinbench.harness.core.case import Case, Param, Rule, torch_dtype
from twinbench.harness.core.devices import lowp_summary
from twinbench.harness.core.inputs import elem_bytes, generator
from twinbench.harness.core.registry import Inputs, Statistic, Suite, Tolerance, register_impl, register_suite
from twinbench.reference.fp8 import (
    Fp8TrainingLinear,
    Operand,
    Scaling,
    dequantize,
    expand_scale,
    grad_format,
    quantize,
    scale_shape,
)
from twinbench.reference.lowp_formats import (
    FP8_FORMATS,
    FP32_DIVISION_SLACK,
    Format,
    RoundingError,
    decode,
    rel_error_bound,
    rounding_error,
    ulp_error_bound,
)

OPS = ("gemm", "quantize", "qgemm")
DATA = ("normal", "outliers", "zero_block", "nonfinite", "tiny", "huge")
FNUZ = (Format.E4M3FNUZ.value, Format.E5M2FNUZ.value)


def _case(op, m, n, k, x_format="e4m3", w_format="e4m3", scaling="tensor", dtype="fp32", data="normal",
          saturate=True) -> Case:
    return Case.of(op=op, m=m, n=n, k=k, x_format=x_format, w_format=w_format, scaling=scaling, saturate=saturate,
                   dtype=dtype, data=data)


QUICK = [
    # forward, per tensor; small: torch._scaled_mm's CPU per-tensor kernel costs ~1 ms of CPU per 2^20
    # multiply-adds (20x its row-wise kernel), the largest single cost of the quick profile at 64x128x256
    _case("gemm", 32, 64, 256),
    _case("gemm", 64, 128, 256, scaling="row", dtype="bf16"),
    _case("gemm", 48, 136, 200, scaling="block"),                         # odd K and N: partial tiles
    _case("gemm", 64, 128, 256, "e5m2", "e4m3", "row"),                   # backward GEMM: E5M2 gradient
    _case("gemm", 32, 64, 128, "e4m3fnuz", "e4m3fnuz"),                   # FNUZ: an OCP reading is wrong
    _case("gemm", 32, 64, 160, "e5m2fnuz", "e4m3fnuz", "block"),
    _case("gemm", 32, 64, 256, scaling="block", data="zero_block"),       # amax 0
    _case("gemm", 16, 32, 64, scaling="row", data="nonfinite", saturate=False),
    _case("quantize", 64, 1, 256, scaling="tensor"),
    _case("quantize", 33, 1, 200, scaling="block", data="outliers"),
    _case("quantize", 16, 1, 64, "e5m2", scaling="row", data="nonfinite", saturate=False),
    _case("quantize", 16, 1, 96, "e4m3fnuz", scaling="row", data="tiny"),
    _case("quantize", 16, 1, 64, scaling="tensor", data="huge", saturate=False),
    _case("qgemm", 32, 64, 128, scaling="tensor"),                        # training: E4M3 forward, E5M2 dx
    _case("qgemm", 24, 40, 136, scaling="row", dtype="bf16"),
]
SHAPES = [(512, 4096, 4096), (1, 4096, 4096), (333, 1000, 1100)]  # a projection, a GEMV, odd sizes
FULL = QUICK + [
    _case(op, m, n, k, xf, wf, sc, dt)
    for op in ("gemm", "qgemm") for (m, n, k) in SHAPES for sc in ("tensor", "row", "block")
    for (xf, wf) in (("e4m3", "e4m3"), ("e5m2", "e4m3"), ("e4m3fnuz", "e4m3fnuz")) for dt in ("bf16",)
    if op == "gemm" or xf != "e5m2"
] + [_case("quantize", 512, 1, 4096, f.value, scaling=sc) for f in FP8_FORMATS for sc in ("tensor", "row", "block")]
# A few cases that cover every parameter once, for a fast fresh-seed sweep.
SEED = [QUICK[0], QUICK[2], QUICK[4], QUICK[9], QUICK[13]]


def family(fmt: str) -> str:
    return "fnuz" if fmt in FNUZ else "ocp"


def draw(rows: int, cols: int, data: str, gen: torch.Generator) -> torch.Tensor:
    """A seeded fp32 [rows, cols] with the case's trap planted (the module docstring)."""
    x = torch.randn((rows, cols), generator=gen, dtype=torch.float32)
    if data == "outliers":
        x[torch.rand((rows, cols), generator=gen) < 0.01] *= 1000.0
    elif data == "zero_block":
        x[0] = 0.0  # a zero row (per-row amax 0)
        x[1 % rows, :128] = 0.0  # a zero 1 x 128 tile (block amax 0)
    elif data == "nonfinite":
        x[0, 0] = float("inf")
        x[rows // 2, cols // 2] = float("nan")
        x[-1, -1] = float("-inf")
    elif data == "tiny":
        x *= 1e-39
    elif data == "huge":
        x *= 2.0 ** 100
    return x


def _weight(case: Case, seed: int) -> torch.Tensor:
    gen = generator(seed + 104729)
    return draw(case["n"], case["k"], "normal", gen) / math.sqrt(case["k"])


def make_inputs(case: Case, device, seed: int) -> Inputs:
    gen = generator(seed)
    m, k, op = case["m"], case["k"], case["op"]
    x = draw(m, k, case["data"], gen)
    static = {"x_format": case["x_format"], "scaling": case["scaling"]}
    dtype = torch_dtype(case["dtype"])
    if op == "quantize":
        static["saturate"] = case["saturate"]
        return Inputs(tensors={"x": x.to(dtype).to(device)}, static=static)
    wq = quantize(_weight(case, seed), case["w_format"], case["scaling"], Operand.W)
    tensors = {"w_codes": wq.codes.to(device), "w_scale": wq.scale.to(device)}
    static.update(w_format=case["w_format"], out_dtype=case["dtype"])
    if op == "gemm":
        xq = quantize(x, case["x_format"], case["scaling"], Operand.X, saturate=case["saturate"])
        tensors = {"x_codes": xq.codes.to(device), "x_scale": xq.scale.to(device), **tensors}
        return Inputs(tensors=tensors, static=static)
    static.update(grad_format=grad_format(case["x_format"]).value, saturate=case["saturate"])
    return Inputs(tensors={"x": x.to(dtype).to(device), **tensors}, static=static, grad=("x",))


def flops(case: Case) -> dict[str, float]:
    m, n, k = case["m"], case["n"], case["k"]
    if case["op"] == "quantize":
        return {"fwd": 3.0 * m * k}
    return {"fwd": 2.0 * m * n * k, **({"bwd": 2.0 * m * n * k} if case["op"] == "qgemm" else {})}


def bytes_moved(case: Case) -> dict[str, float]:
    m, n, k = case["m"], case["n"], case["k"]
    e = elem_bytes(case["dtype"])
    if case["op"] == "quantize":
        return {"fwd": m * k * (e + 1)}
    x_in = m * k * (e if case["op"] == "qgemm" else 1)
    return {"fwd": x_in + n * k + m * n * e, **({"bwd": 2 * m * n * e + n * k} if case["op"] == "qgemm" else {})}


def tolerance(case: Case, output: str) -> Tolerance:
    return Tolerance(why="three-way rule on the GEMM of exactly dequantised FP8 operands (fp64 vs fp32 "
                         "accumulation sets the budget); quantiser codes bit-exact, its error against fp64 within "
                         "the format's bound; k=2 outputs, k=3 gradients")


def code_checker(format_of: Callable[[Case, str], str | None]):
    """``Suite.check_discrete`` for code outputs: bit for bit, except that any NaN code equals any other (a
    NaN's sign and payload are not part of the contract: x86 makes inf/inf a negative NaN, which torch's cast
    keeps, 0xFF where the reference writes 0x7F). ``format_of(case, output)``: the output's FP8 format, or
    None where codes have no NaN to spare (E2M1, packed; E8M0 has the one 0xFF)."""

    def check(case: Case, name: str, opt, ref, inputs: Inputs) -> tuple[bool, str]:
        opt, ref = opt.cpu(), ref.cpu()
        if opt.shape != ref.shape or opt.dtype != ref.dtype:
            return False, f"{name} {tuple(opt.shape)} {opt.dtype} != reference {tuple(ref.shape)} {ref.dtype}"
        differ = opt != ref
        fmt = format_of(case, name)
        if fmt is not None:
            differ &= ~(torch.isnan(decode(opt, fmt)) & torch.isnan(decode(ref, fmt)))
        where = differ.nonzero()
        if not len(where):
            return True, ""
        first = tuple(where[0].tolist())
        return False, (f"{len(where)} of {ref.numel()} codes differ from the reference's; first at {first}: "
                       f"0x{int(opt[first]):02x} != 0x{int(ref[first]):02x}")

    return check


check_codes = code_checker(lambda case, name: case["x_format"] if name == "codes" else None)


# Amax scaling puts the group's largest element on the format's max (up to the fp32 divisions' rounding), so
# nothing saturates by more than that rounding.
AMAX_SATURATION_BOUND = 2 * FP32_DIVISION_SLACK


def rounding_statistics(err: RoundingError, fmt: Format | str, saturation_bound: float) -> list[Statistic]:
    """The three error statistics of a quantiser's output (reference/lowp_formats.py ``rounding_error``), each
    against the bound its format implies (docs/low_precision.md §Parity); non-finite codes from finite inputs
    make the ulp error infinite (a missing saturation)."""
    counted = f"{err.judged} elements judged; {err.saturated_fraction:.3%} saturated"
    ulp_note = counted if not err.nonfinite else f"{err.nonfinite} finite inputs gave inf/NaN codes; {counted}"
    return [Statistic("rel_error", err.rel_error, rel_error_bound(fmt), mean=err.rel_mean,
                      note="normal range, not saturated"),
            Statistic("ulp_error", math.inf if err.nonfinite else err.ulp_error, ulp_error_bound(fmt),
                      note=ulp_note),
            Statistic("saturated_error", err.saturated_error, saturation_bound, note=counted)]


def quantizer_statistics(case: Case, outputs, inputs: Inputs) -> list[Statistic]:
    """``Suite.statistics``: op=quantize only. Outputs of the wrong shape or dtype give none (their code and
    scale checks fail them already)."""
    codes, scale, x = outputs.get("codes"), outputs.get("scale"), inputs.tensors.get("x")
    if case["op"] != "quantize" or codes is None or scale is None or x is None:
        return []
    rows, cols = x.shape
    if (codes.shape != x.shape or codes.dtype != torch.uint8 or not scale.is_floating_point()
            or tuple(scale.shape) != scale_shape(case["scaling"], Operand.X, rows, cols)):
        return []
    fmt = case["x_format"]
    per_element = expand_scale(scale.detach().cpu().double(), case["scaling"], Operand.X, rows, cols)
    err = rounding_error(x.detach().cpu(), decode(codes.cpu(), fmt), per_element, fmt)
    return rounding_statistics(err, fmt, AMAX_SATURATION_BOUND)


PARAMS = (Param("op", str, choices=OPS), Param("m", int, low=1), Param("n", int, low=1), Param("k", int, low=1),
          Param("x_format", str, choices=tuple(f.value for f in FP8_FORMATS)),
          Param("w_format", str, choices=tuple(f.value for f in FP8_FORMATS)),
          Param("scaling", str, choices=tuple(s.value for s in Scaling)), Param("saturate", bool),
          Param("dtype", str, choices=("fp32", "bf16", "fp16")), Param("data", str, choices=DATA))
RULES = (
    Rule(lambda c: c["op"] == "quantize" or family(c["x_format"]) == family(c["w_format"]),
         "x_format and w_format must be of one family (OCP e4m3/e5m2, or FNUZ e4m3fnuz/e5m2fnuz); "
         "quantize reads x_format only"),
    Rule(lambda c: c["op"] != "qgemm" or c["x_format"] in ("e4m3", "e4m3fnuz"),
         "qgemm (the training recipe) quantises its forward operand to E4M3 (x_format e4m3 or e4m3fnuz)"),
)

SUITE = register_suite(Suite(
    params=PARAMS, rules=RULES,
    name="fp8_linear",
    description="FP8 (E4M3/E5M2, OCP/FNUZ; tensor/row/block scales): quantise, GEMM y = deq(x) deq(w)^T, "
                "training (E4M3 forward, E5M2 dx)",
    profiles={"quick": QUICK, "full": FULL, "seed": SEED},
    make_inputs=make_inputs,
    reference="reference",
    flops=flops,
    bytes=bytes_moved,
    tolerance=tolerance,
    check_discrete=check_codes,
    statistics=quantizer_statistics,
    hi_dtype=lambda case: torch.float64,
    trials=2,
))


def reference_available(device) -> tuple[bool, str]:
    """Always runs (plain PyTorch); the note is the device's FP8 capability line for `twinbench list`."""
    return True, lowp_summary(device, ("e4m3", "e5m2", "e4m3fnuz", "e5m2fnuz"))


@register_impl("fp8_linear", "reference", tags=("reference",), available=reference_available)
def reference(x=None, x_codes=None, x_scale=None, w_codes=None, w_scale=None, *, x_format, scaling,
              w_format=None, out_dtype=None, grad_format=None, saturate=True):
    """The upcast run (fp64 scales or x) computes in fp64 and keeps it; the test-dtype run computes in fp32
    and rounds to the case's dtype."""
    if w_codes is None:  # quantize
        q = quantize(x, x_format, scaling, Operand.X, saturate=saturate)
        return {"codes": q.codes, "scale": q.scale}
    compute = torch.float64 if w_scale.dtype == torch.float64 else torch.float32
    if x_codes is None:  # qgemm
        return Fp8TrainingLinear.apply(x, w_codes, w_scale, x_format, grad_format, w_format, scaling, saturate,
                                       compute)
    xd = dequantize(x_codes, x_scale, x_format, scaling, Operand.X, compute)
    wd = dequantize(w_codes, w_scale, w_format, scaling, Operand.W, compute)
    y = xd @ wd.t()
    return y if compute == torch.float64 else y.to(torch_dtype(out_dtype))
