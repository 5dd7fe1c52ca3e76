"""NF4 at batch 512 against the bare GEMMs (issue 18 item 2), in one process, interleaved round by round:

    taskset -c 0 python3 benchmarks/nf4_gemm_panels.py --threads 1 [--dtype fp32 bf16] [--rounds 11]
    python3 benchmarks/nf4_gemm_panels.py --threads 2

The suite's bench shape (4096x4096, batch 512, LoRA r16, blocksize 64; the GEMM path takes fp32 block
scales: the impl decodes the double quant before calling it). Per round each variant runs once, in
rotating order: ``bare`` (the GEMMs and LoRA products on a weight dequantised beforehand, the calls bare_gemm
makes), ``before`` (the GEMM path before panels: the whole W dequantised by nf4_dequantize into the workspace
with plain stores), ``whole`` (the whole W by nf4.dequantize as it is now: for bf16 the faster panel kernel's
narrowing, for fp32 non-temporal stores from ``nf4_native.STREAM_MIN_BYTES`` on) and
``panels-P`` (W dequantised P rows / P columns at a time into a cache-sized buffer, one GEMM per panel; what
nf4_mm / nf4_mm_t run at GEMM_PANELS' size); at several threads also ``splitT-P`` (each of T Python
threads dequantises and multiplies its own panels at one thread, so dequantising overlaps another's GEMM).
Printed: the median time per variant and the median over rounds of variant / bare, forward and forward +
backward (dx = g W and the LoRA gradients), then the dequantisation alone and the bare base GEMM alone; ``os.getloadavg()`` before and after. Numbers
taken at a load above the cores' count are not results (docs/quant_linear.md, "Batch 512"); at one thread the
clock is the thread's CPU time (``--clock wall`` for wall time), which a shared core disturbs far less.
A panel size of 4096 (the whole weight) is one panel.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from twinbench.impls.kernels import nf4, nf4_native

N = K = 4096
BATCH, RANK, BLOCKSIZE, SCALING = 512, 16, 64, 2.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _lora_fwd(out, x, a, b):
    xa = x @ a.t()
    return out.addmm_(xa, b.t(), alpha=SCALING), xa


def _lora_bwd(dx, g, x, xa, a, b):
    gb = g @ b
    dx.addmm_(gb, a, alpha=SCALING)
    return dx, (gb.t() @ x) * SCALING, (g.t() @ xa) * SCALING


def variants(packed, scales, weight, panel_sizes, threads):
    """name -> (forward, backward) callables; forward(x) returns (out, saved), backward(g, x, saved) -> grads."""
    def make(base_fwd, base_bwd):
        def fwd(x, a, b):
            return _lora_fwd(base_fwd(x), x, a, b)

        def bwd(g, x, xa, a, b):
            return _lora_bwd(base_bwd(g), g, x, xa, a, b)
        return fwd, bwd

    def before(dtype):  # main's GEMM path before the panels (2026-12-05): whole W, nf4_dequantize's narrowing, plain stores
        return nf4_native.dequantize(packed, scales, dtype, out=nf4._workspace(N, K, dtype), stream=False)

    out = {"bare": make(lambda x: x @ weight.t(), lambda g: g @ weight),
           "before": make(lambda x: nf4.gemm_nt(x, before(x.dtype)), lambda g: nf4.gemm_nn(g, before(g.dtype))),
           "whole": make(lambda x: nf4.gemm_nt(x, nf4.dequantize(packed, scales, x.dtype, transient=True)),
                         lambda g: nf4.gemm_nn(g, nf4.dequantize(packed, scales, g.dtype, transient=True)))}
    for p in panel_sizes:
        out[f"panels-{p}"] = make(lambda x, p=p: nf4.mm_panels(x, packed, scales, p),
                                  lambda g, p=p: nf4.mm_t_panels(g, packed, scales, p))
    if threads > 1 and panel_sizes:
        p = panel_sizes[0]
        out[f"split{threads}-{p}"] = make(lambda x: _split(x, packed, scales, p, threads, forward=True),
                                         lambda g: _split(g, packed, scales, p, threads, forward=False))
    return out


_POOL: list[ThreadPoolExecutor] = []


def _split(a, packed, scales, panel, threads, forward):
    """Each of ``threads`` Python threads dequantises and multiplies its own share of the panels, torch and the
    native kernels at one thread each (torch's ops release the GIL), so one thread's dequantisation can run
    while another's GEMM does: the overlap one Python thread cannot have."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(threads))
    n, k = packed.shape[0], 2 * packed.shape[1]
    span = n if forward else k
    out = torch.empty(a.shape[0], span, dtype=a.dtype)
    share = -(-span // threads // 32) * 32

    def work(lo, hi):
        buf = nf4.panel_workspace(panel, k, a.dtype) if forward else nf4.panel_workspace(n, panel, a.dtype)
        for c0 in range(lo, hi, panel):
            c1 = min(hi, c0 + panel)
            if forward:
                w = nf4_native.dequantize_panel(packed, scales, a.dtype, (c0, c1), (0, k), buf[: c1 - c0], threads=1)
                torch.mm(a, w.t(), out=out[:, c0:c1])
            else:
                w = nf4_native.dequantize_panel(packed, scales, a.dtype, (0, n), (c0, c1), buf[:, : c1 - c0],
                                                threads=1)
                torch.mm(a, w, out=out[:, c0:c1])

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for f in [_POOL[0].submit(work, lo, min(span, lo + share)) for lo in range(0, span, share)]:
            f.result()
    finally:
        torch.set_num_threads(before)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--panels", nargs="*", type=int, default=[256, 512, 1024],
                        help="panel sizes (rows forward, columns backward; multiples of 32)")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--clock", choices=("auto", "wall"), default="auto",
                        help="auto: this thread's CPU time at one thread, wall time otherwise")
    args = parser.parse_args()
    if any(p <= 0 or p % 32 for p in args.panels):
        print("nf4_gemm_panels: --panels must be positive multiples of 32", file=sys.stderr)
        return 2
    if not nf4_native.status()[0]:
        print(f"nf4_gemm_panels: native kernels unavailable: {nf4_native.status()[1]}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    # One thread: the CPU time of this thread (torch's GEMM and the native kernels run in it at one thread), so
    # time another process takes on the same core is not counted (its cache and memory traffic still are).
    clock = time.thread_time if args.threads == 1 and args.clock == "auto" else time.perf_counter
    print(f"threads {args.threads}, affinity {sorted(os.sched_getaffinity(0))}, clock {clock.__name__}, "
          f"load before: {_load()}")
    gen = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen)
    scales = torch.rand(N, K // BLOCKSIZE, generator=gen) * 0.1
    for dname in args.dtype:
        dtype = DTYPES[dname]
        x = torch.randn(BATCH, K, generator=gen).to(dtype)
        g = torch.randn(BATCH, N, generator=gen).to(dtype)
        a = (torch.randn(RANK, K, generator=gen) / 64).to(dtype)
        b = (torch.randn(N, RANK, generator=gen) / 4).to(dtype)
        weight = nf4_native.dequantize(packed, scales, dtype)
        vs = variants(packed, scales, weight, args.panels, args.threads)
        times: dict[tuple[str, str], list[float]] = {}
        alone = [("dequantise alone", lambda: nf4.dequantize(packed, scales, dtype, transient=True)),
                 ("base GEMM alone (fwd)", lambda: x @ weight.t()),
                 ("base GEMM alone (bwd)", lambda: g @ weight)]
        if args.panels:  # one panel of the first size: its dequantisation (into a cached buffer) and its GEMM
            p = args.panels[0]
            rows, cols = nf4.panel_workspace(p, K, dtype), nf4.panel_workspace(N, p, dtype).clone()
            y, dx = torch.empty(BATCH, N, dtype=dtype), torch.empty(BATCH, K, dtype=dtype)
            alone += [(f"panel {p} rows: dequantise",
                       lambda: nf4_native.dequantize_panel(packed, scales, dtype, (0, p), (0, K), rows)),
                      (f"panel {p} rows: GEMM", lambda: torch.mm(x, rows.t(), out=y[:, :p])),
                      (f"panel {p} cols: dequantise",
                       lambda: nf4_native.dequantize_panel(packed, scales, dtype, (0, N), (0, p), cols)),
                      (f"panel {p} cols: GEMM", lambda: torch.mm(g, cols, out=dx[:, :p]))]
        extra: dict[str, list[float]] = {label: [] for label, _ in alone}
        names = list(vs)
        for rnd in range(args.rounds + 1):  # round 0: warm-up, not kept
            order = names[rnd % len(names):] + names[: rnd % len(names)]
            for name in order:
                fwd, bwd = vs[name]
                t0 = clock()
                out, xa = fwd(x, a, b)
                t1 = clock()
                bwd(g, x, xa, a, b)
                t2 = clock()
                if rnd:
                    times.setdefault((name, "fwd"), []).append(t1 - t0)
                    times.setdefault((name, "fwdbwd"), []).append(t2 - t0)
            for label, fn in alone:
                t0 = clock()
                fn()
                if rnd:
                    extra[label].append(clock() - t0)
        print(f"\n{dname}, {args.threads} thread(s), {args.rounds} rounds, load now: {_load()}")
        print(f"{'variant':<14} {'fwd ms':>9} {'fwd/bare':>9} {'fwdbwd ms':>10} {'fwdbwd/bare':>12}")
        for name in names:
            cells = []
            for mode in ("fwd", "fwdbwd"):
                ours, bare = times[(name, mode)], times[("bare", mode)]
                ratio = statistics.median(o / r for o, r in zip(ours, bare))
                cells.append(f"{statistics.median(ours) * 1e3:9.2f} {ratio:9.3f}" if mode == "fwd"
                             else f"{statistics.median(ours) * 1e3:10.2f} {ratio:12.3f}")
            print(f"{name:<14} {' '.join(cells)}")
        for label, ts in extra.items():
            print(f"{label:<28} {statistics.median(ts) * 1e3:8.2f} ms")
    print(f"\nload after: {_load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
