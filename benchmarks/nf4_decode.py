"""Cycles per 64-byte group of the NF4 GEMV kernels, variant against variant, in one process (issue 18, item 1):

    taskset -c 0 python3 benchmarks/nf4_decode.py                      # this source, as built
    taskset -c 0 python3 benchmarks/nf4_decode.py --variant base=/tmp/old_nf4_native.c \\
        --variant new=impls/kernels/nf4_native.c --variant noofs=impls/kernels/nf4_native.c:-DNF4_OFFSET_LOADS=0
    taskset -c 0 python3 benchmarks/nf4_decode.py --calls fwd2,fwd3,bwd2,bwd3 \\
        --variant two=impls/kernels/nf4_native.c --variant any=impls/kernels/nf4_native.c:-DNF4_TWO_SCALES_ROWS=1
    OMP_WAIT_POLICY=passive taskset -c 0 python3 benchmarks/nf4_decode.py --threads 2 --cpu-time --calls bwd1

``--cpu-time`` times by the process's CPU time, all threads together (``OMP_WAIT_POLICY=passive``: a waiting
thread sleeps instead of spinning, so its wait is not counted): with more threads than CPUs (the second line)
the threads take turns, so it says what each thread's share of the work costs in cycles on its own (its access
pattern), not how the threads share the memory bandwidth.

Each ``--variant NAME=SOURCE[:-DFLAG,-DFLAG...]`` is compiled with the flags of ``impls/kernels/nf4_native.py``
(AVX-512 build; ``--isa avx2`` for the other) into its own .so and loaded with ctypes; the kernels
``nf4_gemv`` (forward, M rows of x) and ``nf4_gemv_t`` (backward, M rows of g) are called directly (no Python
wrapper: its ~15 us are not the kernel's) on the same inputs, variants alternating A B A B within every round,
``--rounds`` rounds, medians. Weights are double-quantised, blocksize 64 (the scales decoded in the kernel, as
QLoRA stores them). Shapes: ``l2`` 512x4096 (1 MB, L2-resident), ``l3`` 4096x4096 (8 MB, L3-resident), and
``stream`` 4096x14336 (a pool of ``--pool-mb`` of distinct copies, one per call: every byte from DRAM, as
benchmarks/nf4_stream.py). A group is 64 bytes of packed weight (128 columns of one row): cycles per group =
seconds per call x ``--ghz`` / (N K / 128). Also prints GB/s of stored weight (packed + scale bytes). The load
average is printed: numbers from a loaded machine are ratios between variants, not absolute results.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BS = 64
COMMON = ["-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
ISA = {"avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma"], "avx2": ["-mavx2", "-mfma", "-mf16c"]}
SHAPES = {"l2": (512, 4096), "l3": (4096, 4096), "stream": (4096, 14336)}


def build(name: str, spec: str, isa: str, out: Path) -> ctypes.CDLL:
    source, _, flags = spec.partition(":")
    so = out / f"{name}.so"
    cmd = [os.environ.get("CC", "gcc"), *COMMON, *ISA[isa], *[f for f in flags.split(",") if f], source, "-o", str(so)]
    subprocess.run(cmd, check=True)
    lib = ctypes.CDLL(str(so))
    p, i64, cint, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.nf4_gemv.argtypes = [p, p, p, p, cint, p, i64, i64, i64, i64, cint, p, p, p, f32]
    lib.nf4_gemv_t.argtypes = [p, p, p, p, p, i64, i64, i64, i64, cint, p, p, p, f32]
    return lib


class Weight:
    """A double-quantised NF4 weight [n, k] (random codes: timing only) and its pointers."""

    def __init__(self, n: int, k: int, gen: torch.Generator, fp32_scales: bool):
        self.packed = torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, generator=gen)
        self.q = torch.randint(0, 256, (n * k // BS,), dtype=torch.uint8, generator=gen)
        self.absmax2 = torch.rand(-(-self.q.numel() // 256), generator=gen) + 0.5
        self.scales = torch.rand(n * k // BS, generator=gen) + 0.5
        self.nbytes = self.packed.numel() + (self.scales.numel() * 4 if fp32_scales else self.q.numel())
        # (scales pointer, q, absmax2) as the kernels take them: exactly one of the two forms
        self.sargs = (self.scales.data_ptr(), None, None) if fp32_scales else \
            (None, self.q.data_ptr(), self.absmax2.data_ptr())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", default=[], help="NAME=SOURCE[:-DFLAG,...] (default: this source)")
    ap.add_argument("--isa", choices=sorted(ISA), default="avx512")
    ap.add_argument("--shapes", default="l2,l3,stream")
    ap.add_argument("--calls", default="fwd1,bwd1", help="fwdM, bwdM (M = 1..4 rows of x or g)")
    ap.add_argument("--bf16", action="store_true", help="bf16 x in the forward (fp32 otherwise)")
    ap.add_argument("--fp32-scales", action="store_true", help="fp32 block scales (double-quantised otherwise)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cpu-time", action="store_true", help="time by the process's CPU time, all threads summed")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--pool-mb", type=int, default=700)
    ap.add_argument("--ghz", type=float, default=2.94, help="core clock (a dependent imul chain measured 2.94)")
    args = ap.parse_args()
    # one thread runs the kernel on the calling thread: its CPU time leaves out the time this process was
    # descheduled (other work pinned to the same core), which wall time would count
    clock = time.process_time if args.cpu_time else time.thread_time if args.threads == 1 else time.perf_counter
    specs = args.variant or [f"this={ROOT / 'impls/kernels/nf4_native.c'}"]
    out = Path(tempfile.mkdtemp(prefix="nf4_decode_"))
    libs = {}
    for v in specs:
        name, _, spec = v.partition("=")
        if not spec:
            print(f"nf4_decode: --variant wants NAME=SOURCE[:FLAGS], got {v!r}", file=sys.stderr)
            return 2
        libs[name] = build(name, spec, args.isa, out)
    from twinbench.impls.kernels.nf4_code import nf4_table

    code16 = nf4_table("cpu").float().contiguous()
    code2 = torch.linspace(-1, 1, 256)
    gen = torch.Generator().manual_seed(0)
    print(f"isa {args.isa}, threads {args.threads}, x {'bf16' if args.bf16 else 'fp32'}, "
          f"clock {clock.__name__}, OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', '-')}, load {os.getloadavg()}")
    print(f"{'shape':>7} {'call':>5} " + " ".join(f"{n + ' cyc/grp':>16} {'GB/s':>6}" for n in libs))
    for shape in args.shapes.split(","):
        n, k = SHAPES[shape]
        copies = max(2, -(-args.pool_mb * 2**20 // (n * k // 2))) if shape == "stream" else 1
        weights = [Weight(n, k, gen, args.fp32_scales) for _ in range(copies)]
        reps = 1 if shape == "stream" else max(1, int(2e7 // (n * k)))
        groups = n * k / 128
        for call in args.calls.split(","):
            m = int(call[3:])
            x = torch.randn(m, k, generator=gen)
            x = x.bfloat16() if args.bf16 and call.startswith("fwd") else x
            g = torch.randn(m, n, generator=gen)
            y = torch.empty(m, n)
            dx = torch.empty(m, k)

            def run(lib: ctypes.CDLL, w: Weight) -> None:
                if call.startswith("fwd"):
                    rc = lib.nf4_gemv(w.packed.data_ptr(), w.sargs[0], code16.data_ptr(), x.data_ptr(),
                                      int(x.dtype == torch.bfloat16), y.data_ptr(), m, n, k, BS, args.threads,
                                      w.sargs[1], w.sargs[2], code2.data_ptr(), 0.01)
                else:
                    rc = lib.nf4_gemv_t(w.packed.data_ptr(), w.sargs[0], code16.data_ptr(), g.data_ptr(),
                                        dx.data_ptr(), m, n, k, BS, args.threads, w.sargs[1], w.sargs[2],
                                        code2.data_ptr(), 0.01)
                if rc:
                    raise RuntimeError(f"kernel returned {rc}")

            times: dict[str, list[float]] = {name: [] for name in libs}
            results = {}
            for name, lib in libs.items():  # warm-up, and the variants must agree
                run(lib, weights[0])
                results[name] = (y if call.startswith("fwd") else dx).clone()
            first = next(iter(results.values()))
            for name, r in results.items():
                if not torch.equal(r, first):  # a variant may sum in another order: then say by how much
                    diff = float((r - first).abs().max() / first.abs().max())
                    print(f"  {name} differs from {next(iter(results))} on {shape} {call}: max |diff| / max |y| "
                          f"{diff:.1e}", file=sys.stderr)
            idx = 0
            for _ in range(args.rounds):
                for name, lib in libs.items():
                    samples = []
                    for _ in range(3 if shape == "stream" else 1):
                        t0 = clock()
                        for _ in range(reps):
                            run(lib, weights[idx % copies])
                            idx += 1
                        samples.append((clock() - t0) / reps)
                    times[name].append(min(samples) if shape != "stream" else statistics.median(samples))
            cells = []
            for name in libs:
                t = statistics.median(times[name])
                cells.append(f"{t * args.ghz * 1e9 / groups:16.2f} {weights[0].nbytes / t / 1e9:6.2f}")
            print(f"{shape:>7} {call:>5} " + " ".join(cells), flush=True)
    print(f"load at end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
