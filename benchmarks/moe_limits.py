"""SparseMoE FFN against the machine's limits (issue 18, item 3), reproduced by one command:

    python3 benchmarks/moe_limits.py [--shape bench --shape qwen3] [--dtype fp32 --dtype bf16] \
        [--threads 1 --threads all] [--rounds 5]

Per (shape, dtype, thread count), in one process and interleaved round by round (the order rotates), the
forward + backward of:
- ``sorted`` (ours) and ``hf_grouped_mm`` (transformers' grouped_mm experts), called as the harness calls them;
- ``bare_bmm``: only the six GEMMs of fwd+bwd (gate_up, down; their input and weight gradients) on
  equal-size per-expert stacks (S/E rows each) with ``torch.bmm`` — no routing, gather, scatter or SwiGLU;
- ``bare_loop``: the same six GEMMs per expert with our CPU threading (experts split over the threads, each
  GEMM single-threaded) — the bound of our strategy;
- the plain matmul ceiling (``measure_ceilings``: best square size, at this thread count).
It prints the median ms, GFLOP/s (the suite's own FLOP count, the same for all four), the share of the plain
matmul ceiling and of the best bare-GEMM bound, and the per-round HF / ours speedup with its range. The load
average is printed before and after: numbers taken on a loaded machine are not results (docs/moe.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

SHAPES = {"bench": dict(seq=512, hidden=1024, experts=64, inter=384),        # issue 4's CPU benchmark
          "qwen3": dict(seq=2048, hidden=2048, experts=128, inter=768)}      # a Qwen3-30B-A3B layer


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _fwdbwd(impl, tensors):
    def call():
        leaves = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in tensors.items()}
        out = impl(**leaves)
        out.backward(torch.ones_like(out))
    return call


def _bare(case, dtype, loop: bool):
    """The six GEMMs of fwd+bwd over E equal row blocks of S/E rows (S = tokens x top-k)."""
    from twinbench.impls.moe_ffn.sorted_experts import _for_each_block

    e, h, i = case["experts"], case["hidden"], case["inter"]
    rows = case["seq"] * case["top_k"] // e
    a, wgu, wd = torch.randn(e, rows, h, dtype=dtype), torch.randn(e, 2 * i, h, dtype=dtype), torch.randn(e, h, i, dtype=dtype)
    hh, act, g = torch.empty(e, rows, 2 * i, dtype=dtype), torch.randn(e, rows, i, dtype=dtype), torch.randn(e, rows, h, dtype=dtype)
    y, ga, gx = torch.empty(e, rows, h, dtype=dtype), torch.empty(e, rows, i, dtype=dtype), torch.empty(e, rows, h, dtype=dtype)
    gh = torch.randn(e, rows, 2 * i, dtype=dtype)
    dwgu, dwd = torch.empty_like(wgu), torch.empty_like(wd)

    def one(x):
        torch.mm(a[x], wgu[x].t(), out=hh[x])
        torch.mm(act[x], wd[x].t(), out=y[x])
        torch.mm(g[x].t(), act[x], out=dwd[x])
        torch.mm(g[x], wd[x], out=ga[x])
        torch.mm(gh[x].t(), a[x], out=dwgu[x])
        torch.mm(gh[x], wgu[x], out=gx[x])

    if loop:
        blocks = [(x, x * rows, (x + 1) * rows) for x in range(e)]
        flops = 18.0 * e * rows * h * i
        return lambda: _for_each_block(lambda x, s, t: one(x), blocks, torch.device("cpu"), flops)

    def batched():
        torch.bmm(a, wgu.transpose(1, 2), out=hh)
        torch.bmm(act, wd.transpose(1, 2), out=y)
        torch.bmm(g.transpose(1, 2), act, out=dwd)
        torch.bmm(g, wd, out=ga)
        torch.bmm(gh.transpose(1, 2), a, out=dwgu)
        torch.bmm(gh, wgu, out=gx)
    return batched


def run(shape: str, dtype_name: str, threads: int, rounds: int) -> None:
    from twinbench.harness.core import devices
    from twinbench.harness.core.case import Case, torch_dtype
    from twinbench.harness.core.registry import IMPLS, SUITES, load_plugins
    from twinbench.harness.core.timing import measure_ceilings

    load_plugins()
    torch.set_num_threads(threads)
    suite = SUITES["moe_ffn"]
    case = Case.of(batch=1, top_k=8, routing="balanced", dtype=dtype_name, **SHAPES[shape])
    tensors = suite.make_inputs(case, torch.device("cpu"), 0).tensors
    fns = {"sorted": _fwdbwd(IMPLS[("moe_ffn", "sorted")].fn, tensors)}
    ok, why = IMPLS[("moe_ffn", "hf_grouped_mm")].can_run(case, devices.find("cpu"))
    if ok:
        fns["hf_grouped_mm"] = _fwdbwd(IMPLS[("moe_ffn", "hf_grouped_mm")].fn, tensors)
    fns["bare_bmm"] = _bare(case, torch_dtype(dtype_name), loop=False)
    fns["bare_loop"] = _bare(case, torch_dtype(dtype_name), loop=True)
    ceiling = measure_ceilings(devices.find("cpu"), dtypes=(dtype_name,))["matmul_tflops"].get(dtype_name)
    for fn in fns.values():
        fn()  # warm-up: allocator, first-call dispatch
    ms: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            ms[name].append((time.perf_counter() - start) * 1e3)
    flops = sum(suite.flops(case).values())
    best_bare = min(statistics.median(ms["bare_bmm"]), statistics.median(ms["bare_loop"]))
    print(f"\n{shape} {dtype_name}, {threads} thread(s), {flops / 1e9:.1f} GFLOP fwd+bwd, matmul ceiling "
          f"{(ceiling or 0) * 1e3:.0f} GFLOP/s, load {_load()}" + ("" if ok else f" (hf_grouped_mm: {why})"))
    for name in names:
        med = statistics.median(ms[name])
        gflops = flops / med / 1e6
        share = f"{gflops / (ceiling * 1e3):6.0%}" if ceiling else "     -"
        print(f"  {name:<14} {med:9.1f} ms  {gflops:7.1f} GFLOP/s  {share} of matmul  "
              f"{best_bare / med:6.0%} of the bare-GEMM bound")
    if "hf_grouped_mm" in ms:
        speedups = sorted(h / o for h, o in zip(ms["hf_grouped_mm"], ms["sorted"]))
        print(f"  hf_grouped_mm / sorted per round: median {statistics.median(speedups):.2f}x "
              f"(range {speedups[0]:.2f}-{speedups[-1]:.2f}, {rounds} rounds)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", action="append", choices=sorted(SHAPES), default=None)
    p.add_argument("--dtype", action="append", choices=("fp32", "bf16"), default=None)
    p.add_argument("--threads", action="append", default=None, help="a count or 'all' (repeatable)")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    every = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = [every if t == "all" else int(t) for t in (args.threads or ["1", "all"])]
    print(f"load average before: {_load()}")
    for shape in args.shape or ["bench", "qwen3"]:
        for dtype in args.dtype or ["fp32", "bf16"]:
            for t in dict.fromkeys(threads):
                run(shape, dtype, t, args.rounds)
    print(f"\nload average after: {_load()}")


if __name__ == "__main__":
    main()
