"""torchao's MX and NVFP4 quantisers (``to_mx``, ``nvfp4_quantize``): peers of the reference quantiser, judged
bit for bit. torchao returns the same layout as the contract (FP4 packed low nibble first, E8M0 / E4M3 scale
codes per block); its NVFP4 per-tensor scale is passed in (``per_tensor_scale``), computed as the reference does."""

from __future__ import annotations

import torch
from twinbench.harness.core.registry import register_impl
from twinbench.impls.kernels.availability import torchao_available
from twinbench.reference.lowp_formats import Format, max_value
from twinbench.reference.mx import SPECS, MxFormat


def torchao_supports(case, device) -> tuple[bool, str]:
    if case["op"] != "quantize":
        return False, f"op {case['op']}: this impl does quantize"
    if case["k"] % SPECS[MxFormat(case["format"])].block:
        return False, "torchao's MX/NVFP4 quantisers need K a multiple of the block (no partial block)"
    # Divergences the traps catch (tests/test_lowp_parity.py, docs/low_precision.md), measured on torchao 0.18:
    if case["data"] == "nonfinite" and case["format"] != "nvfp4":
        return False, "torchao gives an inf block a finite scale (2^(255-127-emax)) and saturated codes, not NaN"
    if case["data"] == "tiny" and case["format"] != "nvfp4":
        return False, "torchao: a subnormal block amax gets scale code 0 (2^-127) but elements divided by 2^-126"
    if case["data"] == "zero_block" and case["format"] == "nvfp4":
        return False, "torchao raises an all-zero NVFP4 block's E4M3 scale to its smallest normal (0x08), not 0"
    return True, ""


@register_impl("mx_linear", "torchao_quantize", tags=("peer",), available=torchao_available, supports=torchao_supports)
def torchao_quantize(x, *, format):  # noqa: A002 (the contract's name)
    fmt = MxFormat(format)
    x32 = x.float()
    metrics = {"execution": "emulated" if x.device.type == "cpu" else "native"}
    if fmt is MxFormat.NVFP4:
        from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize

        amax = x32.abs().amax()
        global_scale = amax / (max_value(Format.E4M3) * max_value(Format.E2M1))
        global_scale = torch.where(amax == 0, torch.ones_like(global_scale), global_scale)
        scales, codes = nvfp4_quantize(x32, 16, per_tensor_scale=global_scale)
        return {"codes": codes.view(torch.uint8), "scales": scales.view(torch.uint8),
                "global_scale": global_scale, "metrics": metrics}
    from torchao.prototype.mx_formats.mx_tensor import to_mx

    element = {MxFormat.MXFP4: torch.float4_e2m1fn_x2, MxFormat.MXFP8_E4M3: torch.float8_e4m3fn,
               MxFormat.MXFP8_E5M2: torch.float8_e5m2}[fmt]
    scales, codes = to_mx(x32, element, 32)
    return {"codes": codes.view(torch.uint8), "scales": scales.view(torch.uint8),
            "global_scale": torch.ones((), dtype=torch.float32, device=x.device), "metrics": metrics}
