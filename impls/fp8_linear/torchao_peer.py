"""torchao's float8 training quantiser (``hp_tensor_to_float8_dynamic``: tensorwise and axiswise scales).

torchao keeps the *quantisation* multiplier ``max / amax`` (data = x * scale); the contract's scale is the
dequantisation multiplier, so the record gets ``1 / torchao's scale``. torchao always saturates and has no
1 x 128 block scaling in this API; its float8 GEMM is ``torch._scaled_mm`` (the ``scaled_mm`` impl).
"""

from __future__ import annotations

import torch
from twinbench.harness.core.registry import register_impl
from twinbench.impls.kernels.availability import torchao_available
from twinbench.reference.lowp_formats import torch_dtype_of


def torchao_supports(case, device) -> tuple[bool, str]:
    if case["op"] != "quantize":
        return False, f"op {case['op']}: this impl does quantize"
    if case["scaling"] == "block":
        return False, "torchao's float8 training quantiser has tensorwise and axiswise scales, no 1x128 blocks"
    if case["data"] == "tiny":  # the trap catches it: tests/test_lowp_parity.py
        return False, "torchao clamps amax at 1e-12: groups below it are flushed to zero codes (by design)"
    if not case["saturate"]:
        return False, "torchao's float8 cast always saturates"
    return True, ""


@register_impl("fp8_linear", "torchao_float8", tags=("peer",), available=torchao_available,
               supports=torchao_supports)
def torchao_float8(x, *, x_format, scaling, saturate):
    from torchao.float8.config import ScalingGranularity
    from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import LinearMMConfig

    row = scaling == "row"
    t = hp_tensor_to_float8_dynamic(
        x.float(), torch_dtype_of(x_format), LinearMMConfig(),
        scaling_granularity=ScalingGranularity.AXISWISE if row else ScalingGranularity.TENSORWISE,
        axiswise_dim=-1 if row else None)
    scale = (1.0 / t._scale.float()).reshape(-1) if row else (1.0 / t._scale.float()).reshape(())
    return {"codes": t._data.view(torch.uint8), "scale": scale,
            "metrics": {"execution": "emulated" if x.device.type == "cpu" else "native"}}
