"""Our Triton MXFP4 GEMM (impls/kernels/mxfp4_gemm_triton.py) on the mx_linear suite's ``gemm`` (format ``mxfp4``:
both operands MXFP4, E2M1 nibbles with E8M0 scales per 32; MX formats have no global scale, the suite's is 1).

- ``triton_mxfp4_decode``: nibbles and scales decoded in registers, a bf16 dot on GPUs (exact products), fp32 on
  the CPU interpreter; ``emulated`` everywhere.
- ``triton_mxfp4_dot_scaled``: ``tl.dot_scaled`` on the packed codes and E8M0 scales as stored: ``native`` where
  harness/core/devices.py ``lowp_support`` says MXFP4 is (sm100, gfx950); refused on other GPUs (Triton would
  emulate it there, slower than the decode path); the interpreter emulates it on the CPU.

On the CPU both run through the Triton interpreter (parity only, never timed).
"""

from __future__ import annotations

import torch
from twinbench.harness.core.case import torch_dtype
from twinbench.harness.core.devices import lowp_support
from twinbench.harness.core.registry import register_impl
from twinbench.impls.kernels import mxfp4_gemm_triton as kernels
from twinbench.impls.kernels.availability import interpreting, triton_available

INTERPRETER_MAX_WORK = 128 * 256 * 256  # the interpreter runs one program at a time: quick-grid sizes on the CPU


def _available(path: kernels.MxPath):
    """Triton usable here; dot_scaled only where MXFP4 is native (the note says so in `twinbench list`)."""
    def available(device) -> tuple[bool, str]:
        ok, why = triton_available(device)
        if not ok:
            return ok, why
        if getattr(device, "backend", "cpu") == "cpu":
            return True, "CPU: emulated (Triton interpreter)"
        if path is kernels.MxPath.DECODE:
            return True, "emulated: MXFP4 decoded in the kernel, bf16 dot"
        support = lowp_support(device, "mxfp4")
        return (True, "native: mxfp4") if support.native else (False, support.why_not)
    return available


def _supports(path: kernels.MxPath):
    def supports(case, device) -> tuple[bool, str]:
        if case["op"] != "gemm":
            return False, f"op {case['op']}: this impl does gemm"
        if case["format"] != "mxfp4":
            return False, f"format {case['format']}: our Triton MX GEMM takes MXFP4 operands only"
        if getattr(device, "backend", "cpu") == "cpu" and case["m"] * case["n"] * case["k"] > INTERPRETER_MAX_WORK:
            return False, f"Triton interpreter: M*N*K <= {INTERPRETER_MAX_WORK} on the CPU (parity only)"
        return True, ""
    return supports


def _impl(path: kernels.MxPath):
    def fn(x_codes, x_scales, x_global, w_codes, w_scales, w_global, *, format, k, out_dtype):  # noqa: A002
        out = torch_dtype(out_dtype)
        y = kernels.mxfp4_gemm(x_codes, w_codes, w_scales, path, x_scales=x_scales, x_fmt="e2m1", k=k,
                               out_dtype=torch.float32 if interpreting() else out)
        native = path is kernels.MxPath.DOT_SCALED and x_codes.device.type != "cpu"
        return {"out": y.to(out), "metrics": {"execution": "native" if native else "emulated", "path": path.value}}
    fn.__qualname__ = f"triton_mxfp4_{path.value}"
    return fn


for _path in kernels.MxPath:
    register_impl("mx_linear", f"triton_mxfp4_{_path.value}", tags=("ours", "interpreter-on-cpu"),
                  available=_available(_path), supports=_supports(_path))(_impl(_path))
