"""The compiled few-rows op (impls/kernels/nf4_op.cpp): ``torch.ops.twinbench_nf4.lora_linear``, the whole NF4 +
LoRA linear for x [M <= 4, K] as one C++ autograd op over the C kernels of :mod:`nf4_native`.

Why compiled: at decode sizes the kernel streams the weight in 0.3-2 ms, and the Python around it (an
``autograd.Function``, ctypes' argument conversion, the checks) cost ~40 us forward and ~55 us backward
cache-hot, two to three times that after a streamed weight evicted the interpreter: 10-25% of a 4096x4096 call at two threads
(docs/quant_linear.md, "The compiled few-rows op"). The C++ op keeps the checks a pointer's safety needs and
drops the rest.

Built with torch's C++ extension tooling (``torch.utils.cpp_extension``: torch's headers, compiler flags and ABI;
ninja drives it) at first use, ~20 s, and cached under the twinbench cache folder in ``nf4_op/<hash>/``, the hash
covering the source, torch's version and the C++ compiler's, so an edit or another torch gets its own build. Later
processes load the cached library directly (a marker written after a successful build says it is complete;
concurrent first builds wait on torch's lock file in that folder). Without a C++ compiler or ninja :func:`status` says why
and the fused linear takes its composed route (the NF4 kernels with torch's LoRA products around them);
``TWINBENCH_NF4_NATIVE=0`` turns the native kernels, and so this op, off.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch
from twinbench.impls.kernels.native_build import cache_dir

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


@functools.cache
def _load() -> tuple[bool, str]:
    cxx = shutil.which(os.environ.get("CXX", "")) or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        return False, "no C++ compiler found (set CXX, or install g++)"
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + torch.__version__.encode()
                         + version.encode()).hexdigest()[:16]
    name = f"twinbench_nf4_op_{key}"
    folder = cache_dir() / "nf4_op" / key
    built = folder / "built"  # written after a complete build: a library being linked is never loaded
    try:
        if built.exists():
            torch.ops.load_library(str(folder / f"{name}.so"))
        else:
            from torch.utils import cpp_extension  # imports setuptools: only when building

            folder.mkdir(parents=True, exist_ok=True)
            cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=FLAGS, build_directory=str(folder),
                               is_python_module=False, verbose=False)
            built.write_text(name)
    except Exception as exc:  # a failed build or load is a reason, not a crash
        return False, f"compiled NF4 op unavailable: {type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}"
    global _OP
    _OP = torch.ops.twinbench_nf4.lora_linear
    return True, ""
