"""`twinbench bench EXPERIMENT`: a training loop's benchmark, run in this process (not a test).

``twinbench bench qlora``: the reference and patched QLoRA loops from one checkpoint, stepped in lockstep;
prints JSON (per case: step-time ratio, per-step peak memory and live tensors, both loss curves, the probe,
the per-op time breakdown of both loops, and the checks against the targets; ``impls/qlora/bench.py``,
``suites/qlora.py: BENCH_PROFILES, bench_checks``). Exit 1 when a gating check fails (the loss trajectory,
the probe); the performance targets are reported, not gated (they depend on the machine and its load).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from twinbench.harness.cli import arguments
from twinbench.harness.core.errors import UsageError


def register(sub) -> None:
    from twinbench.reference.qlora.config import MODEL_SIZES
    from twinbench.suites.qlora import BENCH_PROFILES

    p = sub.add_parser("bench", help="a training loop's side-by-side benchmark (JSON on stdout)")
    experiments = p.add_subparsers(dest="experiment", required=True)
    q = experiments.add_parser("qlora", help="reference and patched QLoRA loops in lockstep")
    q.add_argument("--profile", choices=sorted(BENCH_PROFILES), default=None,
                   help="run the profile's cases (bench: ~100M-parameter llama and qwen3_moe at seq 512); "
                        "the flags below override its fields")
    q.add_argument("--kind", default=None, choices=["llama", "qwen3_moe"], help="default llama (a profile: all)")
    q.add_argument("--size", default=None, choices=["tiny", *sorted(MODEL_SIZES)], help="model size (default tiny)")
    q.add_argument("--dtype", default=None, choices=["fp32", "bf16"])
    q.add_argument("--seq-len", type=arguments.positive_int, default=None)
    q.add_argument("--batch", type=arguments.positive_int, default=None, help="rows per micro-batch")
    q.add_argument("--accum", type=arguments.positive_int, default=None, help="micro-batches per step")
    q.add_argument("--steps", type=arguments.positive_int, default=None)
    q.add_argument("--threads", type=arguments.positive_int, default=None,
                   help="CPU threads of both loops (default 1; a profile of 100M models: all cores)")
    q.add_argument("--device", default="cpu", help="torch device the loops run on (default cpu)")
    q.add_argument("--checkpointing", action="store_true", help="keep layer checkpointing when patched")
    q.add_argument("--keep-expert-activations", action="store_true",
                   help="MoE: save the experts' activations instead of recomputing them in backward")
    q.add_argument("--mmap-threshold", type=arguments.positive_int, default=None, metavar="BYTES",
                   help="fix glibc's mmap threshold (e.g. 65536): per-step RSS then closer to live memory")
    q.add_argument("--recompute", default=None, metavar="BLOCKS",
                   help="sub-blocks the patched loop rebuilds in backward, comma-separated: attn, dense_mlp, mlp, "
                        "attn_out ('' none; default: the profile case's, else patch_model's attn,dense_mlp)")
    q.set_defaults(handler=cmd_bench_qlora)


def bench_cases(args) -> list:
    """The cases the flags select: a profile's (``--kind`` filters), or one case; set flags override fields."""
    from twinbench.suites.qlora import BENCH_PROFILES, BenchCase

    cases = list(BENCH_PROFILES[args.profile]) if args.profile else [BenchCase()]
    if args.profile and args.kind:
        cases = [c for c in cases if c.kind == args.kind]
    fields = {"kind": args.kind, "size": args.size, "dtype": args.dtype, "seq_len": args.seq_len,
              "batch": args.batch, "accum": args.accum, "steps": args.steps}
    return [dataclasses.replace(c, **{k: v for k, v in fields.items() if v is not None}) for c in cases]


def cmd_bench_qlora(args) -> int:
    from twinbench.impls.qlora.bench import MIN_STEPS, bench
    from twinbench.impls.qlora.recompute import BLOCKS
    from twinbench.suites.qlora import bench_checks, bench_config, loop_meters

    recompute = None if args.recompute is None else tuple(b for b in args.recompute.split(",") if b)
    unknown = [b for b in recompute or () if b not in BLOCKS]
    if unknown:
        raise UsageError(f"--recompute {args.recompute}: unknown blocks {unknown}; choose from {BLOCKS}")
    cases = bench_cases(args)
    if any(c.steps < MIN_STEPS for c in cases):
        raise UsageError(f"--steps {args.steps}: the bench needs at least {MIN_STEPS} "
                         "(warm-up, memory-measured, timed)")
    runs = []
    for case in cases:
        cfg = bench_config(case)
        # one thread: the tiny ops lose to OpenMP overhead; 100M-parameter GEMMs use every core
        threads = args.threads or (1 if case.size == "tiny" else os.cpu_count() or 1)
        cfg = dataclasses.replace(cfg, cpu_threads=threads)
        result = bench(cfg, loop_meters(args.device), args.device, checkpointing=args.checkpointing,
                       recompute_experts=not args.keep_expert_activations, mmap_threshold=args.mmap_threshold,
                       recompute=case.recompute if recompute is None else recompute)
        checks = bench_checks(case, result)
        runs.append({"bench_case": dataclasses.asdict(case), "cpu_threads": threads,
                     "load_average": list(os.getloadavg()), **result,
                     "checks": {n: dataclasses.asdict(c) for n, c in checks.items()}})
    print(json.dumps(runs if args.profile else runs[0], indent=1, allow_nan=False))
    failed = [f"{r['bench_case']['kind']}/{n}" for r in runs for n, c in r["checks"].items()
              if c["gates"] and not c["ok"]]
    if failed:
        print(f"twinbench bench qlora: failed {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
