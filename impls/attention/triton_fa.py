"""Our Triton FlashAttention-2 (forward + backward, bottom-right causal, GQA/MQA, head_dim <= 256).

Compiled (and autotuned) on CUDA/ROCm/XPU; on the CPU it runs through the Triton interpreter
(TRITON_INTERPRET=1, which the CPU worker and tests/conftest.py set): parity only, never timed.
Kernels: impls/_triton_fa_kernels.py, imported on first call so this module imports without triton.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch.autograd.function import once_differentiable
from twinbench.harness.core.registry import register_impl

MAX_HEAD_DIM = 256
# Under the interpreter every program runs through numpy one at a time: cost grows with B*Hq*Sq*Sk*D.
# Above this, a CPU case is skipped (parity of such shapes is the GPU's job; `--profile interp` covers CPU).
INTERPRETER_MAX_WORK = 1 * 4 * 128 * 128 * 64  # the quick grid's 128x128 case; its 2x8x96x160 GQA case: 30 s
# Triton backend plugin name per twinbench backend.
_TRITON_BACKEND = {"cuda": "nvidia", "rocm": "amd", "xpu": "intel"}


def available(device) -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton not installed (pip install 'twinbench[triton]')"
    if device.backend == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            return False, "Triton runs on the CPU only through its interpreter (TRITON_INTERPRET=1)"
        return True, ""
    if device.backend not in _TRITON_BACKEND:
        return False, f"Triton has no driver for {device.backend}"
    try:
        from triton.backends import backends
    except Exception as exc:  # a broken triton install is a reason, not a crash
        return False, f"triton backends unreadable: {type(exc).__name__}: {exc}"
    if _TRITON_BACKEND[device.backend] not in backends:
        return False, f"this triton build has no {_TRITON_BACKEND[device.backend]!r} backend for {device.backend}"
    return True, ""


def _interpreter_work(case) -> int:
    return case["batch"] * case["heads"] * case["seq_q"] * case["seq_k"] * case["head_dim"]


def supports(case, device) -> tuple[bool, str]:
    if case["head_dim"] > MAX_HEAD_DIM:
        return False, f"head_dim {case['head_dim']} > {MAX_HEAD_DIM}"
    if device.backend == "cpu":
        if case["dtype"] == "bf16":
            return False, "Triton interpreter has no bf16 tl.dot (triton #11584): fp16/fp32 only on CPU"
        if _interpreter_work(case) > INTERPRETER_MAX_WORK:
            return False, ("too large for the Triton interpreter (B*H*Sq*Sk*D > "
                           f"{INTERPRETER_MAX_WORK}); CPU parity uses --profile interp")
    return True, ""


class FlashAttention(torch.autograd.Function):
    """softmax(q k^T * scale) v with the FlashAttention-2 forward/backward kernels."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float):
        from twinbench.impls.attention import triton_fa_kernels as kernels

        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = kernels.forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        from twinbench.impls.attention import triton_fa_kernels as kernels

        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = kernels.backward(do.contiguous(), q, k, v, o, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: float | None = None) -> torch.Tensor:
    """q: [B, Hq, Sq, D]; k, v: [B, Hkv, Sk, D], Hq a multiple of Hkv; same dtype and device."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit "
                         "[B, Hq, Sq, D] / [B, Hkv, Sk, D]")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} not a multiple of kv heads {k.shape[1]}")
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {q.shape[3]} > {MAX_HEAD_DIM}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q/k/v must share one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    scale = q.shape[3] ** -0.5 if scale is None else float(scale)
    return FlashAttention.apply(q, k, v, bool(causal), scale)


@register_impl("attention", "triton_fa", tags=("ours", "interpreter-on-cpu"), available=available,
               supports=supports, deterministic=True)
def triton_fa(q, k, v, *, causal, scale):
    return flash_attention(q, k, v, causal=causal, scale=scale)
