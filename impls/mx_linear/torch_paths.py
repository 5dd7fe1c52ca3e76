"""MX/NVFP4 GEMMs through torch: dequantise + matmul (ours, the baseline), and block-scaled
``torch._scaled_mm`` where the device has it (sm100+: MXFP8 / MXFP4 with E8M0 scales, NVFP4 with E4M3 scales,
in cuBLASLt's 128 x 4 swizzled scale layout, torchao's ``to_blocked``)."""

from __future__ import annotations

import torch
from twinbench.harness.core.case import torch_dtype
from twinbench.harness.core.devices import lowp_support
from twinbench.harness.core.registry import register_impl
from twinbench.reference.lowp_formats import decode, unpack_nibbles
from twinbench.reference.mx import SPECS, MxFormat

_LOWP_NAME = {MxFormat.MXFP8_E4M3: "mxfp8", MxFormat.MXFP8_E5M2: "mxfp8", MxFormat.MXFP4: "mxfp4",
              MxFormat.NVFP4: "nvfp4"}


def dequantize_fp32(codes, scales, global_scale, fmt: str, k: int) -> torch.Tensor:
    """Elements by table lookup (FP4) or torch's dtype view (FP8), block scales, global scale; fp32."""
    spec = SPECS[MxFormat(fmt)]
    if spec.packed:
        values = decode(unpack_nibbles(codes, k), spec.element).float()
    else:
        values = codes.view(getattr(torch, {"e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2"}[spec.element.value]))
        values = values.float()
    if spec.scale.value == "e8m0":
        block = scales.view(torch.float8_e8m0fnu).float()
    else:
        block = scales.view(torch.float8_e4m3fn).float()
    block = block * global_scale.float()
    return values * block.repeat_interleave(spec.block, dim=1)[:, :k]


def _gemm_only(case, device) -> tuple[bool, str]:
    return (True, "") if case["op"] == "gemm" else (False, f"op {case['op']}: this impl does gemm")


def _emulated(device) -> tuple[bool, str]:
    return True, "emulated: dequantise, fp32 matmul"


@register_impl("mx_linear", "dequant_matmul", tags=("ours",), available=_emulated, supports=_gemm_only)
def dequant_matmul(x_codes, x_scales, x_global, w_codes, w_scales, w_global, *, format, k, out_dtype):  # noqa: A002
    y = dequantize_fp32(x_codes, x_scales, x_global, format, k) @ \
        dequantize_fp32(w_codes, w_scales, w_global, format, k).t()
    return {"out": y.to(torch_dtype(out_dtype)), "metrics": {"execution": "emulated"}}


def blockscaled_available(device) -> tuple[bool, str]:
    if device.backend != "cuda":
        return False, f"block-scaled torch._scaled_mm: CUDA sm100+ only (this is {device.backend})"
    native = [f for f in ("mxfp8", "mxfp4", "nvfp4") if lowp_support(device, f).native]
    return (True, f"native: {', '.join(native)}") if native else (False, lowp_support(device, "mxfp4").why_not)


def blockscaled_supports(case, device) -> tuple[bool, str]:
    if case["op"] != "gemm":
        return False, f"op {case['op']}: this impl does gemm"
    spec = SPECS[MxFormat(case["format"])]
    if case["k"] % (2 * spec.block) or case["n"] % 16:
        return False, "cuBLASLt block-scaled GEMM: K a multiple of 2 blocks, N of 16 (no partial blocks)"
    if case["dtype"] != "bf16":
        return False, "cuBLASLt block-scaled GEMM: bf16 output"
    return True, ""


@register_impl("mx_linear", "scaled_mm_blockscaled", tags=("library",), available=blockscaled_available,
               supports=blockscaled_supports)
def scaled_mm_blockscaled(x_codes, x_scales, x_global, w_codes, w_scales, w_global, *, format, k,  # noqa: A002
                          out_dtype):
    """Unverified on hardware in this repository (no sm100 here): docs/low_precision.md says so."""
    from torchao.prototype.mx_formats.utils import to_blocked

    spec = SPECS[MxFormat(format)]
    if spec.packed:
        a, b = x_codes.view(torch.float4_e2m1fn_x2), w_codes.view(torch.float4_e2m1fn_x2)
    else:
        dt = torch.float8_e4m3fn if spec.element.value == "e4m3" else torch.float8_e5m2
        a, b = x_codes.view(dt), w_codes.view(dt)
    scale_dtype = torch.float8_e8m0fnu if spec.scale.value == "e8m0" else torch.float8_e4m3fn
    sa, sb = to_blocked(x_scales.view(scale_dtype)), to_blocked(w_scales.view(scale_dtype))
    y = torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
    if spec.scale.value != "e8m0":  # NVFP4's per-tensor scales multiply outside the GEMM
        y = (y.float() * (x_global * w_global)).to(torch.bfloat16)
    return {"out": y, "metrics": {"execution": "native"}}
