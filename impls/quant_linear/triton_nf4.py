"""Our Triton NF4 (+LoRA) kernels: fused dequantise-GEMV and dequantise-GEMM, forward and backward.

The packed bytes and fp32 block scales are read in place (bnb layout, impls/kernels/nf4.py); each tile of W
is dequantised in registers and never written out. The 16-value code lookup is a select tree on the nibble's
bits (the interpreter cannot do data-dependent pointer loads). The LoRA up-projection is fused into the
epilogue: forward ``out += scaling * (x A^T) B^T``, backward ``dx += scaling * (g B) A``; the rank-r products
``x A^T``, ``g B`` and the LoRA weight gradients are small and stay in PyTorch.
On GPUs the kernels compile; on the CPU they run through TRITON_INTERPRET=1 (parity only, tiny cases,
fp16/fp32: the interpreter has no bf16 arithmetic).
"""

from __future__ import annotations

import functools

import torch
from twinbench.harness.core.registry import register_impl
from twinbench.impls.kernels.availability import interpreting, triton_available
from twinbench.impls.kernels.nf4_weight import NF4Weight
from twinbench.impls.kernels.triton_launch import dot_dim, dot_input_precision
from twinbench.reference.autograd_once import differentiable_once

GEMV_MAX_ROWS = 16
# Tiles on GPUs: (BN, BK) for the GEMV, (BM, BN, BK) for the GEMM (the AOT compile checks use these too).
GPU_TILES = {"gemv": (32, 64), "gemm": (16, 64, 32)}
INTERPRETER_MAX_WEIGHT, INTERPRETER_MAX_BATCH = 128 * 256, 32  # the interpreter runs one program at a time


@functools.cache
def kernels():
    """The kernels, imported on first use so this module imports without triton."""
    import triton
    from twinbench.impls.kernels import nf4_triton as k

    return {"triton": triton, "gemm_fwd": k.gemm_fwd, "gemm_bwd": k.gemm_bwd, "gemv_fwd": k.gemv_fwd,
            "gemv_bwd": k.gemv_bwd}


def launch(kind: str, direction: str, a: torch.Tensor, packed2d: torch.Tensor, scales: torch.Tensor,
           low: torch.Tensor | None, lora_w: torch.Tensor | None, scaling: float, blocksize: int) -> torch.Tensor:
    """fwd: a = x [M, K] -> x W^T (+ s * low B^T), low = x A^T, lora_w = B [N, r].
    bwd: a = g [M, N] -> g W (+ s * low A), low = g B, lora_w = A [r, K]."""
    k_ = kernels()
    n, half = packed2d.shape
    k = 2 * half
    m = a.shape[0]
    out = torch.empty((m, n if direction == "fwd" else k), dtype=a.dtype, device=a.device)
    has_lora = low is not None
    r = lora_w.shape[1] if has_lora and direction == "fwd" else (lora_w.shape[0] if has_lora else 0)
    dummy = a  # unused pointer when there is no LoRA term
    args = (a, packed2d, scales, low if has_lora else dummy, lora_w.contiguous() if has_lora else dummy, out)
    common = dict(BS=blocksize, HAS_LORA=has_lora, RP=dot_dim(r))
    nb = scales.shape[1]
    cdiv = k_["triton"].cdiv
    # The interpreter pays per program and per loop step, not per element: there, one big tile.
    interp = interpreting()
    if kind == "gemv":
        bn, bk = (128, 256) if interp else GPU_TILES["gemv"]
        if direction == "fwd":
            k_["gemv_fwd"][(cdiv(n, bn), m)](*args, n, k, nb, r, scaling, BN=bn, BK=bk, **common)
        else:
            k_["gemv_bwd"][(cdiv(k, bk), m)](*args, n, k, nb, r, scaling, BN=bn, BK=bk, **common)
        return out
    bm, bn, bk = (32, 128, 128) if interp else GPU_TILES["gemm"]
    precision = dot_input_precision(a.dtype)
    if direction == "fwd":
        k_["gemm_fwd"][(cdiv(m, bm), cdiv(n, bn))](*args, m, n, k, nb, r, scaling, PRECISION=precision, BM=bm, BN=bn, BK=bk,
                                                   **common)
    else:
        k_["gemm_bwd"][(cdiv(m, bm), cdiv(k, bk))](*args, m, n, k, nb, r, scaling, PRECISION=precision, BM=bm, BN=bn, BK=bk,
                                                   **common)
    return out


class _TritonNF4LoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed2d, scales, lora_A, lora_B, scaling, blocksize, kind):
        xa = x @ lora_A.t() if lora_A is not None else None
        out = launch(kind, "fwd", x.contiguous(), packed2d, scales, xa, lora_B, scaling, blocksize)
        ctx.save_for_backward(x, packed2d, scales, lora_A, lora_B, xa)
        ctx.meta = (scaling, blocksize, kind)
        return out

    @staticmethod
    @differentiable_once("_TritonNF4LoRA")  # dx from the Triton kernel; dB from the x A^T kept from forward
    def backward(ctx, g):
        x, packed2d, scales, lora_A, lora_B, xa = ctx.saved_tensors
        scaling, blocksize, kind = ctx.meta
        g = g.contiguous()
        gb = g @ lora_B if lora_A is not None else None
        dx = launch(kind, "bwd", g, packed2d, scales, gb, lora_A, scaling, blocksize)
        da = (gb.t() @ x) * scaling if lora_A is not None else None
        db = (g.t() @ xa) * scaling if lora_A is not None else None
        return dx, None, None, da, db, None, None, None


def triton_nf4_lora_linear(x: torch.Tensor, weight: NF4Weight, lora_A=None, lora_B=None, scaling: float = 1.0,
                           bias=None, kind: str | None = None) -> torch.Tensor:
    """As impls/quant_linear/fused.py's nf4_lora_linear, through the Triton kernels (kind: 'gemv' | 'gemm')."""
    n, k = weight.shape
    if not weight.row_aligned():
        raise ValueError(f"in_features {k} is not a multiple of blocksize {weight.blocksize}")
    x2 = x.reshape(-1, k)
    kind = kind or ("gemv" if x2.shape[0] <= GEMV_MAX_ROWS else "gemm")
    packed2d = weight.packed.reshape(n, k // 2)
    scales = weight.block_scales().reshape(n, k // weight.blocksize).contiguous()
    out = _TritonNF4LoRA.apply(x2, packed2d, scales, lora_A, lora_B, float(scaling), weight.blocksize, kind)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], n)


# --- registration ---------------------------------------------------------------------------------------

def _supports(kind: str):
    def supports(case, device) -> tuple[bool, str]:
        if case["inp"] % case["blocksize"]:
            return False, "in_features must be a multiple of blocksize"
        if kind == "gemv" and case["batch"] > GEMV_MAX_ROWS:
            return False, f"GEMV kernel: batch <= {GEMV_MAX_ROWS}"
        if getattr(device, "backend", "cpu") == "cpu":
            if case["dtype"] == "bf16":
                return False, "Triton interpreter: no bf16 arithmetic (fp16/fp32 only)"
            if case["out"] * case["inp"] > INTERPRETER_MAX_WEIGHT or case["batch"] > INTERPRETER_MAX_BATCH:
                return False, "Triton interpreter: tiny cases only"
        return True, ""
    return supports


def _impl(kind: str):
    def fn(x, packed, absmax, lora_A=None, lora_B=None, bias=None, absmax2=None, code2=None, offset=None, *,
           shape, blocksize, scaling):
        w = NF4Weight(packed, absmax, tuple(shape), blocksize, absmax2, code2, offset)
        return triton_nf4_lora_linear(x, w, lora_A, lora_B, scaling, bias, kind=kind)
    fn.__qualname__ = f"triton_{kind}"
    return fn


for _kind in ("gemv", "gemm"):
    register_impl("quant_linear", f"triton_{_kind}", tags=("ours", "interpreter-on-cpu"), available=triton_available,
                  supports=_supports(_kind))(_impl(_kind))
