"""Our Triton FP8 GEMM: y = (decode(xq) * sx) @ (decode(wq) * sw).T, per-tensor, per-row or 128-block scales.

Operands travel as uint8 bit patterns plus a format name (the low-precision data contract,
docs/low_precision.md): ``e4m3`` (OCP E4M3FN), ``e4m3fnuz`` (MI300), ``e5m2`` (OCP), ``e5m2fnuz``. x is M x K
(activations), w is N x K (nn.Linear layout), scales are fp32 dequantisation multipliers: per-tensor ``()``,
per-row x ``(M,)`` / w ``(N,)``, block (DeepSeek-V3) x ``(M, ceil(K/128))`` over 1x128 tiles and w
``(ceil(N/128), ceil(K/128))`` over 128x128 tiles.

Two code paths, one kernel:

- **decode** (``Path.DECODE``): each uint8 tile is decoded to fp32 by bit arithmetic (sign, exponent and mantissa
  fields re-biased into an fp32 bit pattern; subnormals as mantissa x smallest step; the format's NaN/inf codes),
  then cast to fp16 for ``tl.dot``. Every value of all four formats is exact in fp16 (E4M3 needs 2^-9..448,
  E5M2-FNUZ 2^-17..57344, fp16 spans 2^-24..65504) and fp16 x fp16 products are exact in the fp32
  accumulator, so this path is the dequantise-then-matmul reference up to the order of fp32 sums. It runs on
  any GPU (FNUZ on NVIDIA, OCP on MI300) and under the CPU interpreter.
- **native** (``Path.NATIVE``): the uint8 tile is bitcast to the device's fp8 type (``tl.float8e4nv`` /
  ``tl.float8e5`` for OCP on sm89+/gfx950/gfx12, ``tl.float8e4b8`` / ``tl.float8e5b16`` for FNUZ on gfx942: which
  device has which is harness/core/devices.py ``lowp_support``) and
  ``tl.dot`` multiplies in fp8 with an fp32 accumulator. The interpreter emulates these types (through fp16),
  so the CPU checks this path's logic too; only a GPU shows its hardware rounding.

Scales: per-tensor and per-row scales factor out of the K sum and are applied once in the epilogue; 128-block
scales change along K, so each K step (BK divides 128, one scale block per step) is scaled before it is
accumulated (the DeepSeek-V3 recipe's promotion to fp32 per block).

Kernel source is module level (the interpreter resolves jit helpers by global name) and defines nothing when
triton is absent; the launcher imports nothing from triton until the first launch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from twinbench.impls.kernels.availability import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # the impls' availability checks report it
    triton = None

BLOCK = 128  # the DeepSeek-V3 block: 1x128 activation tiles, 128x128 weight tiles


class Path(enum.Enum):
    DECODE = "decode"
    NATIVE = "native"


class Scaling(enum.Enum):
    TENSOR = "tensor"
    ROW = "row"
    BLOCK = "block"


@dataclass(frozen=True)
class Fp8Layout:
    """A format's bit fields as the decode path reads them (``code`` is the kernel's constexpr for it)."""

    name: str
    code: int
    exponent_bits: int
    mantissa_bits: int
    bias: int
    specials: str  # "fn": only S.1111.111 is NaN; "ieee": top exponent inf/NaN; "fnuz": 0x80 is the one NaN
    triton_type: str  # the tl dtype the native path bitcasts to
    max: float


FP8_LAYOUTS = {f.name: f for f in (
    Fp8Layout("e4m3", 0, 4, 3, 7, "fn", "float8e4nv", 448.0),
    Fp8Layout("e4m3fnuz", 1, 4, 3, 8, "fnuz", "float8e4b8", 240.0),
    Fp8Layout("e5m2", 2, 5, 2, 15, "ieee", "float8e5", 57344.0),
    Fp8Layout("e5m2fnuz", 3, 5, 2, 16, "fnuz", "float8e5b16", 57344.0),
)}

# Tiles (BM, BN, BK). BK divides BLOCK so one K step lies in one scale block. Under the interpreter (one
# program at a time in numpy) fewer, larger programs are faster; small cases still cross tile edges.
GPU_TILES = (64, 64, 64)
# 8 warps: with 4, ptxas spills this tile on sm90 (255 registers); the AOT checks compile exactly these.
GPU_LAUNCH = {"num_warps": 8, "num_stages": 3}
INTERPRETER_TILES = (32, 32, 128)


if triton is not None:  # absent: no kernels (the impl reports triton missing)

    @triton.jit
    def _decode_fields(c, EXP: tl.constexpr, MAN: tl.constexpr, BIAS: tl.constexpr, SPECIALS: tl.constexpr):
        """fp32 value of the int32 codes ``c`` (0..255) of an fp8 format with these fields."""
        sign = (c >> 7) & 1
        e = (c >> MAN) & ((1 << EXP) - 1)
        m = c & ((1 << MAN) - 1)
        normal = (((e + (127 - BIAS)) << 23) | (m << (23 - MAN))).to(tl.float32, bitcast=True)
        step = tl.full(c.shape, (128 - BIAS - MAN) << 23, tl.int32).to(tl.float32, bitcast=True)  # 2^(1-BIAS-MAN)
        mag = tl.where(e == 0, m.to(tl.float32) * step, normal)
        value = tl.where(sign == 1, -mag, mag)
        nan = tl.full(c.shape, 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)
        if SPECIALS == 0:  # OCP E4M3FN: S.1111.111 is NaN, no inf
            value = tl.where((c & 0x7F) == 0x7F, nan, value)
        elif SPECIALS == 1:  # IEEE-like: top exponent is inf (m = 0) or NaN
            inf = tl.full(c.shape, 0x7F800000, tl.int32).to(tl.float32, bitcast=True)
            top = e == (1 << EXP) - 1
            value = tl.where(top & (m == 0), tl.where(sign == 1, -inf, inf), value)
            value = tl.where(top & (m != 0), nan, value)
        else:  # FNUZ: 0x80 (negative zero's pattern) is the only NaN
            value = tl.where(c == 0x80, nan, value)
        return value

    @triton.jit
    def decode_fp8(code, FMT: tl.constexpr):
        """fp32 value of uint8 codes in format FMT (Fp8Layout.code)."""
        c = code.to(tl.int32)
        if FMT == 0:
            return _decode_fields(c, 4, 3, 7, 0)
        elif FMT == 1:
            return _decode_fields(c, 4, 3, 8, 2)
        elif FMT == 2:
            return _decode_fields(c, 5, 2, 15, 1)
        else:
            return _decode_fields(c, 5, 2, 16, 2)

    @triton.jit
    def as_native_fp8(code, FMT: tl.constexpr):
        """The uint8 tile reinterpreted as the device's fp8 type (no conversion)."""
        if FMT == 0:
            return code.to(tl.float8e4nv, bitcast=True)
        elif FMT == 1:
            return code.to(tl.float8e4b8, bitcast=True)
        elif FMT == 2:
            return code.to(tl.float8e5, bitcast=True)
        else:
            return code.to(tl.float8e5b16, bitcast=True)

    @triton.jit
    def fp8_tile_dot(xc, wc, X_FMT: tl.constexpr, W_FMT: tl.constexpr, NATIVE: tl.constexpr):
        """xc [BM, BK] @ wc [BN, BK]^T of uint8 codes, fp32 result, unscaled."""
        if NATIVE:
            return tl.dot(as_native_fp8(xc, X_FMT), tl.trans(as_native_fp8(wc, W_FMT)), out_dtype=tl.float32)
        else:
            a = decode_fp8(xc, X_FMT).to(tl.float16)
            b = decode_fp8(wc, W_FMT).to(tl.float16)
            return tl.dot(a, tl.trans(b), out_dtype=tl.float32)

    @triton.jit
    def fp8_gemm_kernel(x_ptr, w_ptr, sx_ptr, sw_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym, KB,
                        X_FMT: tl.constexpr, W_FMT: tl.constexpr, SCALING: tl.constexpr, NATIVE: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """SCALING: 0 per-tensor, 1 per-row, 2 128-block (BK divides 128). KB = ceil(K / 128)."""
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            xc = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                         other=0)
            wc = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K),
                         other=0)
            part = fp8_tile_dot(xc, wc, X_FMT, W_FMT, NATIVE)
            if SCALING == 2:
                kb = k0 // 128
                sxb = tl.load(sx_ptr + rm * KB + kb, mask=rm < M, other=0.0)
                swb = tl.load(sw_ptr + (rn // 128) * KB + kb, mask=rn < N, other=0.0)
                acc += part * sxb[:, None] * swb[None, :]
            else:
                acc += part
        if SCALING == 0:
            acc = acc * (tl.load(sx_ptr) * tl.load(sw_ptr))
        elif SCALING == 1:
            sxr = tl.load(sx_ptr + rm, mask=rm < M, other=0.0)
            swr = tl.load(sw_ptr + rn, mask=rn < N, other=0.0)
            acc = acc * sxr[:, None] * swr[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def rowwise_scale(amax, FMT_MAX: tl.constexpr):
        """The per-row dequantisation scale, reference/fp8.py's rule: amax / max in fp32, at least 2^-126 (the
        smallest normal fp32), 1 for an all-zero row; a NaN amax gives a NaN scale."""
        scale = tl.maximum(amax / FMT_MAX, 1.1754943508222875e-38)
        scale = tl.where(amax == 0.0, 1.0, scale)
        return tl.where(amax != amax, amax, scale)

    @triton.jit
    def _round_fields(v, MAN: tl.constexpr, BIAS: tl.constexpr):
        """v (fp32, finite, within the format's range) rounded to the fp8 grid, nearest even: the grid step at
        |v| is 2^(max(e, 1-BIAS) - MAN), e = floor(log2|v|); adding and removing C = step * 2^23 makes fp32's own
        round-to-nearest-even drop exactly the bits below the step. Our own arithmetic rather than
        ``.to(tl.float8...)``: triton 3.9's interpreter loses the carry when the mantissa rounds up into the next
        binade (0.986 -> 0.5 in E4M3), and NVIDIA has no fp32 -> FNUZ conversion."""
        a = tl.abs(v)
        e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        step_exp = tl.maximum(e, 1 - BIAS) - MAN
        c = ((step_exp + 23 + 127) << 23).to(tl.float32, bitcast=True)
        r = (a + c) - c
        return tl.where((v.to(tl.int32, bitcast=True) >> 31) != 0, -r, r)  # the sign bit: -0 stays -0

    @triton.jit
    def _encode_fields(r, MAN: tl.constexpr, BIAS: tl.constexpr, FNUZ: tl.constexpr):
        """int32 code of r, a value on the format's grid (the output of _round_fields)."""
        bits = r.to(tl.int32, bitcast=True)
        a_bits = bits & 0x7FFFFFFF
        e32 = a_bits >> 23
        normal = ((e32 - 127 + BIAS) << MAN) | ((a_bits & 0x7FFFFF) >> (23 - MAN))
        step = tl.full(r.shape, (128 - BIAS - MAN) << 23, tl.int32).to(tl.float32, bitcast=True)  # 2^(1-BIAS-MAN)
        # subnormal codes are < 2^MAN; the clamp keeps normals and NaN out of the integer cast
        sub = tl.minimum(tl.where(r == r, tl.abs(r), 0.0) / step, 1 << MAN).to(tl.int32)
        code = tl.where(e32 - 127 >= 1 - BIAS, normal, sub)
        negative = (bits >> 31) & 1
        if FNUZ:
            negative = negative & (code != 0)  # no negative zero: 0x80 is NaN
        return code | (negative << 7)

    @triton.jit
    def saturate(v, FMT_MAX: tl.constexpr):
        """Clamp to the format's finite range (the saturating cast); NaN stays NaN."""
        return tl.clamp(v, -FMT_MAX, FMT_MAX, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def quantize_fp8(v, FMT: tl.constexpr, FMT_MAX: tl.constexpr):
        """(codes int32, their values fp32) of fp32 v, already divided by its scale: saturated to the format's
        range, rounded to nearest even; NaN becomes the format's NaN code (its value NaN)."""
        v = saturate(v, FMT_MAX)
        if FMT == 0:
            r = _round_fields(v, 3, 7)
            code = _encode_fields(r, 3, 7, False)
            nan_code = 0x7F
        elif FMT == 1:
            r = _round_fields(v, 3, 8)
            code = _encode_fields(r, 3, 8, True)
            nan_code = 0x80
        elif FMT == 2:
            r = _round_fields(v, 2, 15)
            code = _encode_fields(r, 2, 15, False)
            nan_code = 0x7F
        else:
            r = _round_fields(v, 2, 16)
            code = _encode_fields(r, 2, 16, True)
            nan_code = 0x80
        is_nan = v != v
        return tl.where(is_nan, nan_code, code), tl.where(is_nan, v, r)

    @triton.jit
    def fp8_rowwise_quant_gemm_kernel(x_ptr, w_ptr, sw_ptr, y_ptr, xq_ptr, sx_ptr, M, N, K, stride_xm, stride_wn,
                                      stride_ym, X_FMT: tl.constexpr, W_FMT: tl.constexpr, FMT_MAX: tl.constexpr,
                                      WRITE_Q: tl.constexpr, NATIVE: tl.constexpr, BM: tl.constexpr,
                                      BN: tl.constexpr, BK: tl.constexpr):
        """Per-row dynamic quantisation of float x fused into the GEMM's prologue: each program finds its rows'
        amax (one pass over x), then quantises every x tile in registers right before its fp8 ``tl.dot``
        (x is never written as fp8). y = (q(x) * sx) @ (decode(wq) * sw).T with per-row sx, sw; NATIVE as in
        fp8_gemm_kernel.
        WRITE_Q: programs of the first column also store the codes and scales (the tests' bit-exactness check)."""
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        amax = tl.zeros((BM,), dtype=tl.float32)
        nan_rows = tl.zeros((BM,), dtype=tl.int32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                        other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
            nan_rows = tl.maximum(nan_rows, tl.max((x != x).to(tl.int32), axis=1))
        # NaN propagates into amax explicitly (GPU max reductions may drop it), as in the reference
        amax = tl.where(nan_rows > 0, float("nan"), amax)
        sx = rowwise_scale(amax, FMT_MAX)
        q_rows = tl.where(tl.program_id(1) == 0, M, 0)  # WRITE_Q: the first column's programs store codes, scales
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            xmask = (rm[:, None] < M) & (rk[None, :] < K)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=xmask, other=0.0).to(tl.float32)
            code, value = quantize_fp8(x / sx[:, None], X_FMT, FMT_MAX)
            if WRITE_Q:
                tl.store(xq_ptr + rm[:, None] * K + rk[None, :], code.to(tl.uint8), mask=(rm[:, None] < q_rows) & (rk[None, :] < K))
            wc = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K),
                         other=0)
            if NATIVE:
                acc += fp8_tile_dot(code.to(tl.uint8), wc, X_FMT, W_FMT, True)
            else:  # the rounded values are the codes' exact values (fp16 holds every fp8 value)
                acc += tl.dot(value.to(tl.float16), tl.trans(decode_fp8(wc, W_FMT).to(tl.float16)),
                              out_dtype=tl.float32)
        if WRITE_Q:
            tl.store(sx_ptr + rm, sx, mask=rm < q_rows)
        sw = tl.load(sw_ptr + rn, mask=rn < N, other=0.0)
        acc = acc * sx[:, None] * sw[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def fp8_decode_kernel(code_ptr, out_ptr, n, FMT: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        """The decode path's values, written out: tests compare them bit for bit with the format tables."""
        offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        code = tl.load(code_ptr + offs, mask=offs < n, other=0)
        tl.store(out_ptr + offs, decode_fp8(code, FMT), mask=offs < n)

    @triton.jit
    def fp8_quantize_kernel(v_ptr, code_ptr, n, FMT: tl.constexpr, FMT_MAX: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        """The fused kernel's saturating cast alone (tests compare it bit for bit with the reference)."""
        offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        v = tl.load(v_ptr + offs, mask=offs < n, other=0.0)
        code, _ = quantize_fp8(v, FMT, FMT_MAX)
        tl.store(code_ptr + offs, code.to(tl.uint8), mask=offs < n)


SCALING_CODES = {Scaling.TENSOR: 0, Scaling.ROW: 1, Scaling.BLOCK: 2}


def expected_scale_shape(scaling: Scaling, rows: int, k: int, weight: bool) -> tuple[int, ...]:
    """The contract's scale shape for an operand of ``rows`` x ``k``."""
    kb = -(-k // BLOCK)
    if scaling is Scaling.TENSOR:
        return ()
    if scaling is Scaling.ROW:
        return (rows,)
    return (-(-rows // BLOCK), kb) if weight else (rows, kb)


def decode(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """The decode path's fp32 values of uint8 ``codes`` (any shape), through the kernel."""
    flat = codes.reshape(-1).contiguous()
    out = torch.empty(flat.shape, dtype=torch.float32, device=codes.device)
    block = 256
    fp8_decode_kernel[(triton.cdiv(flat.numel(), block),)](flat, out, flat.numel(), FMT=FP8_LAYOUTS[fmt].code,
                                                            BLOCK_SIZE=block)
    return out.reshape(codes.shape)


def quantize(values: torch.Tensor, fmt: str) -> torch.Tensor:
    """uint8 codes of fp32 ``values`` (already divided by their scale), saturating, nearest even: the fused
    kernel's cast, through a kernel."""
    flat = values.reshape(-1).to(torch.float32).contiguous()
    out = torch.empty(flat.shape, dtype=torch.uint8, device=values.device)
    block = 256
    layout = FP8_LAYOUTS[fmt]
    fp8_quantize_kernel[(triton.cdiv(flat.numel(), block),)](flat, out, flat.numel(), FMT=layout.code,
                                                             FMT_MAX=layout.max, BLOCK_SIZE=block)
    return out.reshape(values.shape)


def fp8_gemm(xq: torch.Tensor, x_fmt: str, sx: torch.Tensor, wq: torch.Tensor, w_fmt: str, sw: torch.Tensor,
             scaling: Scaling, path: Path, out_dtype: torch.dtype = torch.float32,
             tiles: tuple[int, int, int] | None = None) -> torch.Tensor:
    """y [M, N] = (decode(xq) * sx) @ (decode(wq) * sw).T in ``out_dtype`` (fp32 accumulation)."""
    if xq.dtype != torch.uint8 or wq.dtype != torch.uint8:
        raise ValueError(f"fp8 operands travel as uint8 bit patterns, got {xq.dtype} and {wq.dtype}")
    if xq.dim() != 2 or wq.dim() != 2 or xq.shape[1] != wq.shape[1]:
        raise ValueError(f"x {tuple(xq.shape)} must be M x K and w {tuple(wq.shape)} N x K")
    for name in (x_fmt, w_fmt):
        if name not in FP8_LAYOUTS:
            raise ValueError(f"unknown fp8 format {name!r} (known: {', '.join(FP8_LAYOUTS)})")
    m, k = xq.shape
    n = wq.shape[0]
    for what, s, rows, weight in (("sx", sx, m, False), ("sw", sw, n, True)):
        want = expected_scale_shape(scaling, rows, k, weight)
        if tuple(s.shape) != want:
            raise ValueError(f"{what} of {scaling.value} scaling must have shape {want}, got {tuple(s.shape)}")
    bm, bn, bk = tiles or (INTERPRETER_TILES if interpreting() else GPU_TILES)
    if BLOCK % bk:
        raise ValueError(f"BK {bk} must divide the scale block {BLOCK}")
    xq, wq = xq.contiguous(), wq.contiguous()
    sx = sx.to(torch.float32).contiguous()
    sw = sw.to(torch.float32).contiguous()
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    fp8_gemm_kernel[grid](xq, wq, sx, sw, y, m, n, k, xq.stride(0), wq.stride(0), y.stride(0), -(-k // BLOCK),
                          X_FMT=FP8_LAYOUTS[x_fmt].code, W_FMT=FP8_LAYOUTS[w_fmt].code,
                          SCALING=SCALING_CODES[scaling], NATIVE=path is Path.NATIVE, BM=bm, BN=bn, BK=bk,
                          **GPU_LAUNCH)
    return y


def fp8_rowwise_quant_gemm(x: torch.Tensor, x_fmt: str, wq: torch.Tensor, w_fmt: str, sw: torch.Tensor,
                           path: Path, out_dtype: torch.dtype | None = None, return_quantized: bool = False,
                           tiles: tuple[int, int, int] | None = None):
    """y = q(x) @ w.T with x quantised per row to ``x_fmt`` inside the kernel (saturating, nearest even); w: uint8
    codes (N, K) with per-row scales sw (N,). With ``return_quantized``: (y, xq codes, sx) as the kernel used them."""
    if x.dim() != 2 or wq.dim() != 2 or x.shape[1] != wq.shape[1] or wq.dtype != torch.uint8:
        raise ValueError(f"x {tuple(x.shape)} must be M x K floats and w {tuple(wq.shape)} N x K uint8 codes")
    if tuple(sw.shape) != (wq.shape[0],):
        raise ValueError(f"sw must be per-row ({wq.shape[0]},), got {tuple(sw.shape)}")
    m, k = x.shape
    n = wq.shape[0]
    bm, bn, bk = tiles or (INTERPRETER_TILES if interpreting() else GPU_TILES)
    x, wq, sw = x.contiguous(), wq.contiguous(), sw.to(torch.float32).contiguous()
    y = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    xq = torch.empty((m, k) if return_quantized else (1,), dtype=torch.uint8, device=x.device)
    sx = torch.empty((m,) if return_quantized else (1,), dtype=torch.float32, device=x.device)
    layout = FP8_LAYOUTS[x_fmt]
    fp8_rowwise_quant_gemm_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        x, wq, sw, y, xq, sx, m, n, k, x.stride(0), wq.stride(0), y.stride(0), X_FMT=layout.code,
        W_FMT=FP8_LAYOUTS[w_fmt].code, FMT_MAX=layout.max, WRITE_Q=return_quantized,
        NATIVE=path is Path.NATIVE, BM=bm, BN=bn, BK=bk, **GPU_LAUNCH)
    return (y, xq, sx) if return_quantized else y
