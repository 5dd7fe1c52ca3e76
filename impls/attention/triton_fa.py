"""Our Triton FlashAttention-2 (forward + backward, bottom-right causal, GQA/MQA, head_dim <= 256).

Compiled (and autotuned) on CUDA/ROCm/XPU; on the CPU it runs through the Triton interpreter
(TRITON_INTERPRET=1, which the CPU worker and tests/conftest.py set): parity only, never timed.
Kernels: impls/attention/triton_fa_kernels.py (they define nothing when triton is absent).
"""

from __future__ import annotations

from types import ModuleType

import torch
from twinbench.harness.core.registry import register_impl
from twinbench.impls.attention import triton_fa_kernels
from twinbench.impls.kernels.availability import triton_available
from twinbench.impls.kernels.triton_launch import dot_dim
from twinbench.reference.autograd_once import differentiable_once

MAX_HEAD_DIM = 256
# Under the interpreter every program runs through numpy one at a time: cost grows with B*Hq*Sq*Sk*D.
# Above this, a CPU case is skipped (parity of such shapes is the GPU's job; `--profile interp` covers CPU).
# The bound admits the quick grid's 128x128 case (docs/triton_fa.md gives the interpreter's times).
INTERPRETER_MAX_WORK = 1 * 4 * 128 * 128 * 64
available = triton_available


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
    elif device.backend in ("cuda", "rocm") and not triton_fa_kernels.interpreting():
        # no tile of some kernel fits this GPU's shared memory (fp32 head_dim 256 on a ~99 KiB consumer card)
        elem = 4 if case["dtype"] == "fp32" else 2
        return triton_fa_kernels.fits_somewhere(dot_dim(case["head_dim"]), elem,
                                                triton_fa_kernels.device_limits(torch.device(device.torch_device)))
    return True, ""


class FlashAttention(torch.autograd.Function):
    """softmax(q k^T * scale) v with the FlashAttention-2 forward/backward kernels of ``kernels`` (a module
    with triton_fa_kernels' ``forward``/``backward``; tests pass deliberately wrong copies of it)."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, kernels: ModuleType):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = kernels.forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale, ctx.kernels = causal, scale, kernels
        return o

    @staticmethod
    # not once_differentiable: dq/dk/dv depend on the saved q, k, v as well as on do, and its error node would be
    # pruned from torch.autograd.grad(penalty, q) (reference/autograd_once.py)
    @differentiable_once("FlashAttention")
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = ctx.kernels.backward(do.contiguous(), q, k, v, o, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: float | None = None, kernels: ModuleType = triton_fa_kernels) -> torch.Tensor:
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
    return FlashAttention.apply(q, k, v, bool(causal), scale, kernels)


@register_impl("attention", "triton_fa", tags=("ours", "interpreter-on-cpu"), available=available,
               supports=supports, deterministic=True)
def triton_fa(q, k, v, *, causal, scale):
    return flash_attention(q, k, v, causal=causal, scale=scale)
