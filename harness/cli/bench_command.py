"""`twinbench bench EXPERIMENT`: a training loop's benchmark, run in this process (not a test, no verdict).

``twinbench bench qlora``: the reference and patched QLoRA loops from one checkpoint, stepped in lockstep;
prints JSON (step-time ratio, per-step peak memory and live tensors, loss difference; ``impls/qlora/bench.py``).
"""

from __future__ import annotations

import json

from twinbench.harness.cli import arguments
from twinbench.harness.core.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser("bench", help="a training loop's side-by-side benchmark (JSON on stdout)")
    experiments = p.add_subparsers(dest="experiment", required=True)
    q = experiments.add_parser("qlora", help="reference and patched QLoRA loops in lockstep")
    q.add_argument("--kind", default="llama", choices=["llama", "qwen3_moe"])
    q.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    q.add_argument("--seq-len", type=arguments.positive_int, default=64)
    q.add_argument("--steps", type=arguments.positive_int, default=20)
    q.add_argument("--device", default="cpu", help="torch device the loops run on (default cpu)")
    q.add_argument("--checkpointing", action="store_true", help="keep layer checkpointing when patched")
    q.add_argument("--keep-expert-activations", action="store_true",
                   help="MoE: save the experts' activations instead of recomputing them in backward")
    q.add_argument("--mmap-threshold", type=arguments.positive_int, default=None, metavar="BYTES",
                   help="fix glibc's mmap threshold (e.g. 65536): per-step RSS then closer to live memory")
    q.add_argument("--recompute", default=None, metavar="BLOCKS",
                   help="sub-blocks the patched loop rebuilds in backward, comma-separated: attn, dense_mlp, mlp "
                        "('' none; default: patch_model's, attn,dense_mlp)")
    q.set_defaults(handler=cmd_bench_qlora)


def cmd_bench_qlora(args) -> int:
    from twinbench.harness.core.case import Case
    from twinbench.impls.qlora.bench import MIN_STEPS, bench
    from twinbench.impls.qlora.recompute import BLOCKS
    from twinbench.suites.qlora import loop_config, loop_meters

    recompute = None if args.recompute is None else tuple(b for b in args.recompute.split(",") if b)
    unknown = [b for b in recompute or () if b not in BLOCKS]
    if unknown:
        raise UsageError(f"--recompute {args.recompute}: unknown blocks {unknown}; choose from {BLOCKS}")
    if args.steps < MIN_STEPS:
        raise UsageError(f"--steps {args.steps}: the bench needs at least {MIN_STEPS} "
                         "(warm-up, memory-measured, timed)")
    case = Case.of(kind=args.kind, dtype=args.dtype, steps=args.steps, seq_len=args.seq_len, batch=4, accum=2)
    result = bench(loop_config(case, seed=0), loop_meters(args.device), args.device,
                   checkpointing=args.checkpointing, recompute_experts=not args.keep_expert_activations,
                   mmap_threshold=args.mmap_threshold, recompute=recompute)
    print(json.dumps(result, indent=1))
    return 0
