"""Our Triton FP8 GEMMs (impls/kernels/fp8_gemm_triton.py) on the fp8_linear suite.

- ``triton_fp8_decode`` (``gemm``): the decode-in-kernel path, every format on every device (FNUZ on NVIDIA,
  OCP on MI300): fp8 codes decoded by bit arithmetic, fp16 tensor-core products (exact), fp32 accumulation.
  Its execution is ``emulated`` everywhere (no fp8 instruction runs).
- ``triton_fp8_native`` (``gemm``): the uint8 tiles bitcast to the device's fp8 types, fp8 ``tl.dot``:
  ``native`` where harness/core/devices.py ``lowp_support`` says both formats are, refused elsewhere on GPUs.
- ``triton_fp8_fused`` (``qgemm``, per-row scaling): the training recipe's forward with the per-row dynamic
  quantisation of x fused into the GEMM's prologue (x is read in its own dtype and never written as fp8); native
  fp8 dot where the device has the format, the decode path's dot elsewhere. Its backward (dy to E5M2, dx) is
  PyTorch's (impls/fp8_linear/torch_paths.py): the kernel is forward-only.

On the CPU all three run through the Triton interpreter (parity only, never timed; ``execution: emulated``).
The interpreter computes the native path's fp8 dot through fp16 and reads the E4M3 NaN code 0x7F as 480, so
cases with inf/NaN inputs are refused to ``triton_fp8_native`` there (the decode path keeps them right).
"""

from __future__ import annotations

import functools

import torch
from twinbench.harness.core.case import torch_dtype
from twinbench.harness.core.devices import find, lowp_support
from twinbench.harness.core.registry import register_impl
from twinbench.impls.fp8_linear.torch_paths import torch_dequantize, torch_quantize
from twinbench.impls.kernels import fp8_gemm_triton as kernels
from twinbench.impls.kernels.availability import interpreting, triton_available
from twinbench.reference.autograd_once import differentiable_once
from twinbench.reference.fp8 import Operand

# The interpreter runs one program at a time in numpy: CPU parity stays on the quick grid's sizes.
INTERPRETER_MAX_WORK = 128 * 256 * 256


def _gpu(device) -> bool:
    return getattr(device, "backend", "cpu") not in ("cpu",)


def _interpreter_limits(case, device) -> tuple[bool, str]:
    if not _gpu(device) and case["m"] * case["n"] * case["k"] > INTERPRETER_MAX_WORK:
        return False, f"Triton interpreter: M*N*K <= {INTERPRETER_MAX_WORK} on the CPU (parity only)"
    return True, ""


def _available(path: kernels.Path):
    """Triton usable here, and for the native path a device with some fp8 matrix format: its note says which
    (`twinbench list`, before anything runs)."""
    def available(device) -> tuple[bool, str]:
        ok, why = triton_available(device)
        if not ok:
            return ok, why
        if not _gpu(device):
            return True, "CPU: emulated (Triton interpreter)"
        if path is kernels.Path.DECODE:
            return True, "emulated: fp8 decoded in the kernel, fp16 dot"
        native = [f for f in kernels.FP8_LAYOUTS if lowp_support(device, f).native]
        if not native:
            return False, lowp_support(device, "e4m3").why_not
        return True, f"native: {', '.join(native)}"
    return available


def _native_formats(case, device) -> tuple[bool, str]:
    """Both operands' formats run on the device's fp8 matrix units (GPUs); the interpreter emulates any."""
    if not _gpu(device):
        return True, ""
    for fmt in {case["x_format"], case["w_format"]}:
        support = lowp_support(device, fmt)
        if not support.native:
            return False, support.why_not
    return True, ""


def _execution(device: torch.device, native: bool) -> str:
    return "native" if native and device.type != "cpu" else "emulated"


def _gemm(path: kernels.Path):
    def fn(x_codes, x_scale, w_codes, w_scale, *, x_format, w_format, scaling, out_dtype):
        out = torch_dtype(out_dtype)
        # the interpreter has no bf16 arithmetic: fp32 there, rounded once to the output dtype (the same value)
        y = kernels.fp8_gemm(x_codes, x_format, x_scale, w_codes, w_format, w_scale, kernels.Scaling(scaling), path,
                             out_dtype=torch.float32 if interpreting() else out)
        native = path is kernels.Path.NATIVE
        return {"out": y.to(out), "metrics": {"execution": _execution(x_codes.device, native), "path": path.value}}
    fn.__qualname__ = f"triton_fp8_{path.value}"
    return fn


def _gemm_supports(path: kernels.Path):
    def supports(case, device) -> tuple[bool, str]:
        if case["op"] != "gemm":
            return False, f"op {case['op']}: this impl does gemm"
        if path is kernels.Path.NATIVE:
            ok, why = _native_formats(case, device)
            if not ok:
                return ok, why
            if not _gpu(device) and case["data"] == "nonfinite":
                return False, ("Triton interpreter: its fp8 dot emulation reads the E4M3 NaN code as 480 "
                               "(inf/NaN cases: triton_fp8_decode here, this impl on GPUs)")
        return _interpreter_limits(case, device)
    return supports


for _path in kernels.Path:
    register_impl("fp8_linear", f"triton_fp8_{_path.value}", tags=("ours", "interpreter-on-cpu"),
                  available=_available(_path), supports=_gemm_supports(_path))(_gemm(_path))


# --- the fused per-row quantise + GEMM (qgemm) -------------------------------------------------------------

class _FusedRowwiseLinear(torch.autograd.Function):
    """Forward: the fused kernel. Backward: dy quantised per row to E5M2 and dx = deq(dy) @ deq(w) in PyTorch,
    the reference recipe's arithmetic (reference/fp8.py Fp8TrainingLinear)."""

    @staticmethod
    def forward(ctx, x, w_codes, w_scale, x_format, grad_format, w_format, saturate, path):
        out_dtype = torch.float32 if interpreting() else x.dtype
        xin = x.float() if interpreting() else x  # the interpreter has no bf16 arithmetic
        y = kernels.fp8_rowwise_quant_gemm(xin, x_format, w_codes, w_format, w_scale, path, out_dtype=out_dtype)
        ctx.save_for_backward(w_codes, w_scale)
        ctx.meta = (grad_format, w_format, saturate)
        return y.to(x.dtype)

    @staticmethod
    @differentiable_once("_FusedRowwiseLinear")  # dx of the quantised dy: no derivative in dy
    def backward(ctx, g):
        w_codes, w_scale = ctx.saved_tensors
        grad_format, w_format, saturate = ctx.meta
        w = torch_dequantize(w_codes, w_scale, w_format, "row", Operand.W)
        gc, gs = torch_quantize(g, grad_format, "row", Operand.X, saturate)
        dx = torch_dequantize(gc, gs, grad_format, "row", Operand.X) @ w
        return dx.to(g.dtype), None, None, None, None, None, None, None


@functools.cache
def _fused_path(device: str, fmt: str) -> kernels.Path:
    """Native fp8 dot where the device runs the format natively (and under the interpreter, which emulates it),
    the decode path's fp16 dot elsewhere."""
    if device == "cpu":
        return kernels.Path.NATIVE
    return kernels.Path.NATIVE if lowp_support(find(device), fmt).native else kernels.Path.DECODE


def fused_supports(case, device) -> tuple[bool, str]:
    if case["op"] != "qgemm":
        return False, f"op {case['op']}: this impl does qgemm (quantise x + GEMM)"
    if case["scaling"] != "row":
        return False, "per-row scaling only: the fused prologue computes one amax per row of x"
    if not case["saturate"]:
        return False, "saturating casts only (the fused quantiser clamps to the format's range)"
    if case["x_format"] != case["w_format"]:
        return False, "x and w in one format"
    if not _gpu(device) and case["data"] == "nonfinite":
        return False, "Triton interpreter: its fp8 dot emulation reads the E4M3 NaN code as 480"
    return _interpreter_limits(case, device)


@register_impl("fp8_linear", "triton_fp8_fused", tags=("ours", "interpreter-on-cpu"),
               available=_available(kernels.Path.DECODE), supports=fused_supports)
def triton_fp8_fused(x, w_codes, w_scale, *, x_format, grad_format, w_format, scaling, saturate, out_dtype):
    path = _fused_path("cpu" if x.device.type == "cpu" else str(x.device), x_format)
    y = _FusedRowwiseLinear.apply(x, w_codes, w_scale, x_format, grad_format, w_format, saturate, path)
    return {"out": y, "metrics": {"execution": _execution(x.device, path is kernels.Path.NATIVE),
                                  "path": f"fused-{path.value}"}}
