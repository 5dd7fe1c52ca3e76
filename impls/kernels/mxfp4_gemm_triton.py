"""Our Triton MXFP4 GEMM: y = x @ dequant(w).T, w an MXFP4 weight (OCP MX v1.0), x bf16/fp16/fp32, MXFP8 or MXFP4.

Layout (the low-precision data contract, docs/low_precision.md): w is N x K of E2M1 codes packed two per byte,
element 2i in the low nibble and 2i+1 in the high nibble (torch.float4_e2m1fn_x2 / torchao / cuBLAS order),
shape (N, ceil(K/2)), a padding nibble 0; its E8M0 scales (uint8, value 2^(e-127), 0xFF NaN) per 32 consecutive
elements along K, shape (N, ceil(K/32)). MX activations: MXFP8 e4m3/e5m2 codes (uint8, M x K) or MXFP4 (packed
like w), with E8M0 scales (M, ceil(K/32)).

Two code paths, one kernel:

- **decode** (``MxPath.DECODE``): nibbles and E8M0 scales decoded by bit arithmetic in registers, the weight tile
  dequantised to fp32 and multiplied with ``tl.dot``: in bf16 for bf16 or MX activations (E2M1 x 2^k and
  E4M3/E5M2 x 2^k are exact in bf16, which has fp32's exponent range), otherwise in fp32 with IEEE precision
  (fp16 cannot hold 2^k for large k). Any GPU and the CPU interpreter.
- **dot_scaled** (``MxPath.DOT_SCALED``): ``tl.dot_scaled`` with the packed weight and its E8M0 scales as they are
  (rhs ``e2m1``, packed along K): the tensor-core MX instructions on sm100 and gfx950; Triton emulates it
  elsewhere (bf16 upcast, and fp16 on CDNA3 when an operand is fp16), and so does the interpreter.
  Activations must be bf16/fp16 or MX (``dot_scaled`` takes no fp32).

Each K step (BK a multiple of 32) covers whole scale blocks; the K tail is masked (a partial last block's
padding elements are 0, so they add nothing whatever their scale).
"""

from __future__ import annotations

import enum

import torch
from twinbench.impls.kernels.availability import interpreting

try:
    import triton
    import triton.language as tl
    from twinbench.impls.kernels.fp8_gemm_triton import decode_fp8  # noqa: F401  (jit helper, resolved by name)
except ImportError:  # the impls' availability checks report it
    triton = None

MX_BLOCK = 32  # elements per E8M0 scale (OCP MX v1.0)
# GPU tiles (BM, BN, BK) and launch options per build, as the AOT compile checks measured them
# (tests/aot_variants.py, docs/low_precision.md): the decode path's bf16 dot at BK 64 (BK 128 spilled 0.7-0.9 KB
# of stack on sm90/sm100 with MXFP4 activations); dot_scaled at BK 128; the fp32 FMA dot keeps 8 products per
# thread (32x32 over 4 warps, as triton_fa's fp32 tiles: 64x64x128 in fp32 needed 96 KiB of shared memory,
# above a 64 KiB LDS, and spilled 5-7 KB on NVIDIA).
GPU_CONFIGS = {
    "decode-bf16": ((64, 64, 64), {"num_warps": 8, "num_stages": 3}),
    "decode-fp32": ((32, 32, 32), {"num_warps": 4, "num_stages": 2}),
    "dot_scaled": ((64, 64, 128), {"num_warps": 8, "num_stages": 3}),
}


def gpu_config(path: MxPath, dot_bf16: bool) -> tuple[tuple[int, int, int], dict[str, int]]:
    """(tiles, launch options) of a GPU build."""
    if path is MxPath.DOT_SCALED:
        return GPU_CONFIGS["dot_scaled"]
    return GPU_CONFIGS["decode-bf16" if dot_bf16 else "decode-fp32"]


INTERPRETER_TILES = (32, 32, 128)
# Activation kinds (the kernel's X_KIND constexpr): floats, or MXFP8 codes with E8M0 scales.
FLOAT_KINDS = {torch.float32: 0, torch.float16: 3, torch.bfloat16: 4}
MX_X_KINDS = {"e4m3": 1, "e5m2": 2, "e2m1": 5}  # MXFP8 or MXFP4 activations


class MxPath(enum.Enum):
    DECODE = "decode"
    DOT_SCALED = "dot_scaled"


if triton is not None:  # absent: no kernels (the impl reports triton missing)

    @triton.jit
    def decode_e8m0(code):
        """fp32 value of uint8 E8M0 codes: 2^(c-127); code 0 is 2^-127 (an fp32 subnormal), 0xFF NaN."""
        c = code.to(tl.int32)
        bits = tl.where(c == 0, 0x00400000, c << 23)
        bits = tl.where(c == 255, 0x7FC00000, bits)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def decode_e2m1(nibble):
        """fp32 value of int32 E2M1 codes 0..15: S.EE.M, bias 1 (0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives)."""
        sign = (nibble >> 3) & 1
        e = (nibble >> 1) & 3
        m = nibble & 1
        normal = (((e + 126) << 23) | (m << 22)).to(tl.float32, bitcast=True)
        mag = tl.where(e == 0, m.to(tl.float32) * 0.5, normal)
        return tl.where(sign == 1, -mag, mag)

    @triton.jit
    def mxfp4_tile(w_ptr, ws_ptr, rn, rk, N, K, stride_wn, stride_wsn):
        """Dequantised MXFP4 rows rn, columns rk in fp32 ([BN, BK]); zero outside the matrix."""
        mask = (rn[:, None] < N) & (rk[None, :] < K)
        byte = tl.load(w_ptr + rn[:, None] * stride_wn + (rk // 2)[None, :], mask=mask, other=0).to(tl.int32)
        nibble = (byte >> ((rk % 2) * 4)[None, :]) & 15  # element 2i: low nibble
        scale = tl.load(ws_ptr + rn[:, None] * stride_wsn + (rk // 32)[None, :], mask=mask, other=0)
        return decode_e2m1(nibble) * decode_e8m0(scale)

    @triton.jit
    def mxfp4_gemm_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, M, N, K, stride_xm, stride_xsm, stride_wn,
                          stride_wsn, stride_ym, X_KIND: tl.constexpr, DOT_SCALED: tl.constexpr,
                          DOT_BF16: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """X_KIND: 0 fp32, 3 fp16, 4 bf16 activations; 1 MXFP8 e4m3, 2 MXFP8 e5m2, 5 MXFP4 (packed like w) with
        E8M0 scales at xs_ptr."""
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            xmask = (rm[:, None] < M) & (rk[None, :] < K)
            if DOT_SCALED:
                rb = k0 // 2 + tl.arange(0, BK // 2)  # packed bytes along K
                rs = k0 // 32 + tl.arange(0, BK // 32)
                smask = rs[None, :] < (K + 31) // 32
                wp = tl.load(w_ptr + rn[None, :] * stride_wn + rb[:, None],  # the rhs as [K/2, N]
                             mask=(rn[None, :] < N) & (rb[:, None] < (K + 1) // 2), other=0)
                ws = tl.load(ws_ptr + rn[:, None] * stride_wsn + rs[None, :], mask=(rn[:, None] < N) & smask,
                             other=0)
                if X_KIND == 5:
                    xp = tl.load(x_ptr + rm[:, None] * stride_xm + rb[None, :],
                                 mask=(rm[:, None] < M) & (rb[None, :] < (K + 1) // 2), other=0)
                    xs = tl.load(xs_ptr + rm[:, None] * stride_xsm + rs[None, :], mask=(rm[:, None] < M) & smask,
                                 other=0)
                    acc = tl.dot_scaled(xp, xs, "e2m1", wp, ws, "e2m1", acc=acc)
                else:
                    x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=xmask, other=0)
                    if X_KIND == 4:
                        acc = tl.dot_scaled(x, None, "bf16", wp, ws, "e2m1", acc=acc)
                    elif X_KIND == 3:
                        acc = tl.dot_scaled(x, None, "fp16", wp, ws, "e2m1", acc=acc)
                    else:
                        xs = tl.load(xs_ptr + rm[:, None] * stride_xsm + rs[None, :],
                                     mask=(rm[:, None] < M) & smask, other=0)
                        if X_KIND == 1:
                            acc = tl.dot_scaled(x, xs, "e4m3", wp, ws, "e2m1", acc=acc)
                        else:
                            acc = tl.dot_scaled(x, xs, "e5m2", wp, ws, "e2m1", acc=acc)
            else:
                w = mxfp4_tile(w_ptr, ws_ptr, rn, rk, N, K, stride_wn, stride_wsn)
                if X_KIND == 5:
                    a = mxfp4_tile(x_ptr, xs_ptr, rm, rk, M, K, stride_xm, stride_xsm)
                elif X_KIND == 1 or X_KIND == 2:
                    x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=xmask, other=0)
                    xs = tl.load(xs_ptr + rm[:, None] * stride_xsm + (rk // 32)[None, :], mask=xmask, other=0)
                    if X_KIND == 1:
                        a = decode_fp8(x, 0) * decode_e8m0(xs)
                    else:
                        a = decode_fp8(x, 2) * decode_e8m0(xs)
                else:
                    a = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=xmask, other=0).to(tl.float32)
                if DOT_BF16:
                    acc += tl.dot(a.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)), out_dtype=tl.float32)
                else:
                    acc += tl.dot(a, tl.trans(w), input_precision="ieee", out_dtype=tl.float32)
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


def mxfp4_gemm(x: torch.Tensor, w_packed: torch.Tensor, w_scales: torch.Tensor, path: MxPath,
               x_scales: torch.Tensor | None = None, x_fmt: str | None = None, k: int | None = None,
               out_dtype: torch.dtype | None = None, tiles: tuple[int, int, int] | None = None) -> torch.Tensor:
    """y [M, N] = deq(x) @ deq(w).T. x: M x K floats; or MX codes with ``x_scales`` (M, ceil(K/32)) and ``x_fmt``
    'e4m3' | 'e5m2' (MXFP8, M x K) or 'e2m1' (MXFP4 packed like w, M x ceil(K/2): ``k`` required).
    ``out_dtype``: x's dtype for float x, fp32 for MX x, unless given."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D, got {tuple(x.shape)}")
    m = x.shape[0]
    if x_fmt == "e2m1":
        if k is None or x.shape[1] != (k + 1) // 2:
            raise ValueError(f"MXFP4 activations: give k, with x packed (M, ceil(k/2)); got {tuple(x.shape)}, k={k}")
    else:
        k = x.shape[1]
    n = w_packed.shape[0]
    kb = -(-k // MX_BLOCK)
    if w_packed.dtype != torch.uint8 or tuple(w_packed.shape) != (n, (k + 1) // 2):
        raise ValueError(f"packed weight must be uint8 (N, ceil(K/2)) = ({n}, {(k + 1) // 2}), got "
                         f"{w_packed.dtype} {tuple(w_packed.shape)}")
    if w_scales.dtype != torch.uint8 or tuple(w_scales.shape) != (n, kb):
        raise ValueError(f"weight scales must be uint8 E8M0 (N, ceil(K/32)) = ({n}, {kb}), got "
                         f"{w_scales.dtype} {tuple(w_scales.shape)}")
    if x_fmt is None:
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"float activations must be fp32/fp16/bf16, got {x.dtype}")
        if path is MxPath.DOT_SCALED and x.dtype == torch.float32:
            raise ValueError("tl.dot_scaled takes bf16/fp16 or MXFP8 activations, not fp32")
        x_kind, xs = FLOAT_KINDS[x.dtype], x  # xs: an unused pointer
        out_dtype = out_dtype or x.dtype
        dot_bf16 = x.dtype == torch.bfloat16
    else:
        if x_fmt not in MX_X_KINDS or x.dtype != torch.uint8:
            raise ValueError(f"MX activations are uint8 e4m3/e5m2/e2m1 codes, got {x.dtype} {x_fmt!r}")
        if x_scales is None or x_scales.dtype != torch.uint8 or tuple(x_scales.shape) != (m, kb):
            raise ValueError(f"MX activations need uint8 E8M0 scales ({m}, {kb})")
        x_kind, xs = MX_X_KINDS[x_fmt], x_scales.contiguous()
        out_dtype = out_dtype or torch.float32
        dot_bf16 = True
    # The interpreter has no bf16 tl.dot (docs/method.md §2): fp32 there, the same exact products.
    dot_bf16 = dot_bf16 and not interpreting()
    gpu_tiles, launch = gpu_config(path, dot_bf16)
    bm, bn, bk = tiles or (INTERPRETER_TILES if interpreting() else gpu_tiles)
    if bk % MX_BLOCK:
        raise ValueError(f"BK {bk} must be a multiple of the MX block {MX_BLOCK}")
    x, w_packed, w_scales = x.contiguous(), w_packed.contiguous(), w_scales.contiguous()
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    mxfp4_gemm_kernel[grid](x, xs, w_packed, w_scales, y, m, n, k, x.stride(0), xs.stride(0), w_packed.stride(0),
                            w_scales.stride(0), y.stride(0), X_KIND=x_kind, DOT_SCALED=path is MxPath.DOT_SCALED,
                            DOT_BF16=dot_bf16, BM=bm, BN=bn, BK=bk, **launch)
    return y

