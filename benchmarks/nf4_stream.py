"""The NF4 GEMV against the DRAM read floor, with the weight streaming from memory (issue 18, item 1):

    taskset -c 0 python3 benchmarks/nf4_stream.py --threads 1
    python3 benchmarks/nf4_stream.py --threads 2

The harness bench re-reads one weight per case; between its calls other impls run, so how much of the weight
is still cached varies. Here every call reads a *different* copy of the weight (enough copies to fill
``--pool-mb``, default 700 MB: more than twice this VM's reported 300 MB L3), so every byte comes from DRAM.
Per shape, dtype and thread count it times, round by round: ``nf4_native.gemv`` / ``gemv_t`` alone and the
suite's ``fused_cpu`` call (forward, and forward + backward), interleaved with the read bandwidth at the same
thread count (the better of ``torch.dot`` and ``sum`` over two ``--bw-mb`` buffers, as the harness's ceiling).
Prints the median ms per call and its share of the read floor: the bytes of ``suites/quant_linear.bytes_moved``
(4-bit weight + double-quantised scales + LoRA + activations; gemv counts the forward's, gemv_t the backward's)
at the median read bandwidth. ``--no-prefetch`` builds the kernels without their software prefetch.
``--no-steal`` builds the forward with a static split of the row chunks (no stealing), to compare.
``--define NAME=VALUE`` (repeatable) builds them with ``-DNAME=VALUE``: an A/B of one of nf4_native.c's tuning
macros (e.g. ``BWD_CHUNK_MIN_ROWS``), each build its own cached library.
``--trace`` builds them with ``-DNF4_TRACE=1`` and, instead of the table, says where the time of the whole
``fused_cpu`` call goes (forward, and backward): Python before the native call; phase 1 (forward: x put in
group order on the calling thread, before the fork; backward: each thread's row slabs of dx, dB rows and
share of g B, then the wait at the barrier); the fork (until the last thread starts); the main phase
(forward: x A^T and the rows of W with their epilogue; backward: the slabs' partials added into dx, its LoRA
terms and dA), by the clock and by each thread's CPU time; the spread of the threads' finishing times, the
join and Python after (medians over the pool and rounds); then the eager floor: one trivial autograd op (``x * 2``
and its backward) timed right after another weight streamed, what any per-op call pays around its kernel here.
The load average is printed with every line:
numbers taken on a loaded machine are not results (docs/quant_linear.md, "GEMV kernel").
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from twinbench.impls.kernels import nf4_native
from twinbench.impls.kernels.nf4_weight import NF4Weight
from twinbench.impls.quant_linear.fused import nf4_lora_linear
from twinbench.suites.quant_linear import _case, bytes_moved

BLOCKSIZE, RANK, SCALING = 64, 16, 2.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CALLS = ("gemv", "gemv_t", "fused_fwd", "fused_fwdbwd")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _pool(n: int, k: int, pool_bytes: int) -> list[NF4Weight]:
    """Distinct double-quantised NF4 weights [n, k] filling pool_bytes (random codes: timing only)."""
    gen = torch.Generator().manual_seed(n * 7 + k)
    packed = torch.randint(0, 256, (n * k // 2, 1), dtype=torch.uint8, generator=gen)
    absmax = torch.randint(0, 256, (n * k // BLOCKSIZE,), dtype=torch.uint8, generator=gen)
    absmax2 = torch.rand(-(-absmax.numel() // 256), generator=gen) + 0.5
    code2 = torch.linspace(-1, 1, 256)
    copies = max(2, -(-pool_bytes // (packed.numel() + absmax.numel())))
    return [NF4Weight(packed.clone(), absmax.clone(), (n, k), BLOCKSIZE, absmax2.clone(), code2, torch.tensor(0.01))
            for _ in range(copies)]


def _gemv_weight(w: NF4Weight) -> tuple[torch.Tensor, nf4_native.NestedScales]:
    """(packed2d, double-quantised scales) of a pool weight, as the bare GEMV wrappers take them."""
    n, k = w.shape
    return (w.packed.reshape(n, k // 2),
            nf4_native.NestedScales(w.absmax.reshape(n, k // BLOCKSIZE), w.absmax2, w.code2, float(w.offset)))


def _calls(w: NF4Weight, dtype: torch.dtype, lora: tuple) -> dict:
    """name -> zero-argument callable for one weight of the pool."""
    n = w.shape[0]
    packed2d, nested = _gemv_weight(w)
    x = lora[0]
    a, b = lora[1], lora[2]
    g = torch.ones(1, n, dtype=dtype)

    def fused_fwdbwd():
        out = nf4_lora_linear(x, w, a, b, SCALING)
        torch.autograd.grad(out, (x, a, b), grad_outputs=g)

    return {"gemv": lambda: nf4_native.gemv(x.detach(), packed2d, nested),
            "gemv_t": lambda: nf4_native.gemv_t(g, packed2d, nested),
            "fused_fwd": lambda: nf4_lora_linear(x, w, a, b, SCALING),
            "fused_fwdbwd": fused_fwdbwd}


def _timed(fn, threads: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds per thread) of fn(): on a shared machine the CPU time leaves out the time the
    process was descheduled (memory stalls still count), so it is the fairer of the two under load."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, (time.process_time() - c) / threads


def _read_gbps(a: torch.Tensor, b: torch.Tensor, threads: int) -> tuple[float, float]:
    """The better of a dot (reads a and b) and a sum (reads a), best of 3 each: the harness's read ceiling;
    (by wall time, by CPU time)."""
    best = [0.0, 0.0]
    for _ in range(3):
        for fn, nbytes in ((lambda: torch.dot(a, b), 2 * a.numel() * 4), (a.sum, a.numel() * 4)):
            for i, sec in enumerate(_timed(fn, threads)):
                best[i] = max(best[i], nbytes / sec / 1e9)
    return best[0], best[1]


def _floor_bytes(n: int, k: int, dtype: str, call: str) -> float:
    moved = bytes_moved(_case(n, k, 1, RANK, BLOCKSIZE, True, dtype))
    return {"gemv": moved["fwd"], "gemv_t": moved["bwd"], "fused_fwd": moved["fwd"],
            "fused_fwdbwd": moved["fwd"] + moved["bwd"]}[call]


def _trace_call(fn) -> tuple[int, int, torch.Tensor | None]:
    """(start ns, end ns, the kernel's trace) of one call of fn."""
    t0 = time.monotonic_ns()
    fn()
    t1 = time.monotonic_ns()
    return t0, t1, nf4_native.last_trace()


def _trace_parts(t0: int, t1: int, tr: torch.Tensor, threads: int) -> dict[str, float]:
    """One whole call's time by part, in us, from its trace (nf4_native.TRACE_POINTS; clock times, and the
    main phase's CPU time per thread: its work with descheduled time left out)."""
    ran = tr[:threads, 1, 0] > 0  # the team the kernel used (small weights get fewer threads: nf4_native.threads_for)
    cpu = tr[:threads][ran][:, :, 1].double()
    tr = tr[:threads][ran][:, :, 0].double()
    entry, forked, phase1, barrier, done, joined = (tr[:, i] for i in range(6))
    # forward: phase 1 on the calling thread before the fork; backward: in the region, then a barrier
    serial = not bool((barrier > 0).all())
    start = forked if serial else barrier  # of the main phase
    parts = {"python before": (entry[0] - t0) / 1e3}
    if serial:
        parts |= {"phase 1": (phase1[0] - entry[0]) / 1e3, "fork": (forked.max() - phase1[0]) / 1e3}
    else:
        parts |= {"fork": (forked.max() - entry[0]) / 1e3, "phase 1": (phase1 - forked).max() / 1e3,
                  "phase 1 cpu max": (cpu[:, 2] - cpu[:, 1]).max() / 1e3, "barrier wait": (barrier - phase1).max() / 1e3}
    main_cpu = cpu[:, 4] - cpu[:, 1 if serial else 3]
    return parts | {"main": (done - start).median() / 1e3, "main cpu min": main_cpu.min() / 1e3,
                    "main cpu max": main_cpu.max() / 1e3, "finish spread": (done.max() - done.min()) / 1e3,
                    "join": (joined[0] - done.max()) / 1e3, "python after": (t1 - joined[0]) / 1e3,
                    "total": (t1 - t0) / 1e3}


def _trace(pool: list[NF4Weight], dtype: torch.dtype, lora: tuple, threads: int, rounds: int, label: str) -> None:
    """Where the whole fused_cpu call's time goes at this thread count (the --trace report)."""
    x, a, b = lora
    g = torch.ones(1, pool[0].shape[0], dtype=dtype)
    parts: dict[str, dict[str, list[float]]] = {"fwd": {}, "bwd": {}}
    floor: dict[str, list[float]] = {}
    for _ in range(rounds):
        for i, w in enumerate(pool):
            out = None

            def forward(w=w):
                nonlocal out
                out = nf4_lora_linear(x, w, a, b, SCALING)

            for name, fn in (("fwd", forward), ("bwd", lambda: torch.autograd.grad(out, (x, a, b), grad_outputs=g))):
                t0, t1, tr = _trace_call(fn)
                for part, us in _trace_parts(t0, t1, tr, threads).items():
                    parts[name].setdefault(part, []).append(us)
            for name, us in _eager_floor(pool[(i + 1) % len(pool)], x).items():  # the next weight streams
                floor.setdefault(name, []).append(us)
    for name, by_part in parts.items():
        cells = "  ".join(f"{part} {statistics.median(v):.0f}" for part, v in by_part.items())
        print(f"{label} {name}: {cells}  (us, medians)  load {_load()}", flush=True)
    cells = "  ".join(f"{name} {statistics.median(v):.0f}" for name, v in floor.items())
    print(f"{label} eager floor, right after a streamed weight: {cells}  (us, medians)", flush=True)


def _eager_floor(w: NF4Weight, x: torch.Tensor) -> dict[str, float]:
    """What one trivial eager autograd op (``x * 2``, and its backward) costs when the caches hold what a weight
    streamed through them left (the weight read by the bare GEMV first, as the traced call's own kernel does):
    the floor any per-op call pays before and after its kernel on this machine, to set the traced call's
    Python against."""
    nf4_native.gemv(x.detach(), *_gemv_weight(w))
    t0 = time.monotonic_ns()
    y = x * 2.0
    t1 = time.monotonic_ns()
    torch.autograd.grad(y, x, grad_outputs=torch.ones_like(y))
    t2 = time.monotonic_ns()
    return {"x * 2 fwd": (t1 - t0) / 1e3, "its bwd (with ones_like)": (t2 - t1) / 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x14336"], help="OUTxIN")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--calls", nargs="+", default=list(CALLS), choices=CALLS)
    parser.add_argument("--rounds", type=int, default=5, help="rounds over the whole pool (median reported)")
    parser.add_argument("--pool-mb", type=int, default=700, help="distinct weights per shape, in MB")
    parser.add_argument("--bw-mb", type=int, default=300, help="each of the two read-bandwidth buffers, in MB")
    parser.add_argument("--no-prefetch", action="store_true",
                        help="build the kernels without their software prefetch (NF4_PREFETCH=0), to compare")
    parser.add_argument("--no-steal", action="store_true",
                        help="build the forward with a static split of its row chunks (NF4_STEAL=0), to compare")
    parser.add_argument("--trace", action="store_true",
                        help="build with -DNF4_TRACE=1 and report where the whole fused call's time goes")
    parser.add_argument("--define", action="append", default=[], metavar="NAME=VALUE",
                        help="build the kernels with -DNAME=VALUE (repeatable): A/B a tuning macro of nf4_native.c")
    args = parser.parse_args()
    nf4_native.FLAGS.extend(f"-D{d}" for d in args.define)
    if args.no_prefetch:
        nf4_native.FLAGS.append("-DNF4_PREFETCH=0")  # before the first build: its own cached .so
    if args.no_steal:
        nf4_native.FLAGS.append("-DNF4_STEAL=0")
    if args.trace:
        nf4_native.FLAGS.append("-DNF4_TRACE=1")
    ok, why = nf4_native.status()
    if not ok:
        print(f"nf4_stream: native NF4 kernels unavailable: {why}", file=sys.stderr)
        return 2
    bw_a = torch.rand(args.bw_mb * 2**20 // 4)
    bw_b = torch.rand(bw_a.numel())
    variant = "".join(f" {name}" for flag, name in ((args.no_prefetch, "without prefetch"),
                                                      (args.no_steal, "without stealing"),
                                                      (args.trace, "with tracing")) if flag)
    variant += "".join(f" -D{d}" for d in args.define)
    print(f"native build: {nf4_native.isa()}{variant}; load average at start: {_load()}")
    if args.trace:
        print("where the whole fused call's time goes, per direction (us, medians over the pool and rounds; 'main cpu':"
              " CPU time of the main phase, fewest and most of the threads)")
    else:
        print("wall: elapsed time; cpu: CPU time per thread (descheduled time left out), for the call and for the"
              " read bandwidth alike")
        print(f"{'shape':<11} {'dt':<5} thr {'call':<13} {'wall ms':>8} {'[min-max]':>16} {'read GB/s':>9} "
              f"{'% floor':>8} {'cpu ms':>8} {'read GB/s':>9} {'% floor':>8}  load")
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        pool = _pool(n, k, args.pool_mb * 2**20)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for dt in args.dtypes:
                dtype = DTYPES[dt]
                gen = torch.Generator().manual_seed(1)
                x = torch.randn(1, k, generator=gen).to(dtype).requires_grad_()
                a = (torch.randn(RANK, k, generator=gen) / k**0.5).to(dtype).requires_grad_()
                b = (torch.randn(n, RANK, generator=gen) / RANK**0.5).to(dtype).requires_grad_()
                if args.trace:
                    _trace(pool, dtype, (x, a, b), threads, args.rounds, f"{shape} {dt} {threads} thr")
                    continue
                calls = [_calls(w, dtype, (x, a, b)) for w in pool]
                for name in args.calls:
                    for c in calls[:2]:  # warm-up: builds, allocator, OpenMP team
                        c[name]()
                    wall, cpu, bw_wall, bw_cpu = [], [], [], []
                    for _ in range(args.rounds):
                        bw = _read_gbps(bw_a, bw_b, threads)
                        bw_wall.append(bw[0])
                        bw_cpu.append(bw[1])
                        sec = _timed(lambda: [c[name]() for c in calls], threads)  # noqa: B023 (called here)
                        wall.append(sec[0] / len(calls))
                        cpu.append(sec[1] / len(calls))
                    nbytes = _floor_bytes(n, k, dt, name)

                    def share(times: list[float], bws: list[float]) -> tuple[float, float, float]:
                        sec, gbps = statistics.median(times), statistics.median(bws)
                        return sec * 1e3, gbps, 100 * nbytes / sec / 1e9 / gbps

                    (ms, bw, pct), (cms, cbw, cpct) = share(wall, bw_wall), share(cpu, bw_cpu)
                    print(f"{shape:<11} {dt:<5} {threads:>3} {name:<13} {ms:8.3f} "
                          f"[{min(wall) * 1e3:.3f}-{max(wall) * 1e3:.3f}] {bw:9.1f} {pct:7.1f}% "
                          f"{cms:8.3f} {cbw:9.1f} {cpct:7.1f}%  {_load()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
