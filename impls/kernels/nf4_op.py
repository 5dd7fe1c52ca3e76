"""The compiled few-rows op (impls/kernels/nf4_op.cpp): ``torch.ops.twinbench_nf4.lora_linear``, the whole NF4 +
LoRA linear for x [M <= 4, K] as one C++ autograd op over the C kernels of :mod:`nf4_native`.

Why compiled: at decode sizes the kernel streams the weight in 0.3-2 ms, and right after a streamed weight has
evicted the interpreter the Python around it (an ``autograd.Function``, ctypes' argument conversion, the checks)
took 97-135 us per forward and 158-193 us per backward, ~20% of a 4096x4096 call at two threads. This op keeps
the checks a pointer's safety needs and cuts 10-30 us per forward and 40-80 us per backward of that (measured in
one process against the Function: docs/quant_linear.md, "The compiled few-rows op").

Built at first use with the C++ compiler (``$CXX``, ``c++`` or ``g++``) against the installed torch's headers and
libraries, ~20 s, by the same cached build as the C kernels (impls/kernels/native_build.py: ``nf4_op/<hash>.so``,
the hash covering the source, the flags, which name torch's version, and the compiler's version; built into a
temporary file and renamed into place, so concurrent first uses are safe and a killed build leaves nothing
half-written behind). Without a C++ compiler :func:`status` says why and the fused linear takes its composed
route (the NF4 kernels with torch's LoRA products around them); ``TWINBENCH_NF4_NATIVE=0`` turns the native
kernels, and so this op, off.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import torch
from twinbench.impls.kernels.native_build import build_shared_library

SOURCE = Path(__file__).with_name("nf4_op.cpp")
FLAGS = ["-O2"]


def status() -> tuple[bool, str]:
    """(usable, why not): built (or loaded from the cache) once per process."""
    return _load()


def loaded():
    """``torch.ops.twinbench_nf4.lora_linear``, or None where it is unusable (:func:`status` says why). Its
    arguments: ``(x [M <= 4, K], lora_A [r, K] or None, lora_B [N, r] or None, bias [N] or None,
    *nf4_native.CheckedWeight.op_args[:2], offset, blocksize, scaling, threads, kernels path)``, the last five
    floats, ints and a str; the result has x's dtype and is differentiable in x, A, B and bias."""
    if _OP is None:
        _load()  # sets _OP where the op builds (once per process; a failure is cached too)
    return _OP


_OP = None  # the op once loaded: a global read per call (~0.1 us) where functools' cache and torch.ops take ~6 us
#             right after a streamed weight evicted the interpreter


def _flags() -> tuple[list[str], tuple[str, ...]]:
    """(compiler flags, link arguments) for a torch extension library: torch's headers and ABI, its libraries
    (found again at load time through the rpath); torch's version is a define so that the cache key follows it."""
    root = Path(torch.__file__).parent
    flags = [*FLAGS, "-std=c++17", "-fPIC", "-shared",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
             f"-DTWINBENCH_TORCH_VERSION={torch.__version__}", f"-I{root / 'include'}",
             f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}"]
    lib = root / "lib"
    return flags, (f"-L{lib}", "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{lib}")


@functools.cache
def _load() -> tuple[bool, str]:
    global _OP
    cxx = shutil.which(os.environ.get("CXX", "")) or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        return False, "no C++ compiler found (set CXX, or install g++)"
    try:
        flags, libs = _flags()
        torch.ops.load_library(str(build_shared_library(cxx, SOURCE, flags, "nf4_op", libs)))
        _OP = torch.ops.twinbench_nf4.lora_linear
    except Exception as exc:  # a failed build or load is a reason, not a crash
        return False, f"compiled NF4 op unavailable: {type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}"
    return True, ""
