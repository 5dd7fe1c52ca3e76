"""Triton NF4 kernel source for impls/quant_linear/triton_nf4.py (module level: the interpreter resolves jit
helpers by global name). Plugin discovery imports this module: it defines nothing when triton is absent, so
that import never fails, and ``@triton.jit`` only wraps the functions (compilation waits for the first
launch)."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # the impl's availability check reports it
    triton = None

if triton is not None:

    @triton.jit
    def nf4_value(idx):
        b0 = (idx & 1) != 0
        b1 = (idx & 2) != 0
        b2 = (idx & 4) != 0
        b3 = (idx & 8) != 0
        v01 = tl.where(b0, -0.6961928009986877, -1.0)
        v23 = tl.where(b0, -0.39491748809814453, -0.5250730514526367)
        v45 = tl.where(b0, -0.18477343022823334, -0.28444138169288635)
        v67 = tl.where(b0, 0.0, -0.09105003625154495)
        v89 = tl.where(b0, 0.16093020141124725, 0.07958029955625534)
        vab = tl.where(b0, 0.33791524171829224, 0.24611230194568634)
        vcd = tl.where(b0, 0.5626170039176941, 0.44070982933044434)
        vef = tl.where(b0, 1.0, 0.7229568362236023)
        v03 = tl.where(b1, v23, v01)
        v47 = tl.where(b1, v67, v45)
        v8b = tl.where(b1, vab, v89)
        vcf = tl.where(b1, vef, vcd)
        return tl.where(b3, tl.where(b2, vcf, v8b), tl.where(b2, v47, v03))

    @triton.jit
    def w_tile(packed_ptr, scales_ptr, rn, rk, N, K, NB, BS: tl.constexpr):
        """Dequantised W[rn, rk] in fp32 ([BN, BK]); zero outside the matrix."""
        mask = (rn[:, None] < N) & (rk[None, :] < K)
        byte = tl.load(packed_ptr + rn[:, None] * (K // 2) + (rk // 2)[None, :], mask=mask, other=0).to(tl.int32)
        shift = ((rk + 1) % 2) * 4  # even column: high nibble
        idx = (byte >> shift[None, :]) & 15
        scale = tl.load(scales_ptr + rn[:, None] * NB + (rk // BS)[None, :], mask=mask, other=0.0)
        return nf4_value(idx) * scale

    @triton.jit
    def gemm_fwd(x_ptr, packed_ptr, scales_ptr, xa_ptr, b_ptr, out_ptr, M, N, K, NB, R, scaling,
                 BS: tl.constexpr, HAS_LORA: tl.constexpr, RP: tl.constexpr, PRECISION: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            a = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                        other=0.0)
            w = w_tile(packed_ptr, scales_ptr, rn, rk, N, K, NB, BS).to(a.dtype)
            acc += tl.dot(a, tl.trans(w), input_precision=PRECISION)
        if HAS_LORA:
            rr = tl.arange(0, RP)
            xa = tl.load(xa_ptr + rm[:, None] * R + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R),
                         other=0.0)
            bt = tl.load(b_ptr + rn[None, :] * R + rr[:, None], mask=(rn[None, :] < N) & (rr[:, None] < R),
                         other=0.0)
            acc += scaling * tl.dot(xa, bt, input_precision=PRECISION)
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def gemm_bwd(g_ptr, packed_ptr, scales_ptr, gb_ptr, a_ptr, dx_ptr, M, N, K, NB, R, scaling,
                 BS: tl.constexpr, HAS_LORA: tl.constexpr, RP: tl.constexpr, PRECISION: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rk = tl.program_id(1) * BK + tl.arange(0, BK)
        acc = tl.zeros((BM, BK), dtype=tl.float32)
        for n0 in range(0, N, BN):
            rn = n0 + tl.arange(0, BN)
            g = tl.load(g_ptr + rm[:, None] * N + rn[None, :], mask=(rm[:, None] < M) & (rn[None, :] < N),
                        other=0.0)
            w = w_tile(packed_ptr, scales_ptr, rn, rk, N, K, NB, BS).to(g.dtype)
            acc += tl.dot(g, w, input_precision=PRECISION)
        if HAS_LORA:
            rr = tl.arange(0, RP)
            gb = tl.load(gb_ptr + rm[:, None] * R + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R),
                         other=0.0)
            a = tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=(rr[:, None] < R) & (rk[None, :] < K),
                        other=0.0)
            acc += scaling * tl.dot(gb, a, input_precision=PRECISION)
        tl.store(dx_ptr + rm[:, None] * K + rk[None, :], acc.to(dx_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rk[None, :] < K))

    @triton.jit
    def gemv_fwd(x_ptr, packed_ptr, scales_ptr, xa_ptr, b_ptr, out_ptr, N, K, NB, R, scaling,
                 BS: tl.constexpr, HAS_LORA: tl.constexpr, RP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        m = tl.program_id(1)
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        acc = tl.zeros((BN,), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + m * K + rk, mask=rk < K, other=0.0).to(tl.float32)
            acc += tl.sum(w_tile(packed_ptr, scales_ptr, rn, rk, N, K, NB, BS) * x[None, :], axis=1)
        if HAS_LORA:
            rr = tl.arange(0, RP)
            xa = tl.load(xa_ptr + m * R + rr, mask=rr < R, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + rn[:, None] * R + rr[None, :], mask=(rn[:, None] < N) & (rr[None, :] < R),
                        other=0.0).to(tl.float32)
            acc += scaling * tl.sum(b * xa[None, :], axis=1)
        tl.store(out_ptr + m * N + rn, acc.to(out_ptr.dtype.element_ty), mask=rn < N)

    @triton.jit
    def gemv_bwd(g_ptr, packed_ptr, scales_ptr, gb_ptr, a_ptr, dx_ptr, N, K, NB, R, scaling,
                 BS: tl.constexpr, HAS_LORA: tl.constexpr, RP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        m = tl.program_id(1)
        rk = tl.program_id(0) * BK + tl.arange(0, BK)
        acc = tl.zeros((BK,), dtype=tl.float32)
        for n0 in range(0, N, BN):
            rn = n0 + tl.arange(0, BN)
            g = tl.load(g_ptr + m * N + rn, mask=rn < N, other=0.0).to(tl.float32)
            acc += tl.sum(w_tile(packed_ptr, scales_ptr, rn, rk, N, K, NB, BS) * g[:, None], axis=0)
        if HAS_LORA:
            rr = tl.arange(0, RP)
            gb = tl.load(gb_ptr + m * R + rr, mask=rr < R, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=(rr[:, None] < R) & (rk[None, :] < K),
                        other=0.0).to(tl.float32)
            acc += scaling * tl.sum(a * gb[:, None], axis=0)
        tl.store(dx_ptr + m * K + rk, acc.to(dx_ptr.dtype.element_ty), mask=rk < K)
