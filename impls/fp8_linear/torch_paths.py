"""FP8 through torch's own dtypes: casts for the quantiser, dtype views for dequantise + matmul, and
``torch._scaled_mm`` (per-tensor and row-wise scales; where the device runs FP8 natively, and on the CPU).

- ``torch_cast`` (ours): the quantiser as ``(x_fp32 / scale).to(float8)``; torch's e4m3fn cast always
  saturates (inf too), so the non-saturating e4m3 rule (overflow -> NaN) is applied on top.
- ``dequant_matmul`` (ours, the baseline the ratios are read against): ``codes.view(float8).float() * scale``
  for both operands, an fp32 matmul, rounded to the output dtype; also the training recipe (qgemm).
- ``scaled_mm`` (library): ``torch._scaled_mm``; on the CPU it runs e4m3/e5m2 per tensor and per row (fnuz
  refused there); block scales (DeepSeek-V3: 1 x 128 activations, 128 x 128 weights) only on CUDA sm90 with
  CUDA 12.9+ cuBLASLt (torch 2.13's ``_scaled_mm`` picks (BlockWise1x128, BlockWise128x128) from the scale
  shapes and strides). The blockwise path is unverified on hardware in this repository (docs/low_precision.md).
"""

from __future__ import annotations

import torch
from twinbench.harness.core.case import torch_dtype
from twinbench.harness.core.devices import _cuda_capability, lowp_support
from twinbench.harness.core.registry import register_impl
from twinbench.reference.autograd_once import differentiable_once
from twinbench.reference.fp8 import Operand, expand_scale, group_amax, scale_from_amax
from twinbench.reference.lowp_formats import Format, max_value, torch_dtype_of

# |v| past which a value overflows the format under round-to-nearest-even: max + half a step; the tie
# itself rounds to the even neighbour, which is the max for e4m3 (S.1111.110) and past it for the others.
_E4M3_OVERFLOW_ABOVE = 464.0


def _execution(device_type: str) -> str:
    """'native' on a GPU (supports() let only native formats through), 'emulated' on the CPU."""
    return "emulated" if device_type == "cpu" else "native"


def torch_quantize(x: torch.Tensor, fmt: str, scaling: str, operand: Operand, saturate: bool):
    """(codes uint8, scale fp32) with torch's cast; the scale arithmetic is the reference's (it is the contract)."""
    rows, cols = x.shape
    scale = scale_from_amax(group_amax(x, scaling, operand), fmt)
    scaled = x.detach().float() / expand_scale(scale, scaling, operand, rows, cols)
    if saturate:
        scaled = scaled.clamp(-max_value(fmt), max_value(fmt))  # NaN stays NaN
    codes = scaled.to(torch_dtype_of(fmt)).view(torch.uint8)
    if not saturate and Format(fmt) is Format.E4M3:  # torch saturates e4m3fn; OCP's non-saturating rule is NaN
        overflow = scaled.abs() > _E4M3_OVERFLOW_ABOVE
        nan_code = torch.signbit(scaled).to(torch.uint8) << 7 | 0x7F  # S.1111.111
        codes = torch.where(overflow, nan_code, codes)
    return codes, scale


def torch_dequantize(codes, scale, fmt, scaling, operand, dtype=torch.float32):
    rows, cols = codes.shape
    values = codes.view(torch_dtype_of(fmt)).to(dtype)
    return values * expand_scale(scale.to(dtype), scaling, operand, rows, cols)


class _TorchTrainingLinear(torch.autograd.Function):
    """E4M3 forward, E5M2 output gradient, frozen FP8 weight (the reference's recipe, with torch's casts)."""

    @staticmethod
    def forward(ctx, x, w_codes, w_scale, x_format, grad_format, w_format, scaling, saturate):
        xc, xs = torch_quantize(x, x_format, scaling, Operand.X, saturate)
        w = torch_dequantize(w_codes, w_scale, w_format, scaling, Operand.W)
        ctx.save_for_backward(w)
        ctx.grad_format, ctx.scaling, ctx.saturate = grad_format, scaling, saturate
        return (torch_dequantize(xc, xs, x_format, scaling, Operand.X) @ w.t()).to(x.dtype)

    @staticmethod
    @differentiable_once("_TorchTrainingLinear")  # dx of the quantised dy: no derivative in dy
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        gc, gs = torch_quantize(g, ctx.grad_format, ctx.scaling, Operand.X, ctx.saturate)
        dx = torch_dequantize(gc, gs, ctx.grad_format, ctx.scaling, Operand.X) @ w
        return dx.to(g.dtype), None, None, None, None, None, None, None


def _ops(*ops: str):
    def supports(case, device) -> tuple[bool, str]:
        if case["op"] not in ops:
            return False, f"op {case['op']}: this impl does {', '.join(ops)}"
        return True, ""
    return supports


def _emulated(device) -> tuple[bool, str]:
    return True, "emulated: torch's FP8 casts, fp32 matmul"


@register_impl("fp8_linear", "torch_cast", tags=("ours",), available=_emulated, supports=_ops("quantize"))
def torch_cast(x, *, x_format, scaling, saturate):
    codes, scale = torch_quantize(x, x_format, scaling, Operand.X, saturate)
    return {"codes": codes, "scale": scale, "metrics": {"execution": _execution(x.device.type)}}


@register_impl("fp8_linear", "dequant_matmul", tags=("ours",), available=_emulated, supports=_ops("gemm", "qgemm"))
def dequant_matmul(x=None, x_codes=None, x_scale=None, w_codes=None, w_scale=None, *, x_format, w_format, scaling,
                   out_dtype, grad_format=None, saturate=True):
    metrics = {"execution": "emulated"}
    if x_codes is None:
        return {"out": _TorchTrainingLinear.apply(x, w_codes, w_scale, x_format, grad_format, w_format, scaling,
                                                  saturate), "metrics": metrics}
    y = torch_dequantize(x_codes, x_scale, x_format, scaling, Operand.X) @ \
        torch_dequantize(w_codes, w_scale, w_format, scaling, Operand.W).t()
    return {"out": y.to(torch_dtype(out_dtype)), "metrics": metrics}


def scaled_mm_available(device) -> tuple[bool, str]:
    if device.backend == "cpu":
        return True, "CPU: emulated (torch's CPU kernel; e4m3/e5m2 only, fnuz refused)"
    if device.backend not in ("cuda", "rocm"):
        return False, f"torch._scaled_mm has no {device.backend} kernel"
    native = [f for f in ("e4m3", "e5m2", "e4m3fnuz", "e5m2fnuz") if lowp_support(device, f).native]
    if not native:
        return False, lowp_support(device, "e4m3").why_not
    return True, f"native: {', '.join(native)}"


def scaled_mm_supports(case, device) -> tuple[bool, str]:
    if case["op"] != "gemm":
        return False, f"op {case['op']}: this impl does gemm"
    for fmt in (case["x_format"], case["w_format"]):
        if device.backend == "cpu" and fmt.endswith("fnuz"):
            return False, "fnuz: ROCm gfx942 only (torch._scaled_mm refuses fnuz on the CPU)"
        if device.backend != "cpu" and not lowp_support(device, fmt).native:
            return False, lowp_support(device, fmt).why_not
    if case["scaling"] == "block" and (why := blockwise_refusal(case, device)):
        return False, why
    if device.backend != "cpu":
        if case["k"] % 16 or case["n"] % 16:
            return False, "cuBLASLt/hipBLASLt FP8 needs K and N multiples of 16"
        if case["x_format"].startswith("e5m2") and case["w_format"].startswith("e5m2"):
            return False, "e5m2 x e5m2 has no FP8 GEMM (one operand must be e4m3)"
        if case["scaling"] == "row" and case["dtype"] != "bf16":
            return False, "row-wise scales need a bf16 output on CUDA"
    return True, ""


# cuBLASLt's VEC128 / BLK128x128 fp32 scale modes arrived in CUDA 12.9 (torch's ScaledBlas checks the same)
BLOCKWISE_MIN_CUDA = (12, 9)


def _cuda_version() -> tuple[int, ...]:
    """The CUDA version torch was built with ((): none, a CPU or ROCm build)."""
    return tuple(int(p) for p in (torch.version.cuda or "").split(".")[:2] if p.isdigit())


def blockwise_refusal(case, device) -> str:
    """Why torch._scaled_mm cannot run this block-scaled case on the device ('' when it can): torch 2.13 runs
    (BlockWise1x128, BlockWise128x128) on Hopper only (sm90; other archs raise NotImplementedError), through
    cuBLASLt 12.9+, with a bf16 output; the 128 x 128 scales' rows and the 1 x 128 scales' columns (outer-dim
    major) must be 16-byte aligned."""
    if device.backend != "cuda":
        return (f"block scales: torch._scaled_mm runs 1x128/128x128 on CUDA sm90 only (CUDA 12.9+), not on "
                f"{device.backend}")
    major, minor = _cuda_capability(device)
    if major != 9:
        return f"block scales: torch._scaled_mm runs 1x128/128x128 on sm90 only (this is sm_{major}{minor})"
    if _cuda_version() < BLOCKWISE_MIN_CUDA:
        return f"block scales: torch._scaled_mm needs a CUDA 12.9+ build (this torch: {torch.version.cuda})"
    if case["dtype"] != "bf16":
        return "block scales: torch._scaled_mm's 1x128/128x128 GEMM gives a bf16 output only"
    if -(-case["k"] // 128) % 4 or case["m"] % 4:
        return "block scales: cuBLASLt needs 16-byte aligned scale strides (ceil(K/128) and M multiples of 4)"
    return ""


@register_impl("fp8_linear", "scaled_mm", tags=("library",), available=scaled_mm_available,
               supports=scaled_mm_supports)
def scaled_mm(x_codes, x_scale, w_codes, w_scale, *, x_format, w_format, scaling, out_dtype):
    a = x_codes.view(torch_dtype_of(x_format))
    b = w_codes.view(torch_dtype_of(w_format)).t()  # column-major K x N, as cuBLASLt wants it
    if scaling == "row":
        sa, sb = x_scale.reshape(-1, 1), w_scale.reshape(1, -1)
    elif scaling == "block":
        # x's (M, K/128) scales outer-dim major (column-major); w's (N/128, K/128) row-major, passed transposed
        # like b itself: torch reads (BlockWise1x128, BlockWise128x128) off these shapes and strides
        sa, sb = x_scale.t().contiguous().t(), w_scale.t()
    else:
        sa, sb = x_scale, w_scale
    y = torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch_dtype(out_dtype))
    return {"out": y, "metrics": {"execution": _execution(x_codes.device.type)}}
