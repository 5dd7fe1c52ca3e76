"""NF4 matmul kernels shared by our quantized-linear impls: CPU (torch.compile / inductor C++) and Triton.

Layout: the packed weight is bnb's, uint8 ``[(N*K)/2, 1]``, row-major over the [N, K] weight, high nibble =
even column. We view it ``[N, K/2]`` and never repack it. The CPU kernels work in an *even/odd* column order
(``[W[:, 0::2] | W[:, 1::2]]``): the high and low nibbles of a byte row are then two contiguous vectors, so
the inductor C++ code vectorises without interleaved stores; inputs/outputs are permuted to match (cheap,
[M, K]). The lookup is the indexed gather ``code[nibble]``: inductor compiles a torch.where select tree for
the 16 values to far slower code (docs/quant_linear.md, "Measured").

Public entry points (all take ``packed2d`` uint8 [N, K/2] and ``scales`` fp32 [N, K/blocksize]):
``nf4_mm(x, ...)`` -> ``x @ W^T`` and ``nf4_mm_t(g, ...)`` -> ``g @ W`` for 2-D x/g in any float dtype.

Which kernels run: the native AVX-512 ones (nf4_native.py: in-register 16-entry lookup, built with
the system compiler) where :func:`nf4_native.status` allows and blocks are multiples of 32 columns; else
the torch.compile'd ones below (and bnb's dequantiser for the GEMM path). :func:`cpu_path` names the
choice. ``TWINBENCH_NF4_NATIVE=0`` forces the fallback.
"""

from __future__ import annotations

import functools
import os
import threading

import torch
from twinbench.impls.kernels import nf4_native
from twinbench.impls.kernels.availability import cpu_vendor
from twinbench.impls.kernels.nf4_code import nf4_table

# Rows of x up to which the fused dequantise-GEMV (weight never materialised) beats dequantise + GEMM.
GEMV_MAX_ROWS = 4
# The GEMM path's panel per compute dtype, in bytes of dequantised weight: W is dequantised one panel at a time
# (rows of W forward, a column range of every row backward) into a reused buffer and each panel runs its own
# GEMM, so the GEMM reads a panel the dequantisation has just left in cache instead of a whole W written out
# to memory. Larger panels mean fewer, more efficient GEMMs (each call re-packs x); the best sizes measured
# here outgrow the 2 MB L2 and live in the last-level cache. fp32 takes none: its whole W, written past the
# caches with non-temporal stores (nf4_native.STREAM_MIN_BYTES), measured faster than 1024- and 2048-row
# panels at one and two threads. docs/quant_linear.md, "Batch 512", has the tables.
GEMM_PANELS = {torch.bfloat16: 8 << 20}


def dequant_even_odd(packed2d: torch.Tensor, scales: torch.Tensor, code: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """W in even/odd column order, [N, K] = [W[:, 0::2] | W[:, 1::2]], as ``code * absmax`` (fp32) cast."""
    n, half = packed2d.shape
    nb = scales.shape[1]
    s = scales.reshape(n, nb, 1)
    even = (code[(packed2d >> 4).int()].reshape(n, nb, half // nb) * s).reshape(n, 1, half)
    odd = (code[(packed2d & 15).int()].reshape(n, nb, half // nb) * s).reshape(n, 1, half)
    return torch.cat([even, odd], 1).to(dtype).reshape(n, 2 * half)


def gemv_even_odd(xe: torch.Tensor, xo: torch.Tensor, packed2d: torch.Tensor, scales: torch.Tensor,
                  code: torch.Tensor) -> torch.Tensor:
    """``x @ W^T`` for a few rows without materialising W: xe/xo are x's even/odd columns (fp32, [M, K/2])."""
    n, half = packed2d.shape
    nb = scales.shape[1]
    m = xe.shape[0]
    we = code[(packed2d >> 4).int()].reshape(1, n, half)
    wo = code[(packed2d & 15).int()].reshape(1, n, half)
    part = (xe.reshape(m, 1, half) * we + xo.reshape(m, 1, half) * wo).reshape(m, n, nb, half // nb).sum(-1)
    return (part * scales.reshape(1, n, nb)).sum(-1)


def gemv_t_even_odd(g: torch.Tensor, packed2d: torch.Tensor, scales: torch.Tensor,
                    code: torch.Tensor) -> torch.Tensor:
    """``g @ W`` for a few rows of g (fp32, [M, N]) without materialising W; result in even/odd order."""
    n, half = packed2d.shape
    nb = scales.shape[1]
    m = g.shape[0]
    gs = (g.reshape(m, n, 1) * scales.reshape(1, n, nb)).reshape(m, n, nb, 1)
    even = (code[(packed2d >> 4).int()].reshape(1, n, nb, half // nb) * gs).sum(1).reshape(m, 1, half)
    odd = (code[(packed2d & 15).int()].reshape(1, n, nb, half // nb) * gs).sum(1).reshape(m, 1, half)
    return torch.cat([even, odd], 1).reshape(m, 2 * half)


_KERNELS = {"dequant": dequant_even_odd, "gemv": gemv_even_odd, "gemv_t": gemv_t_even_odd}
# Below this many weight elements a compile (seconds, per shape) costs more than it ever saves: run eagerly.
COMPILE_MIN_ELEMENTS = 1 << 20


def _kernel(name: str, packed2d: torch.Tensor):
    """The compiled kernel for weights worth compiling for, else the same function run eagerly."""
    if 2 * packed2d.numel() < COMPILE_MIN_ELEMENTS or os.environ.get("TWINBENCH_NF4_EAGER") == "1":
        return _KERNELS[name]
    return _compiled(name)


@functools.cache
def _compiled(name: str):
    """The inductor-compiled kernel (C++/OpenMP on CPU; one compile per weight shape, cached)."""
    fn = _KERNELS[name]
    import torch._inductor.config as inductor_config

    # Indices here are nibbles (always 0..15): the per-element bounds asserts only slow the loop down.
    inductor_config.assert_indirect_indexing = False
    return torch.compile(fn, dynamic=False)


def to_even_odd(t: torch.Tensor) -> torch.Tensor:
    """[M, K] -> [M, K] with columns reordered [0, 2, 4, ..., 1, 3, 5, ...]."""
    m, k = t.shape
    return t.reshape(m, k // 2, 2).transpose(1, 2).reshape(m, k)


def from_even_odd(t: torch.Tensor) -> torch.Tensor:
    m, k = t.shape
    return t.reshape(m, 2, k // 2).transpose(1, 2).reshape(m, k)


def cpu_path(packed2d: torch.Tensor, scales: torch.Tensor) -> str:
    """Which CPU kernels serve this weight: 'native-avx512' / 'native-avx2', or 'fallback (why not native)'
    (the inductor GEMV kernels; bnb's dequantiser on the GEMM path when bnb is installed)."""
    ok, why = nf4_native.status()
    if ok and nf4_native.fits(packed2d, scales):
        return f"native-{nf4_native.isa()}"
    return f"fallback ({why if not ok else 'not a contiguous CPU weight with blocks a multiple of 32 columns'})"


_scratch = threading.local()


def _workspace(n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """A reusable [N, K] buffer (per thread and dtype, grown to the largest weight seen) for the GEMM path's
    transient W. A fresh 32-64 MB tensor costs its page faults on first touch, more than the native
    dequantisation itself (docs/quant_linear.md has the times); the price is that one such buffer stays
    allocated between calls."""
    bufs = _scratch.__dict__.setdefault("bufs", {})
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < n * k:
        buf = bufs[dtype] = torch.empty(n * k, dtype=dtype)
    return buf[: n * k].view(n, k)


def panel_workspace(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A reusable [rows, cols] buffer (per thread and dtype, grown to the largest panel seen) for one
    dequantised panel of W (:data:`GEMM_PANELS`), which the panel's GEMM then reads from cache."""
    bufs = _scratch.__dict__.setdefault("panels", {})
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < rows * cols:
        buf = bufs[dtype] = torch.empty(rows * cols, dtype=dtype)
    return buf[: rows * cols].view(rows, cols)


def workspace_bytes() -> int:
    """Bytes this thread's GEMM-path workspaces hold (reported by the suite's impl, since a per-call peak
    memory measurement does not see a buffer allocated by an earlier call)."""
    bufs = [*getattr(_scratch, "bufs", {}).values(), *getattr(_scratch, "panels", {}).values()]
    return sum(b.numel() * b.element_size() for b in bufs)


def dequantize(packed2d: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
               transient: bool = False) -> torch.Tensor:
    """The [N, K] weight in natural column order and ``dtype``, for the GEMM path. ``transient``: the caller
    drops the result before the next call (it may then live in the reused workspace). Native kernel where it
    applies; else, on CPU with bitsandbytes present, bnb's native (OpenMP C) dequantiser (faster than our
    inductor gather loop); else the inductor kernel."""
    n, half = packed2d.shape
    if nf4_native.supports(packed2d, scales) and dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = _workspace(n, 2 * half, dtype) if transient else None
        if dtype == torch.bfloat16:  # the panel kernel narrows bf16 faster (AVX512-BF16), to the same bits
            out = torch.empty(n, 2 * half, dtype=dtype) if out is None else out
            return nf4_native.dequantize_panel(packed2d, scales, dtype, (0, n), (0, 2 * half), out)
        return nf4_native.dequantize(packed2d, scales, dtype, out=out)
    if packed2d.device.type == "cpu" and _bnb_dequant() is not None:
        blocksize = 2 * half // scales.shape[1]
        return _bnb_dequant()(packed2d, scales.reshape(-1), blocksize, "nf4", [n, 2 * half], dtype)
    return from_even_odd(_kernel("dequant", packed2d)(packed2d, scales, nf4_table(str(packed2d.device)), dtype))


@functools.cache
def _bnb_dequant():
    try:
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)

        return torch.ops.bitsandbytes.dequantize_4bit.default
    except Exception:
        return None


@functools.cache
def _onednn_linear(dtype: torch.dtype):
    """oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, the op inductor's CPU weight-freezing path
    calls) for the GEMM path, or None for torch's matmul. On AMD CPUs oneDNN's fp32 GEMM is faster than
    torch's (MKL sgemm) at the same fp32 accumulation (docs/quant_linear.md, "Measured": times and parity
    ratios). On Intel CPUs MKL is Intel's own tuned sgemm (not measured), so it is kept there; bf16 matmuls
    already go to oneDNN in torch. ``TWINBENCH_NF4_GEMM=aten`` turns this off."""
    if os.environ.get("TWINBENCH_NF4_GEMM") == "aten" or dtype != torch.float32 or cpu_vendor() == "GenuineIntel":
        return None
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        op = torch.ops.mkldnn._linear_pointwise
        a, w = torch.randn(8, 64, dtype=dtype), torch.randn(32, 64, dtype=dtype)
        if not torch.allclose(op(a, w, None, "none", [], ""), a @ w.t(), atol=1e-4):
            return None
    except Exception:  # a private op: absent or changed in this torch build -> torch's matmul
        return None
    return op


def gemm_nt(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a @ w.t()`` for the GEMM path (oneDNN where :func:`_onednn_linear` picks it)."""
    op = _onednn_linear(a.dtype) if a.device.type == "cpu" else None
    return op(a, w, None, "none", [], "") if op is not None else a @ w.t()


def gemm_nn(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a @ w`` for the GEMM path (the input gradient; oneDNN takes the transposed view without a copy)."""
    op = _onednn_linear(a.dtype) if a.device.type == "cpu" else None
    return op(a, w.t(), None, "none", [], "") if op is not None else a @ w


def nf4_mm(x: torch.Tensor, packed2d: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ W^T`` for x [M, K] (fp32/bf16/fp16), result in x's dtype. A few rows: the fused GEMV (fp32
    accumulation, W never materialised); more: W dequantised to x's dtype (as bnb does), then x's GEMM."""
    if x.shape[0] <= GEMV_MAX_ROWS:
        if nf4_native.supports(packed2d, scales):
            y = nf4_native.gemv(x, packed2d, scales)
            return y if x.dtype == torch.float32 else y.to(x.dtype)  # .to() parses its arguments: ~1 us
        xf = x.float()
        out = _kernel("gemv", packed2d)(xf[:, 0::2].contiguous(), xf[:, 1::2].contiguous(), packed2d, scales,
                                        nf4_table(str(x.device)))
        return out.to(x.dtype)
    panel = _gemm_panel(packed2d, scales, x.dtype, 2 * packed2d.shape[1])
    if panel:
        return mm_panels(x, packed2d, scales, panel)
    return gemm_nt(x, dequantize(packed2d, scales, x.dtype, transient=True))


def _gemm_panel(packed2d: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, span: int) -> int | None:
    """Rows (forward: ``span`` = K, the row length) or columns (backward: ``span`` = N, the column length) per
    panel for this weight (:data:`GEMM_PANELS`, a multiple of 32, at least 32), or None for the whole-weight
    path: dtypes not listed, weights the native kernels do not take or whose scales are not fp32,
    CPUs other than Intel's (the sizes were measured on one; on the AMD box tiling lost 1.5-2x, and there the
    fp32 GEMM is oneDNN's, which takes no ``out=``), and ``TWINBENCH_NF4_PANELS=0``."""
    panel_bytes = GEMM_PANELS.get(dtype)
    if panel_bytes is None or os.environ.get("TWINBENCH_NF4_PANELS") == "0" or not isinstance(scales, torch.Tensor) \
            or scales.dtype != torch.float32 or cpu_vendor() != "GenuineIntel" \
            or not nf4_native.supports(packed2d, scales):
        return None
    return max(32, panel_bytes // (span * dtype.itemsize) // 32 * 32)


def nf4_mm_t(g: torch.Tensor, packed2d: torch.Tensor, scales: torch.Tensor,
             weight: torch.Tensor | None = None) -> torch.Tensor:
    """``g @ W`` for g [M, N]: the input gradient of ``x @ W^T``, in g's dtype (``weight``: W already
    dequantised in g's dtype, when the caller kept it)."""
    if weight is not None:
        return gemm_nn(g, weight)
    if g.shape[0] <= GEMV_MAX_ROWS:
        if nf4_native.supports(packed2d, scales):
            dx = nf4_native.gemv_t(g, packed2d, scales)
            return dx if g.dtype == torch.float32 else dx.to(g.dtype)
        out = _kernel("gemv_t", packed2d)(g.float(), packed2d, scales, nf4_table(str(g.device)))
        return from_even_odd(out).to(g.dtype)
    panel = _gemm_panel(packed2d, scales, g.dtype, packed2d.shape[0])
    if panel:
        return mm_t_panels(g, packed2d, scales, panel)
    return gemm_nn(g, dequantize(packed2d, scales, g.dtype, transient=True))


def mm_panels(x: torch.Tensor, packed2d: torch.Tensor, scales: torch.Tensor, rows: int) -> torch.Tensor:
    """``x @ W^T`` by panels of ``rows`` rows of W: each panel dequantised (native, bit-identical to the whole
    dequantisation's rows) into a cache-sized buffer, then one GEMM writes its column slice of y in place
    (``mm(out=)`` on a strided view: BLAS takes the row stride, no copy, checked). Native weights with fp32
    scales only."""
    n, half = packed2d.shape
    rows = min(rows, n)  # a weight smaller than one panel takes a buffer of its own size
    y = torch.empty(x.shape[0], n, dtype=x.dtype)
    buf = panel_workspace(rows, 2 * half, x.dtype)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        w = nf4_native.dequantize_panel(packed2d, scales, x.dtype, (r0, r1), (0, 2 * half), buf[: r1 - r0])
        torch.mm(x, w.t(), out=y[:, r0:r1])
    return y


def mm_t_panels(g: torch.Tensor, packed2d: torch.Tensor, scales: torch.Tensor, cols: int) -> torch.Tensor:
    """``g @ W`` by panels of ``cols`` columns of W (a column range of every row, 32-aligned): each dequantised
    into a cache-sized buffer, then ``dx[:, c0:c1] = g @ panel`` in place."""
    n, half = packed2d.shape
    k = 2 * half
    cols = min(cols, k)
    dx = torch.empty(g.shape[0], k, dtype=g.dtype)
    buf = panel_workspace(n, cols, g.dtype)
    for c0 in range(0, k, cols):
        c1 = min(k, c0 + cols)
        w = nf4_native.dequantize_panel(packed2d, scales, g.dtype, (0, n), (c0, c1), buf[:, : c1 - c0])
        torch.mm(g, w, out=dx[:, c0:c1])
    return dx
