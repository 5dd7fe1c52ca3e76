"""The native bf16 elementwise kernels of the SparseMoE FFN (impls/kernels/moe_native.c): SwiGLU forward and
backward, the weighted combine of the k expert rows of each token, and the routed output gradient with the
router weight's gradient, each one pass with fp32 math and one rounding per output.

Built with the system C compiler at first use (plain auto-vectorised C, about a second) and cached, like the
NF4 kernels (impls/kernels/nf4_native.py: same cache folder, same build-then-rename). The widest vector layer
the CPU's flags allow is compiled in; any x86-64 or aarch64 compiler builds the generic one.
``TWINBENCH_MOE_NATIVE=0`` turns them off (the torch ops in impls/moe_ffn/sorted_experts.py run instead).

The wrappers take bf16 CPU tensors whose last dimension is contiguous; they check dtypes and shapes, not values.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

import torch
from twinbench.impls.kernels.availability import c_compiler, cpu_flags
from twinbench.impls.kernels.native_build import build_shared_library

SOURCE = Path(__file__).with_name("moe_native.c")
FLAGS = ["-O3", "-shared", "-fPIC", "-std=c11"]
# Vector layer -> (compiler flags, CPU flags it needs), widest first; "generic" needs nothing.
ISA_FLAGS = {
    "avx512": (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma"], ("avx512f", "avx512bw", "avx512vl", "fma")),
    "avx2": (["-mavx2", "-mfma"], ("avx2", "fma")),
    "generic": ([], ()),
}
ABI = 1


def _build(cc: str, isa: str) -> Path:
    """The cached shared object for this source, vector layer and compiler (built now if absent)."""
    return build_shared_library(cc, SOURCE, FLAGS + ISA_FLAGS[isa][0], "moe_native")


def _load() -> tuple[ctypes.CDLL | None, str]:
    return _load_for(os.environ.get("TWINBENCH_MOE_NATIVE", ""))


@functools.cache
def _load_for(setting: str) -> tuple[ctypes.CDLL | None, str]:
    if setting == "0":
        return None, "turned off by TWINBENCH_MOE_NATIVE=0"
    if not sys.platform.startswith("linux"):
        return None, f"the native MoE kernels are built for Linux only (this is {sys.platform})"
    cc = c_compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install gcc)"
    have = cpu_flags()
    isa = next(name for name, (_, needs) in ISA_FLAGS.items() if all(f in have for f in needs))
    try:
        lib = ctypes.CDLL(str(_build(cc, isa)))
    except Exception as exc:  # a failed build or load is a reason, not a crash
        return None, f"native MoE build failed: {type(exc).__name__}: {exc}"
    if lib.moe_native_abi() != ABI:
        return None, "stale native MoE build (ABI mismatch)"
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.moe_swiglu_forward.argtypes = [ptr, i64, ptr, i64, i64, i64]
    lib.moe_swiglu_backward.argtypes = [ptr, i64, ptr, i64, ptr, i64, i64, i64]
    lib.moe_combine.argtypes = [ptr, i64, ptr, ptr, i64, ptr, i64, i64, i64, i64, ptr]
    lib.moe_route_gradient.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, i64, ptr, i64, ptr, i64, i64, i64]
    for fn in (lib.moe_swiglu_forward, lib.moe_swiglu_backward, lib.moe_combine, lib.moe_route_gradient):
        fn.restype = None
    return lib, ""


def status() -> tuple[bool, str]:
    """(usable, why not): a working compiler and a successful build (built once, then cached)."""
    lib, why = _load()
    return lib is not None, why


def usable(*tensors: torch.Tensor) -> bool:
    """The kernels take these tensors: bf16 on the CPU, and the build is loaded."""
    return all(t.dtype == torch.bfloat16 and t.is_cpu for t in tensors) and _load()[0] is not None


def _lib() -> ctypes.CDLL:
    lib, why = _load()
    if lib is None:
        raise RuntimeError(why)
    return lib


def _rows(t: torch.Tensor, name: str, cols: int | None = None) -> torch.Tensor:
    """A 2-D bf16 CPU matrix with unit column stride (rows may be strided: slices of a wider buffer)."""
    if t.dtype != torch.bfloat16 or not t.is_cpu or t.dim() != 2 or (t.stride(1) != 1 and t.shape[1] > 1):
        raise ValueError(f"{name}: need a 2-D bf16 CPU matrix with contiguous rows, got {t.dtype} {tuple(t.shape)}")
    if cols is not None and t.shape[1] != cols:
        raise ValueError(f"{name}: {t.shape[1]} columns, expected {cols}")
    return t


def swiglu_forward(h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = silu(gate) * up for h = [gate | up] ([rows, 2I] -> [rows, I])."""
    inter = _rows(out, "out").shape[1]
    _rows(h, "h", 2 * inter)
    if h.shape[0] != out.shape[0]:
        raise ValueError("h and out must have the same rows")
    _lib().moe_swiglu_forward(h.data_ptr(), h.stride(0), out.data_ptr(), out.stride(0), h.shape[0], inter)
    return out


def swiglu_backward(h: torch.Tensor, grad_a: torch.Tensor, grad_h: torch.Tensor) -> torch.Tensor:
    """grad_h = [d gate | d up] of a = silu(gate) * up, from grad_a = d a."""
    inter = _rows(grad_a, "grad_a").shape[1]
    _rows(h, "h", 2 * inter), _rows(grad_h, "grad_h", 2 * inter)
    if not h.shape[0] == grad_a.shape[0] == grad_h.shape[0]:
        raise ValueError("h, grad_a and grad_h must have the same rows")
    _lib().moe_swiglu_backward(h.data_ptr(), h.stride(0), grad_a.data_ptr(), grad_a.stride(0), grad_h.data_ptr(),
                               grad_h.stride(0), h.shape[0], inter)
    return grad_h


def _index(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dtype != torch.int64 or not t.is_cpu or not t.is_contiguous():
        raise ValueError(f"{name}: need a contiguous CPU int64 tensor")
    return t


def _weights(w: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    if w is not None and (w.dtype != torch.float32 or not w.is_contiguous() or w.numel() != rows):
        raise ValueError(f"weights: need {rows} contiguous fp32 values")
    return w


def combine(y: torch.Tensor, w: torch.Tensor | None, slot_row: torch.Tensor, out: torch.Tensor, t0: int,
            t1: int) -> None:
    """out[t] = sum_j w[r] y[r] over r = slot_row[t, j] (w None: 1), fp32 sum in slot order, tokens t0..t1-1."""
    cols = _rows(y, "y").shape[1]
    _rows(out, "out", cols)
    _index(slot_row, "slot_row")
    _weights(w, y.shape[0])
    k = slot_row.shape[-1]
    if slot_row.numel() != out.shape[0] * k or not 0 <= t0 <= t1 <= out.shape[0]:
        raise ValueError("slot_row must be [tokens, k] and t0..t1 a range of tokens")
    acc = torch.empty(cols, dtype=torch.float32)
    _lib().moe_combine(y.data_ptr(), y.stride(0), None if w is None else w.data_ptr(), slot_row.data_ptr(), k,
                       out.data_ptr(), out.stride(0), t0, t1, cols, acc.data_ptr())


def route_gradient(g: torch.Tensor, token: torch.Tensor, order: torch.Tensor, w: torch.Tensor, y: torch.Tensor,
                   g_y: torch.Tensor, grad_w: torch.Tensor, r0: int, r1: int) -> None:
    """Rows r0..r1-1: g_y[r] = g[token[r]] * w[r]; grad_w[order[r]] = <g[token[r]], y[r]> in fp32."""
    cols = _rows(g, "g").shape[1]
    _rows(y, "y", cols), _rows(g_y, "g_y", cols)
    _index(token, "token"), _index(order, "order"), _weights(w, y.shape[0])
    if not (token.numel() == order.numel() == y.shape[0] == g_y.shape[0] == grad_w.numel()) \
            or grad_w.dtype != torch.float32 or not grad_w.is_contiguous() or not 0 <= r0 <= r1 <= y.shape[0]:
        raise ValueError("route_gradient: token, order, y, g_y and grad_w must cover the same rows")
    _lib().moe_route_gradient(g.data_ptr(), g.stride(0), token.data_ptr(), order.data_ptr(), w.data_ptr(),
                              y.data_ptr(), y.stride(0), g_y.data_ptr(), g_y.stride(0), grad_w.data_ptr(), r0, r1,
                              cols)
