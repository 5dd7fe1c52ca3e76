"""The native NF4 CPU kernels (impls/kernels/nf4_native.c): built with the system C compiler at first use, cached.

Plain C with AVX-512, AVX2 or NEON intrinsics and OpenMP, no torch headers, so a build takes a few seconds. One
source, one build per vector layer (:data:`ISA_FLAGS`); the widest one the CPU's flags allow is loaded, or the
one ``TWINBENCH_NF4_ISA`` (``avx512``/``avx2``/``neon``) names (tests run the AVX2 build on an AVX-512 machine that
way). The NEON layer (aarch64 Linux, chosen by the ``asimd`` feature) has been verified under emulation only
(tests/test_nf4_neon.py runs it in qemu-aarch64); no aarch64 host has loaded it through this module. The build is
cached by
impls/kernels/native_build.py (``nf4_native/<hash>.so`` under the twinbench cache folder, safe under concurrent
first uses). ``TWINBENCH_NF4_NATIVE=0`` turns it off (the inductor kernels in impls/kernels/nf4.py are then used).

:func:`status` says whether the kernels can run here and why not; the wrappers below check dtypes, shapes
and contiguity, then call the C functions on the tensors' data pointers.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from twinbench.impls.kernels.availability import c_compiler, cpu_flags
from twinbench.impls.kernels.native_build import build_shared_library
from twinbench.impls.kernels.nf4_code import nf4_table

SOURCE = Path(__file__).with_name("nf4_native.c")
FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
# Vector layer -> (compiler flags, CPU flags it needs), widest first. NEON: aarch64's baseline (Advanced SIMD is
# part of armv8-a; /proc/cpuinfo lists it as ``asimd``), so the build runs on any aarch64 CPU.
ISA_FLAGS = {
    "avx512": (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma"], ("avx512f", "avx512bw", "avx512vl", "fma")),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], ("avx2", "fma", "f16c")),
    "neon": (["-march=armv8-a"], ("asimd",)),
}
_ISA_ID = {"avx512": 512, "avx2": 2, "neon": 128}  # what the build's nf4_native_isa() returns
_ISA_NAME = {v: k for k, v in _ISA_ID.items()}
MAX_ROWS = 4  # rows of x one GEMV call takes (nf4_native.c: MAX_ROWS)
MAX_RANK = 256  # LoRA rank the whole-call kernels take (nf4_native.c: MAX_RANK)
_OUT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _build(cc: str, isa: str = "avx512") -> Path:
    """The cached shared object for this source, vector layer and compiler (built now if absent)."""
    return build_shared_library(cc, SOURCE, FLAGS + ISA_FLAGS[isa][0], "nf4_native")


def chosen_isa() -> tuple[str | None, str]:
    """(vector layer to load, why none): ``TWINBENCH_NF4_ISA`` if set, else the widest the CPU's flags allow."""
    return _choose_isa(os.environ.get("TWINBENCH_NF4_ISA", ""))


@functools.cache
def _choose_isa(wanted: str) -> tuple[str | None, str]:
    have = cpu_flags()
    if wanted:
        if wanted not in ISA_FLAGS:
            return None, f"TWINBENCH_NF4_ISA={wanted!r} is not one of {sorted(ISA_FLAGS)}"
        missing = [f for f in ISA_FLAGS[wanted][1] if f not in have]
        return (None, f"TWINBENCH_NF4_ISA={wanted} but this CPU lacks {', '.join(missing)}") if missing \
            else (wanted, "")
    for isa, (_, needs) in ISA_FLAGS.items():
        if all(f in have for f in needs):
            return isa, ""
    return None, "this CPU has neither AVX-512, AVX2+FMA+F16C nor NEON (the native NF4 kernels need one)"


# os.environ's own bytes mapping on POSIX, which every write to os.environ (monkeypatch.setenv included) goes
# through: reading it is a dict lookup, where os.environ.get costs ~1.5 us per unset variable cache-hot (a KeyError
# raised and caught inside) and ~6 us right after a streamed weight evicted the interpreter (docs/quant_linear.md,
# "The compiled few-rows op").
_ENVIRON: dict[bytes, bytes] | None = getattr(os.environ, "_data", None) if os.name == "posix" else None


def _load() -> tuple[ctypes.CDLL | None, str]:
    """The build the environment asks for. Two environment reads per call: the few-rows path makes one such call
    per kernel call, and the variables stay live (tests switch them with monkeypatch)."""
    if _ENVIRON is None:
        get = os.environ.get
        return _load_for(get("TWINBENCH_NF4_NATIVE", ""), get("TWINBENCH_NF4_ISA", ""))
    get = _ENVIRON.get
    return _load_for(get(b"TWINBENCH_NF4_NATIVE", b""), get(b"TWINBENCH_NF4_ISA", b""))


@functools.cache
def _load_for(native: str | bytes, wanted_isa: str | bytes) -> tuple[ctypes.CDLL | None, str]:
    """The build for these environment settings (cached; as str, or as bytes from :data:`_ENVIRON`)."""
    native, wanted_isa = os.fsdecode(native), os.fsdecode(wanted_isa)
    if native == "0":
        return None, "turned off by TWINBENCH_NF4_NATIVE=0"
    if not sys.platform.startswith("linux"):
        return None, f"native NF4 kernels are built for Linux only (this is {sys.platform})"
    isa, why = _choose_isa(wanted_isa)
    return _load_isa(isa) if isa else (None, why)


@functools.cache
def _load_isa(isa: str) -> tuple[ctypes.CDLL | None, str]:
    cc = c_compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install gcc)"
    try:
        lib = ctypes.CDLL(str(_build(cc, isa)))
    except Exception as exc:  # a failed build or load is a reason, not a crash
        return None, f"native NF4 build failed: {type(exc).__name__}: {exc}"
    if lib.nf4_native_abi() != 4 or lib.nf4_native_isa() != _ISA_ID[isa]:
        return None, "stale native NF4 build (ABI mismatch)"
    i64, ptr, cint, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.nf4_gemv.argtypes = [ptr, ptr, ptr, ptr, cint, ptr, i64, i64, i64, i64, cint, ptr, ptr, ptr, f32]
    lib.nf4_gemv_t.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, cint, ptr, ptr, ptr, f32]
    lib.nf4_lora_gemv.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, cint, ptr, ptr, ptr, f32,
                                  i64, ptr, ptr, cint, ptr, f32, ptr]
    lib.nf4_lora_gemv_t.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, cint, ptr, ptr, ptr, f32,
                                    i64, ptr, ptr, cint, ptr, f32, ptr, ptr, ptr]
    lib.nf4_dequantize.argtypes = [ptr, ptr, ptr, ptr, i64, i64, cint, cint, cint]
    lib.nf4_decode_absmax.argtypes = [ptr, ptr, ptr, ctypes.c_float, ptr, i64]
    lib.nf4_decode_absmax.restype = None
    lib.nf4_trace.argtypes = [ptr]
    lib.nf4_first_touch_copy.argtypes = [ptr, ptr, i64, i64, cint]
    lib.nf4_dequantize_panel.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, i64, cint, cint, cint]
    return lib, ""


def loaded() -> ctypes.CDLL | None:
    """The build the environment asks for, or None (:func:`status` says why): one environment read."""
    return _load()[0]


def isa() -> str | None:
    """The vector layer of the loaded build ('avx512'/'avx2'/'neon'), or None when the native kernels are off."""
    lib = _load()[0]  # one environment read; the build says which layer it is
    return None if lib is None else _ISA_NAME[lib.nf4_native_isa()]


def status() -> tuple[bool, str]:
    """(usable, why not): CPU flags, a working compiler and a successful build (built once, then cached)."""
    lib, why = _load()
    return lib is not None, why


# Blocks per row the GEMV kernels' per-row scale buffers hold (nf4_native.c: MAX_ROW_BLOCKS).
MAX_ROW_BLOCKS = 2048


def supports(packed2d: torch.Tensor, scales: Scales) -> bool:
    """The native kernels take contiguous CPU weights whose blocks are a power of two >= 32 columns, at most
    MAX_ROW_BLOCKS of them per row."""
    return fits(packed2d, scales) and _load()[0] is not None


def fits(packed2d: torch.Tensor, scales: Scales) -> bool:
    """:func:`supports` without asking whether the build is loaded (the caller has :func:`status`)."""
    k = 2 * packed2d.shape[1]
    nb = scales.shape[-1]
    bs = k // nb if nb and k % nb == 0 else 0
    # blocks a power of two >= 32 columns (bnb's are: 64..4096; the GEMV lanes rely on it)
    return packed2d.is_cpu and packed2d.is_contiguous() and bs >= 32 and bs & (bs - 1) == 0 and nb <= MAX_ROW_BLOCKS


@dataclass(frozen=True)
class NestedScales:
    """bnb's double-quantised absmax as stored (uint8 ``q`` [N, K/bs], fp32 ``absmax2`` per 256 blocks, the
    256-entry ``code2``, ``offset``), for the GEMV kernels, which decode each block's scale as they reach it
    (no fp32 scale array written and read again per call)."""

    q: torch.Tensor
    absmax2: torch.Tensor
    code2: torch.Tensor
    offset: float

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def checked(self) -> NestedScales:
        """These scales with absmax2/code2 as contiguous fp32 (self when they already are), checked for C."""
        q = _checked(self.q, torch.uint8, "absmax")
        a2 = _checked(self.absmax2.float().contiguous(), torch.float32, "absmax2")
        c2 = _checked(self.code2.float().contiguous(), torch.float32, "code2")
        if a2.numel() * 256 < q.numel() or c2.numel() != 256:
            raise ValueError("absmax2 must cover every 256 blocks and code2 must have 256 values")
        if a2 is self.absmax2 and c2 is self.code2 and type(self.offset) is float:
            return self
        return NestedScales(q, a2, c2, float(self.offset))

    def decoded(self) -> torch.Tensor:
        """The fp32 scales [N, K/bs] (what the kernels compute per block)."""
        return decode_absmax(self.q, self.absmax2, self.code2, self.offset).reshape(self.q.shape)


Scales = torch.Tensor | NestedScales


def _scale_args(scales: Scales) -> tuple:
    """(fp32 scales, q, absmax2, code2, offset) pointers for the C kernels: one form set, the other NULL."""
    if isinstance(scales, NestedScales):
        return (None, scales.q.data_ptr(), scales.absmax2.data_ptr(), scales.code2.data_ptr(), scales.offset)
    return (scales.data_ptr(), None, None, None, 0.0)


def _checked(t: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    if t.dtype != dtype or not t.is_cpu or not t.is_contiguous():
        raise ValueError(f"{name}: need a contiguous CPU {dtype} tensor, got {t.dtype} on {t.device}")
    return t


def _lib() -> ctypes.CDLL:
    lib, why = _load()
    if lib is None:
        raise RuntimeError(why)
    return lib


def _call(fn, *args) -> None:
    rc = fn(*args)
    if rc == -2:
        raise MemoryError(f"{fn.__name__}: no memory for its scratch buffer")
    if rc != 0:
        raise ValueError(f"{fn.__name__} refused its arguments {args[5:]}")


def decode_absmax(q: torch.Tensor, absmax2: torch.Tensor, code2: torch.Tensor, offset: float) -> torch.Tensor:
    """fp32 block scales from bnb's double-quantised absmax (``code2[q] * absmax2[i // 256] + offset``)."""
    q = _checked(q.reshape(-1), torch.uint8, "absmax")
    a2, c2 = _checked(absmax2.float().contiguous(), torch.float32, "absmax2"), _checked(code2.float().contiguous(),
                                                                                      torch.float32, "code2")
    if a2.numel() * 256 < q.numel() or c2.numel() != 256:
        raise ValueError("absmax2 must cover every 256 blocks and code2 must have 256 values")
    out = torch.empty(q.numel(), dtype=torch.float32)
    _lib().nf4_decode_absmax(q.data_ptr(), a2.data_ptr(), c2.data_ptr(), float(offset), out.data_ptr(), q.numel())
    return out


# Packed weight bytes per thread below which extra threads cost more than they save (~20 us of work each):
# a team of threads waits for its slowest member, and on a shared machine that can be a descheduled one.
BYTES_PER_THREAD = 1 << 18


def threads_for(packed2d: torch.Tensor) -> int:
    """torch's thread count, capped so that each thread gets at least BYTES_PER_THREAD of the weight."""
    threads = torch.get_num_threads()
    return threads if threads == 1 else max(1, min(threads, packed2d.numel() // BYTES_PER_THREAD))


def _weight(packed2d: torch.Tensor, scales: Scales) -> tuple[torch.Tensor, Scales, int, int, int]:
    """The weight checked for the C kernels (contiguous CPU uint8 bytes; contiguous fp32 or nested scales that
    split it into whole blocks): (packed2d, scales, n, k, blocksize). Cheap checks, run on every call: a cached
    verdict would need a key as costly as the checks (pointer, shape, strides, dtype of four tensors)."""
    packed2d = _checked(packed2d, torch.uint8, "packed")
    if isinstance(scales, NestedScales):
        scales = scales.checked()
        count = scales.q.numel()
    else:
        scales = _checked(scales.contiguous(), torch.float32, "scales")  # C reads its flat view
        count = scales.numel()
    if packed2d.dim() != 2:
        raise ValueError(f"packed must be [N, K/2], got {tuple(packed2d.shape)}")
    n, half = packed2d.shape
    k = 2 * half
    if count == 0 or (n * k) % count:
        raise ValueError(f"{count} scales do not split a {n}x{k} weight into blocks")
    return packed2d, scales, n, k, n * k // count


class _KernelWeight(NamedTuple):
    """What a wrapper call passes C for its weight."""

    lib: ctypes.CDLL
    packed2d: torch.Tensor  # its size sets the thread count (_threads)
    head: tuple  # (packed, fp32 scales) pointers
    nested: tuple  # (q, absmax2, code2) pointers and the offset
    n: int
    k: int
    blocksize: int
    keep: object  # the tensors behind the pointers, alive until the call returns


@dataclass(frozen=True, slots=True)
class CheckedWeight:
    """A weight checked once for the few-rows kernels (:func:`check_weight`), with what C takes for it worked out:
    the GEMV wrappers accept it in place of ``(packed2d, scales)`` (pass ``scales=None``) and then skip the
    checks, the environment read and the pointer arguments (docs/quant_linear.md, "Per-call cost of the
    few-rows path"). The pointers are those of private handles (detached aliases: reassigning a caller's
    tensor's ``.data`` cannot free what they point at); the version counters of the tensors it was derived from are kept, and a wrapper
    refuses it once any of them changed in place (new values under converted copies or a read offset, a resize
    that moved the bytes, a weight modified between a forward and its backward). Its calls use the build it
    was checked for (the environment is read when checking, not per call)."""

    kernel: _KernelWeight
    watched: tuple[torch.Tensor, ...]
    versions: tuple[int, ...]
    # the compiled op's weight arguments (impls/kernels/nf4_op.py): [code16, *the tensors behind the pointers], the
    # watched tensors not behind one of those, the offset, the block size and the path of the build it calls
    op_args: tuple[list[torch.Tensor], list[torch.Tensor], float, int, str]

    def fresh(self) -> bool:
        """None of the tensors it was derived from changed in place since the check."""
        return tuple([t._version for t in self.watched]) == self.versions


def check_weight(packed2d: torch.Tensor, scales: Scales, derived_from: tuple[torch.Tensor, ...] = (),
                 lib: ctypes.CDLL | None = None) -> CheckedWeight:
    """``(packed2d, scales)`` checked as every wrapper checks them (ValueError else), for the build ``lib``
    (default: the loaded one; RuntimeError when there is none). ``derived_from``: the tensors whose in-place
    changes make the result stale (default: the given ones; a caller that built them from others, e.g. read a
    scalar offset with ``float``, names those)."""
    lib = lib or _lib()
    watched = derived_from or (packed2d, *((scales.q, scales.absmax2, scales.code2)
                                           if isinstance(scales, NestedScales) else (scales,)))
    versions = tuple([t._version for t in watched])
    packed2d, scales, n, k, bs = _weight(packed2d, scales)
    # private handles (detach: same storage and version counter, ~0.4 us against ~2.5 for a view)
    packed2d = packed2d.detach()
    if isinstance(scales, NestedScales):
        keep = (packed2d, scales.q.detach(), scales.absmax2.detach(), scales.code2.detach())
        nested = (keep[1].data_ptr(), keep[2].data_ptr(), keep[3].data_ptr(), scales.offset)
        head = (packed2d.data_ptr(), None)
    else:
        keep = (packed2d, scales.detach())
        nested = (None, None, None, 0.0)
        head = (packed2d.data_ptr(), keep[1].data_ptr())
    # the op saves the weight tensors through autograd (their version counters are the originals' where they are
    # views: reshape and detach share them), so it needs to watch only what is not behind one of them (a
    # converted copy's original, the offset read into a float): fewer saved tensors per call
    stores = {t.untyped_storage().data_ptr() for t in keep}
    op_watched = [t for t in watched if t.untyped_storage().data_ptr() not in stores]
    op_args = ([nf4_table("cpu"), *keep], op_watched, float(nested[3]), bs, lib._name)
    return CheckedWeight(_KernelWeight(lib, packed2d, head, nested, n, k, bs, keep), watched, versions, op_args)


def _kernel_weight(packed2d: torch.Tensor | CheckedWeight, scales: Scales | None) -> _KernelWeight:
    """The weight's C arguments: a :class:`CheckedWeight`'s (refused when stale), else checked now."""
    if isinstance(packed2d, CheckedWeight):
        if not packed2d.fresh():
            raise ValueError("the NF4 weight changed in place since it was checked (check_weight it again; "
                             "a weight modified between a forward and its backward cannot be differentiated)")
        return packed2d.kernel
    packed2d, scales, n, k, bs = _weight(packed2d, scales)
    sargs = _scale_args(scales)
    return _KernelWeight(_lib(), packed2d, (packed2d.data_ptr(), sargs[0]), sargs[1:], n, k, bs, scales)


def gemv(x: torch.Tensor, packed2d: torch.Tensor | CheckedWeight, scales: Scales | None) -> torch.Tensor:
    """``x @ W^T`` in fp32 for x [M, K] (bf16 read as is, other dtypes as fp32; up to MAX_ROWS rows per call).
    ``packed2d`` may be a :class:`CheckedWeight` (then ``scales`` is None), as for every GEMV wrapper."""
    w = _kernel_weight(packed2d, scales)
    n, k = w.n, w.k
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got {tuple(x.shape)}")
    bf16 = x.dtype == torch.bfloat16
    x = (x if bf16 else x.float()).contiguous()
    if not x.is_cpu:
        raise ValueError(f"x must be on the CPU, got {x.device}")
    m = x.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    code = nf4_table("cpu")
    xp, yp, xrow = x.data_ptr(), y.data_ptr(), k * x.element_size()  # row r at base + r * row bytes (contiguous)
    for r in range(0, m, MAX_ROWS):
        _call(w.lib.nf4_gemv, w.head[0], w.head[1], code.data_ptr(), xp + r * xrow, int(bf16),
              yp + r * n * 4, min(MAX_ROWS, m - r), n, k, w.blocksize, threads_for(w.packed2d), *w.nested)
    return y


def gemv_t(g: torch.Tensor, packed2d: torch.Tensor | CheckedWeight, scales: Scales | None) -> torch.Tensor:
    """``g @ W`` in fp32 for g [M, N] (the input gradient of ``x @ W^T``)."""
    w = _kernel_weight(packed2d, scales)
    n, k = w.n, w.k
    if g.dim() != 2 or g.shape[1] != n:
        raise ValueError(f"g must be [M, {n}], got {tuple(g.shape)}")
    g = g.float().contiguous()
    if not g.is_cpu:
        raise ValueError(f"g must be on the CPU, got {g.device}")
    m = g.shape[0]
    dx = torch.empty(m, k, dtype=torch.float32)
    code = nf4_table("cpu")
    gp, dxp = g.data_ptr(), dx.data_ptr()  # fp32, contiguous: row r at base + r * row bytes
    for r in range(0, m, MAX_ROWS):
        _call(w.lib.nf4_gemv_t, w.head[0], w.head[1], code.data_ptr(), gp + r * n * 4, dxp + r * k * 4,
              min(MAX_ROWS, m - r), n, k, w.blocksize, threads_for(w.packed2d), *w.nested)
    return dx


def _fp32(t: torch.Tensor, name: str) -> torch.Tensor:
    """t as a contiguous fp32 CPU tensor (t itself when it already is one)."""
    if t.dtype != torch.float32 or not t.is_contiguous():
        t = t.float().contiguous()
    if not t.is_cpu:
        raise ValueError(f"{name}: need a contiguous CPU torch.float32 tensor, got {t.dtype} on {t.device}")
    return t


def _lora_factors(lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(A, B, both bf16): bf16 factors as they are (the kernels widen them as they read: no fp32 copies, 2 r (N + K)
    bytes written and read again per call), any other dtype as fp32."""
    if lora_a.dtype == lora_b.dtype == torch.bfloat16:
        return _checked(lora_a.contiguous(), torch.bfloat16, "lora_A"), \
            _checked(lora_b.contiguous(), torch.bfloat16, "lora_B"), True
    return _fp32(lora_a, "lora_A"), _fp32(lora_b, "lora_B"), False


def lora_gemv(x: torch.Tensor, packed2d: torch.Tensor | CheckedWeight, scales: Scales | None,
              lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scaling: float,
              bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The whole few-rows forward in one native call: ``(x W^T + scaling (x A^T) B^T + bias, x A^T)``, computed
    and returned in fp32, for x [M <= MAX_ROWS, K], A [r, K], B [N, r] (both or neither; both bf16 are read as
    bf16), bias [N] or None. x A^T is what
    :func:`lora_gemv_t` takes back (None without LoRA). The LoRA products and the bias run inside the GEMV's
    OpenMP region (docs/quant_linear.md, "GEMV kernel", the whole call)."""
    w = _kernel_weight(packed2d, scales)
    n, k = w.n, w.k
    x = _fp32(x, "x")
    x_shape = x.shape  # each .shape builds a new torch.Size: read once
    if len(x_shape) != 2 or x_shape[1] != k or not 1 <= x_shape[0] <= MAX_ROWS:
        raise ValueError(f"x must be [M <= {MAX_ROWS}, {k}], got {tuple(x_shape)}")
    m = x_shape[0]
    rank, ap, bp, xa, xap, ab_bf16 = 0, None, None, None, None, False
    if lora_a is not None:
        lora_a, lora_b, ab_bf16 = _lora_factors(lora_a, lora_b)
        a_shape, b_shape = lora_a.shape, lora_b.shape
        rank = a_shape[0]
        if a_shape != (rank, k) or b_shape != (n, rank) or not 1 <= rank <= MAX_RANK:
            raise ValueError(f"LoRA factors must be [r <= {MAX_RANK}, {k}] and [{n}, r], got "
                             f"{tuple(a_shape)} and {tuple(b_shape)}")
        xa = torch.empty(m, rank, dtype=torch.float32)
        ap, bp, xap = lora_a.data_ptr(), lora_b.data_ptr(), xa.data_ptr()
    biasp = None
    if bias is not None:
        bias = _fp32(bias, "bias")
        if bias.shape != (n,):
            raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
        biasp = bias.data_ptr()
    y = torch.empty(m, n, dtype=torch.float32)
    _call(w.lib.nf4_lora_gemv, w.head[0], w.head[1], nf4_table("cpu").data_ptr(), x.data_ptr(), y.data_ptr(), m, n,
          k, w.blocksize, threads_for(w.packed2d), *w.nested, rank, ap, bp, int(ab_bf16), biasp, float(scaling), xap)
    return y, xa


def lora_gemv_t(g: torch.Tensor, packed2d: torch.Tensor | CheckedWeight, scales: Scales | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, xa: torch.Tensor, scaling: float, x: torch.Tensor,
                need: tuple[bool, bool, bool] = (True, True, True)) -> tuple[torch.Tensor | None, ...]:
    """The whole few-rows backward of :func:`lora_gemv` in one native call: ``(dx, dA, dB)`` = (g W + scaling
    (g B) A, scaling (g B)^T x, g^T (scaling xa)), computed in fp32 (dA and dB returned in bf16, rounded once,
    when A and B are bf16), each only where ``need`` says (else None; without dx the weight is not read)."""
    w = _kernel_weight(packed2d, scales)
    n, k = w.n, w.k
    g, x, xa = _fp32(g, "g"), _fp32(x, "x"), _fp32(xa, "xa")
    lora_a, lora_b, ab_bf16 = _lora_factors(lora_a, lora_b)
    g_shape, a_shape = g.shape, lora_a.shape  # each .shape builds a new torch.Size: read once
    m, rank = g_shape[0], a_shape[0]
    if g_shape != (m, n) or not 1 <= m <= MAX_ROWS or x.shape != (m, k) or xa.shape != (m, rank) \
            or a_shape != (rank, k) or lora_b.shape != (n, rank) or not 1 <= rank <= MAX_RANK:
        raise ValueError(f"need g [M <= {MAX_ROWS}, {n}], x [M, {k}], xa [M, r], A [r, {k}], B [{n}, r]; got "
                         f"{[tuple(t.shape) for t in (g, x, xa, lora_a, lora_b)]}")
    need_x, need_a, need_b = need
    dx = torch.empty(m, k, dtype=torch.float32) if need_x else None
    da = torch.empty(rank, k, dtype=lora_a.dtype) if need_a else None
    db = torch.empty(n, rank, dtype=lora_b.dtype) if need_b else None
    _call(w.lib.nf4_lora_gemv_t, w.head[0], w.head[1], nf4_table("cpu").data_ptr(), g.data_ptr(),
          None if dx is None else dx.data_ptr(), m, n, k, w.blocksize, threads_for(w.packed2d), *w.nested, rank,
          lora_a.data_ptr(), lora_b.data_ptr(), int(ab_bf16), xa.data_ptr(), float(scaling), x.data_ptr(),
          None if da is None else da.data_ptr(), None if db is None else db.data_ptr())
    return dx, da, db


TRACE_POINTS = ("entry", "forked", "phase1", "barrier", "done", "joined")  # nf4_native.c: TRACE_*


def last_trace() -> torch.Tensor | None:
    """In a build with ``-DNF4_TRACE=1`` (append it to :data:`FLAGS` before the first call): when each thread
    (up to 8) of the last :func:`lora_gemv` / :func:`lora_gemv_t` call reached each of :data:`TRACE_POINTS`, as
    [thread, point, (CLOCK_MONOTONIC ns, the thread's CPU time in ns)] (0: not reached; entry and joined: the
    calling thread only), then cleared; None in a normal build."""
    out = torch.zeros(8, len(TRACE_POINTS), 2, dtype=torch.int64)
    return out if _lib().nf4_trace(out.data_ptr()) else None


def place(packed2d: torch.Tensor) -> torch.Tensor:
    """A copy of the packed weight whose rows are first written by the threads that will read them in the GEMV
    (each thread's initial share of the forward's 32-row chunks at torch's thread count): on a multi-socket
    machine each thread's rows then sit on its own node's memory. One socket gains nothing; the kernels take either tensor."""
    packed2d = _checked(packed2d, torch.uint8, "packed")
    out = torch.empty_like(packed2d)
    _call(_lib().nf4_first_touch_copy, packed2d.data_ptr(), out.data_ptr(), packed2d.shape[0],
          packed2d.shape[1], threads_for(packed2d))
    return out


# Outputs from this size on are written with non-temporal stores (``dequantize``'s ``stream``): measured on an Ice
# Lake server part, 4096-column fp32 weights of 256-4096 rows dequantised and then multiplied by a 512-row batch
# (one thread; docs/quant_linear.md, "Batch 512"): dequantise + GEMM over the bare GEMM 1.099 -> 1.020 at 16 MB,
# 1.052 -> 1.034 at 32 MB, 1.094 -> 1.025 at 64 MB; at 4-8 MB 1.03 -> 1.02, within the noise, so smaller outputs,
# which the caches can hold for their reader, keep plain stores.
STREAM_MIN_BYTES = 16 << 20


def dequantize(packed2d: torch.Tensor, scales: Scales, dtype: torch.dtype,
               out: torch.Tensor | None = None, stream: bool | None = None) -> torch.Tensor:
    """The [N, K] weight in ``dtype`` (fp32/bf16/fp16): ``code * absmax`` in fp32, rounded to nearest even
    (written into ``out`` when given: a contiguous [N, K] tensor of that dtype). ``stream``: write it with
    non-temporal stores, past the caches (None: from :data:`STREAM_MIN_BYTES` on); the same bits either way."""
    if dtype not in _OUT_KIND:
        raise ValueError(f"native dequantise writes fp32/bf16/fp16, not {dtype}")
    packed2d, scales, n, k, bs = _weight(packed2d, scales)
    if isinstance(scales, NestedScales):
        scales = scales.decoded().reshape(-1)
    if out is None:
        out = torch.empty(n, k, dtype=dtype)
    elif out.shape != (n, k):
        raise ValueError(f"out has shape {tuple(out.shape)}, the weight is {n}x{k}")
    _checked(out, dtype, "out")
    if stream is None:
        stream = out.numel() * out.element_size() >= STREAM_MIN_BYTES
    _call(_lib().nf4_dequantize, packed2d.data_ptr(), scales.data_ptr(), nf4_table("cpu").data_ptr(), out.data_ptr(),
          n * k, bs, _OUT_KIND[dtype], threads_for(packed2d), int(stream))
    return out


def panel_fast_bf16() -> bool:
    """Whether :func:`dequantize_panel` narrows bf16 with AVX512-BF16 here (the CPU has it; AVX-512 build)."""
    return bool(_lib().nf4_panel_fast_bf16())


def dequantize_panel(packed2d: torch.Tensor, scales: Scales, dtype: torch.dtype, rows: tuple[int, int],
                     cols: tuple[int, int], out: torch.Tensor, threads: int | None = None,
                     fast_bf16: bool = True) -> torch.Tensor:
    """``W[r0:r1, c0:c1]`` (columns multiples of 32) written into ``out``, a [r1 - r0, c1 - c0] tensor of
    ``dtype`` whose rows may be strided (a column slice of a wider buffer): bit-identical to that slice of
    :func:`dequantize`. ``scales``: the fp32 block scales (decode nested ones once per call with
    :meth:`NestedScales.decoded`, not once per panel). ``threads``: default torch's, capped by the panel's size.
    ``fast_bf16``: bf16 narrowed by AVX512-BF16 where the CPU has it (the same bits; False forces the portable
    narrowing, for the tests that compare the two)."""
    if dtype not in _OUT_KIND:
        raise ValueError(f"native dequantise writes fp32/bf16/fp16, not {dtype}")
    packed2d, scales, n, k, bs = _weight(packed2d, scales)
    if isinstance(scales, NestedScales):
        scales = scales.decoded().reshape(-1)
    (r0, r1), (c0, c1) = rows, cols
    if not (0 <= r0 <= r1 <= n and 0 <= c0 <= c1 <= k and c0 % 32 == 0 and c1 % 32 == 0):
        raise ValueError(f"panel rows {rows} / cols {cols} outside the {n}x{k} weight or not 32-column aligned")
    if out.dtype != dtype or out.device.type != "cpu" or out.shape != (r1 - r0, c1 - c0) or out.stride(1) != 1 \
            or (r1 - r0 > 1 and out.stride(0) < c1 - c0):
        raise ValueError(f"out must be a CPU {dtype} [{r1 - r0}, {c1 - c0}] tensor with unit column stride")
    if threads is None:
        threads = max(1, min(torch.get_num_threads(), (r1 - r0) * (c1 - c0) // (2 * BYTES_PER_THREAD)))
    _call(_lib().nf4_dequantize_panel, packed2d.data_ptr(), scales.data_ptr(), nf4_table("cpu").data_ptr(),
          out.data_ptr(), n, k, bs, r0, r1, c0, c1, max(out.stride(0), c1 - c0), _OUT_KIND[dtype], threads, int(fast_bf16))
    return out
