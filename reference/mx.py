"""Reference microscaling formats: MXFP8 and MXFP4 (OCP MX v1.0) and NVFP4, in plain PyTorch.

Data contract (docs/low_precision.md). Blocks run along K (the reduction dim) of a 2-D [rows, K] tensor; a
K that is not a multiple of the block leaves a partial last block, whose amax is over the elements that exist.

- **MXFP8** (block 32): e4m3 or e5m2 codes (uint8, one per element), an E8M0 scale code per block,
  shape (rows, ceil(K/32)).
- **MXFP4** (block 32): E2M1 codes packed two per byte, element 2i in the low nibble, 2i+1 in the high
  nibble, shape (rows, ceil(K/2)), a padding nibble 0; E8M0 scales as MXFP8.
- **NVFP4** (block 16): E2M1 packed as MXFP4, an E4M3 (OCP) scale code per block (rows, ceil(K/16)), and an
  fp32 global scale per tensor: value = e2m1 * decode_e4m3(block scale) * global scale.

MX shared exponent (OCP MX v1.0 §6.3): ``floor(log2(amax)) - emax_elem`` (emax_elem = 2 for E2M1, 8 for
E4M3, 15 for E5M2), clamped to E8M0's [-127, 127]; elements are ``x_fp32 / 2^exponent`` rounded to nearest
even, saturating (a block's largest element can exceed the element format's max by up to 2^emax_elem's
next binade: it clamps). amax 0 gives the smallest scale (code 0, 2^-127) and all-zero codes; an inf or NaN
in a block gives the NaN scale (0xFF) and zero element codes: the whole block decodes to NaN.

NVFP4 (NVIDIA's recipe, as torchao computes it): ``global = amax_tensor / (448 * 6)`` in fp32 (1 when the
tensor is all zero); block scale ``encode_e4m3(amax_block / 6 / global)`` saturating; elements
``x_fp32 / (decode(block scale) * global)`` (1 when that product is 0) rounded to E2M1.

The GEMM dequantises both operands in the dtype it is asked for (fp64: exact) and multiplies there.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
from twinbench.reference.lowp_formats import (
    E8M0_NAN,
    FP32_DIVISION_SLACK,
    Format,
    decode,
    e8m0_code,
    encode,
    floor_log2,
    max_value,
    pack_nibbles,
    rel_error_bound,
    unpack_nibbles,
)


class MxFormat(str, enum.Enum):
    MXFP8_E4M3 = "mxfp8_e4m3"
    MXFP8_E5M2 = "mxfp8_e5m2"
    MXFP4 = "mxfp4"
    NVFP4 = "nvfp4"


@dataclass(frozen=True)
class MxSpec:
    element: Format
    block: int
    scale: Format  # E8M0 (MX) or E4M3 (NVFP4)
    emax_elem: int  # the exponent of the element format's largest power of two
    packed: bool  # E2M1: two codes per byte


SPECS: dict[MxFormat, MxSpec] = {
    MxFormat.MXFP8_E4M3: MxSpec(Format.E4M3, 32, Format.E8M0, 8, False),
    MxFormat.MXFP8_E5M2: MxSpec(Format.E5M2, 32, Format.E8M0, 15, False),
    MxFormat.MXFP4: MxSpec(Format.E2M1, 32, Format.E8M0, 2, True),
    MxFormat.NVFP4: MxSpec(Format.E2M1, 16, Format.E4M3, 2, True),
}


@dataclass(frozen=True)
class MxTensor:
    """A block-scaled 2-D tensor: element codes (packed for FP4), scale codes, the fp32 global scale (NVFP4;
    1 for MX formats, which have none), and its logical shape."""

    codes: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor
    fmt: MxFormat
    shape: tuple[int, int]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.global_scale, self.fmt, self.shape[1], dtype)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[rows, K] -> [rows, ceil(K/block), block], the partial last block padded with 0 (amax-neutral)."""
    return torch.nn.functional.pad(x, (0, -x.shape[1] % block)).reshape(x.shape[0], -1, block)


def quantize(x: torch.Tensor, fmt: MxFormat | str) -> MxTensor:
    """A 2-D tensor -> element codes, scale codes, global scale (the module docstring's arithmetic)."""
    fmt = MxFormat(fmt)
    spec = SPECS[fmt]
    rows, k = x.shape
    x32 = x.detach().to(torch.float32)
    blocks = _blocks(x32, spec.block)
    amax = blocks.abs().amax(dim=2)  # NaN-propagating
    finite = torch.isfinite(amax)
    if fmt is MxFormat.NVFP4:
        tensor_amax = x32.abs().amax()
        global_scale = tensor_amax / (max_value(Format.E4M3) * max_value(Format.E2M1))
        global_scale = torch.where(tensor_amax == 0, torch.ones_like(global_scale), global_scale)
        scales = encode(amax / max_value(Format.E2M1) / global_scale, Format.E4M3, saturate=True)
        divisor = decode(scales, Format.E4M3).to(torch.float32) * global_scale
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        global_scale = torch.ones((), dtype=torch.float32, device=x.device)
        safe = torch.where(finite & (amax > 0), amax, torch.ones_like(amax))
        exponent = floor_log2(safe) - spec.emax_elem
        scales = e8m0_code(exponent)
        scales = torch.where(amax == 0, torch.zeros_like(scales), scales)  # smallest scale, all-zero codes
        divisor = torch.exp2(exponent.clamp(-127, 127).to(torch.float32))
    scaled = blocks / divisor.unsqueeze(-1)
    scaled = torch.where(finite.unsqueeze(-1), scaled, torch.zeros_like(scaled))
    codes = encode(scaled, spec.element, saturate=True).reshape(rows, -1)[:, :k]
    if fmt is not MxFormat.NVFP4:
        scales = torch.where(finite, scales, torch.full_like(scales, E8M0_NAN))
    if spec.packed:
        codes = pack_nibbles(codes)
    return MxTensor(codes, scales, global_scale, fmt, (rows, k))


def dequantize(codes: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor, fmt: MxFormat | str, k: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """element * block scale (* global scale) in ``dtype`` -> [rows, K]."""
    fmt = MxFormat(fmt)
    spec = SPECS[fmt]
    elements = unpack_nibbles(codes, k) if spec.packed else codes
    values = decode(elements, spec.element).to(dtype)
    block_scale = decode(scales, spec.scale).to(dtype) * global_scale.to(dtype)
    # a NaN scale (E8M0 0xFF, E4M3 S.1111.111) makes its whole block NaN, zero elements included
    return values * block_scale.repeat_interleave(spec.block, dim=1)[:, :k]


def mx_gemm(x: MxTensor, w: MxTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """y = dequantize(x) @ dequantize(w).T computed in ``dtype``."""
    return x.dequantize(dtype) @ w.dequantize(dtype).t()


def scales_shape(fmt: MxFormat | str, rows: int, k: int) -> tuple[int, int]:
    return rows, math.ceil(k / SPECS[MxFormat(fmt)].block)


def saturation_bound(fmt: MxFormat | str) -> float:
    """How far past the element format's max a block's scale rule lets a scaled element go, as the relative
    error of saturating it (docs/low_precision.md §Parity). MX: the E8M0 exponent is floor(log2 amax) - emax, so
    the scaled amax stays below 2^(emax + 1): error below 1 - max / 2^(emax + 1) (E2M1 25%, E4M3 and E5M2
    12.5%). NVFP4: the E4M3 block scale is rounded to nearest, at most 2^-4 below amax / 6 when it is a normal
    E4M3 (a subnormal scale rounds coarser: those blocks are not bounded), so the error is below 2^-4. Plus
    the fp32 divisions' rounding."""
    spec = SPECS[MxFormat(fmt)]
    if spec.scale is Format.E8M0:
        return 1 - max_value(spec.element) / 2.0 ** (spec.emax_elem + 1) + 2 * FP32_DIVISION_SLACK
    return rel_error_bound(spec.scale) + FP32_DIVISION_SLACK  # half an E4M3 ulp, relative


def element_scales(scales: torch.Tensor, global_scale: torch.Tensor, fmt: MxFormat | str, k: int,
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Each element's dequantisation multiplier: block scale * global scale, [rows, K]."""
    spec = SPECS[MxFormat(fmt)]
    block_scale = decode(scales, spec.scale).to(dtype) * global_scale.to(dtype)
    return block_scale.repeat_interleave(spec.block, dim=1)[:, :k]
