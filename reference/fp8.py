"""Reference FP8 quantisation and GEMM: per-tensor, per-row and DeepSeek-V3 block scaling, in plain PyTorch.

Data contract (docs/low_precision.md): codes are uint8 bit patterns of an FP8 :class:`Format`; scales are fp32
*dequantisation* multipliers, value ~= decode(code) * scale. x is M x K (activations), w is N x K (nn.Linear
layout), y = x @ w.T is M x N. Scale shapes: per-tensor ``()``; per-row x ``(M,)``, w ``(N,)``; block x
``(M, ceil(K/128))`` over 1 x 128 tiles, w ``(ceil(N/128), ceil(K/128))`` over 128 x 128 tiles. A K (or N)
that is not a multiple of 128 leaves a partial last tile, whose amax is over the elements that exist.

Quantisation of one group (the tensor, a row, a tile): ``amax = max|x|`` in fp32 (NaN propagates);
``scale = amax / max_value(format)`` in fp32, raised to the smallest normal fp32 (2^-126) when it would
underflow (a subnormal amax), and 1 for an all-zero group; ``code = encode(x_fp32 / scale)`` with that fp32
division, round-to-nearest-even, saturating or not. An inf or NaN in a group makes its scale inf or NaN:
every value of that group then dequantises to NaN (0 * inf), which is what the traps check impls keep.

The GEMM dequantises both operands in the dtype of the scales it is given (fp32 as stored, fp64 when the
harness upcasts them: then the dequantised operands are exact) and multiplies there.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
from twinbench.reference.autograd_once import differentiable_once
from twinbench.reference.lowp_formats import Format, decode, encode, max_value

BLOCK = 128  # DeepSeek-V3: 1 x 128 activation tiles, 128 x 128 weight tiles
SMALLEST_SCALE = 2.0 ** -126  # the smallest normal fp32: a scale below it underflows (docs/low_precision.md)


class Scaling(str, enum.Enum):
    TENSOR = "tensor"
    ROW = "row"
    BLOCK = "block"


class Operand(str, enum.Enum):
    """Which side of the GEMM a tensor is: block scaling tiles them differently."""

    X = "x"  # activations (or an output gradient): 1 x 128 tiles
    W = "w"  # weight: 128 x 128 tiles


@dataclass(frozen=True)
class Fp8Tensor:
    """An FP8-quantised 2-D tensor: uint8 codes, fp32 dequantisation scales, and how to read them."""

    codes: torch.Tensor
    scale: torch.Tensor
    fmt: Format
    scaling: Scaling
    operand: Operand

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.fmt, self.scaling, self.operand, dtype)


def tile_shape(scaling: Scaling | str, operand: Operand | str, rows: int, cols: int) -> tuple[int, int]:
    """The group each scale covers: (rows per group, columns per group)."""
    scaling, operand = Scaling(scaling), Operand(operand)
    if scaling is Scaling.TENSOR:
        return rows, cols
    if scaling is Scaling.ROW:
        return 1, cols
    return (1, BLOCK) if operand is Operand.X else (BLOCK, BLOCK)


def scale_shape(scaling: Scaling | str, operand: Operand | str, rows: int, cols: int) -> tuple[int, ...]:
    scaling = Scaling(scaling)
    if scaling is Scaling.TENSOR:
        return ()
    if scaling is Scaling.ROW:
        return (rows,)
    tr, tc = tile_shape(scaling, operand, rows, cols)
    return (math.ceil(rows / tr), math.ceil(cols / tc))


def expand_scale(scale: torch.Tensor, scaling: Scaling | str, operand: Operand | str, rows: int,
                 cols: int) -> torch.Tensor:
    """The scale of every element: [rows, cols] (a partial last tile keeps its own scale)."""
    scaling = Scaling(scaling)
    if scaling is Scaling.TENSOR:
        return scale.reshape(1, 1).expand(rows, cols)
    if scaling is Scaling.ROW:
        return scale.reshape(rows, 1).expand(rows, cols)
    tr, tc = tile_shape(scaling, operand, rows, cols)
    return scale.repeat_interleave(tr, dim=0)[:rows].repeat_interleave(tc, dim=1)[:, :cols]


def group_amax(x: torch.Tensor, scaling: Scaling | str, operand: Operand | str) -> torch.Tensor:
    """max|x| per group, fp32, NaN-propagating; shaped like the scales."""
    rows, cols = x.shape
    a = x.detach().to(torch.float32).abs()
    scaling = Scaling(scaling)
    if scaling is Scaling.TENSOR:
        return a.amax()
    if scaling is Scaling.ROW:
        return a.amax(dim=1)
    tr, tc = tile_shape(scaling, operand, rows, cols)
    pr, pc = -rows % tr, -cols % tc  # pad with 0: the partial last tile's amax is over what exists
    a = torch.nn.functional.pad(a, (0, pc, 0, pr))
    return a.reshape(a.shape[0] // tr, tr, a.shape[1] // tc, tc).amax(dim=(1, 3))


def scale_from_amax(amax: torch.Tensor, fmt: Format | str) -> torch.Tensor:
    """amax / max_value in fp32; at least 2^-126 (a subnormal scale would lose bits), 1 for an all-zero group."""
    scale = amax.to(torch.float32) / max_value(fmt)
    scale = torch.where(scale < SMALLEST_SCALE, torch.full_like(scale, SMALLEST_SCALE), scale)
    return torch.where(amax == 0, torch.ones_like(scale), scale)


def quantize(x: torch.Tensor, fmt: Format | str, scaling: Scaling | str, operand: Operand | str = Operand.X, *,
             saturate: bool = True) -> Fp8Tensor:
    """A 2-D tensor -> codes and scales (the module docstring's arithmetic)."""
    fmt, scaling, operand = Format(fmt), Scaling(scaling), Operand(operand)
    rows, cols = x.shape
    scale = scale_from_amax(group_amax(x, scaling, operand), fmt)
    scaled = x.detach().to(torch.float32) / expand_scale(scale, scaling, operand, rows, cols)
    return Fp8Tensor(encode(scaled, fmt, saturate=saturate), scale, fmt, scaling, operand)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, fmt: Format | str, scaling: Scaling | str,
               operand: Operand | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """decode(code) * scale in ``dtype`` (exact in fp64; in fp32 one rounding of the product)."""
    rows, cols = codes.shape
    values = decode(codes, fmt).to(dtype)
    return values * expand_scale(scale.to(dtype), scaling, operand, rows, cols)


def fp8_gemm(x: Fp8Tensor, w: Fp8Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """y = dequantize(x) @ dequantize(w).T computed in ``dtype`` (fp32: what FP8 tensor cores accumulate in)."""
    return x.dequantize(dtype) @ w.dequantize(dtype).t()


class Fp8TrainingLinear(torch.autograd.Function):
    """The FP8 training recipe on a frozen quantised weight: forward quantises x to E4M3 (the operands'
    format) and multiplies; backward quantises the output gradient to E5M2 (gradients need range more than
    precision), same scaling granularity along its own reduction dim, and dx = deq(dy) @ deq(w). The
    quantisation itself passes gradients straight through. Arithmetic in ``dtype``."""

    @staticmethod
    def forward(ctx, x, w_codes, w_scale, fmt_x, fmt_grad, fmt_w, scaling, saturate, dtype):
        xq = quantize(x, fmt_x, scaling, Operand.X, saturate=saturate)
        w = dequantize(w_codes, w_scale, fmt_w, scaling, Operand.W, dtype)
        ctx.save_for_backward(w)
        ctx.fmt_grad, ctx.scaling, ctx.saturate, ctx.dtype = fmt_grad, scaling, saturate, dtype
        return (xq.dequantize(dtype) @ w.t()).to(x.dtype)

    @staticmethod
    @differentiable_once("Fp8TrainingLinear")  # dx of the quantised dy: no derivative in dy
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        gq = quantize(g, ctx.fmt_grad, ctx.scaling, Operand.X, saturate=ctx.saturate)
        dx = gq.dequantize(ctx.dtype) @ w
        return dx.to(g.dtype), None, None, None, None, None, None, None, None


def grad_format(fmt: Format | str) -> Format:
    """The gradient format of the recipe whose forward format is ``fmt``: E5M2 in the same family (OCP/FNUZ)."""
    return Format.E5M2FNUZ if Format(fmt) in (Format.E4M3FNUZ, Format.E5M2FNUZ) else Format.E5M2
