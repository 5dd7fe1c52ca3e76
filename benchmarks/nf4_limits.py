"""NF4 at the physical limits (issue 18, items 1, 2, 4), reproduced by one command:

    python3 benchmarks/nf4_limits.py [--out runs/nf4-limits] [--runs 3] [--results results.json ...]

runs ``twinbench run quant_linear --profile bench --impl fused_cpu --impl bare_gemm`` ``--runs`` times (each
case at one thread and at all threads; ceilings measured in the worker at the case's thread count) and
prints, per case and timing mode, over the runs: our median time, its share of the read-bandwidth floor
(the 4-bit weight + scales read once per direction, at the measured read bandwidth; the copy-bandwidth
share beside it) and, at batch 512, our time over the bare GEMMs on already-dequantised weights, as the
median of per-round ratios (both timed in the same rounds). The load average is printed before and after;
numbers taken on a loaded machine are not results (docs/quant_linear.md, "Benchmark"). ``--results``
summarises existing results.json files instead of running.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

COMMAND = ["-m", "twinbench", "run", "quant_linear", "--profile", "bench", "--device", "cpu",
           "--impl", "fused_cpu", "--impl", "bare_gemm", "--no-report"]


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _rows(docs: list[dict]) -> dict[tuple, dict[str, list[float]]]:
    """(case, mode) -> lists over runs of our median ms, % of the read and copy floors, ratio to bare_gemm."""
    rows: dict[tuple, dict[str, list[float]]] = {}
    for doc in docs:
        by_case: dict[str, dict[str, dict]] = {}
        for rec in doc["results"]:
            by_case.setdefault(rec["case"], {})[rec["impl"]] = rec
        for case, recs in by_case.items():
            ours, bare = recs.get("fused_cpu"), recs.get("bare_gemm")
            if not ours or not ours.get("timing"):
                continue
            for mode in ("fwd", "fwdbwd"):
                stats = ours["timing"].get(mode)
                if not stats:
                    continue
                row = rows.setdefault((case, mode), {"ms": [], "read": [], "copy": [], "vs_bare": [],
                                                     "read_gbps": [], "threads": []})
                derived = ours.get("derived") or {}
                row["ms"].append(stats["median_ms"])
                row["read"].append(derived.get(f"{mode}_pct_read_bw") or float("nan"))
                row["copy"].append(derived.get(f"{mode}_pct_peak_bw") or float("nan"))
                row["read_gbps"].append(derived.get("ceiling_read_gbps") or float("nan"))
                row["threads"].append(derived.get("ceiling_threads") or float("nan"))
                bare_stats = ((bare or {}).get("timing") or {}).get(mode)
                if bare_stats:  # same rounds, same order of samples: per-round ratios
                    ratios = [o / b for o, b in zip(stats["samples_ms"], bare_stats["samples_ms"]) if b > 0]
                    row["vs_bare"].append(statistics.median(ratios))
    return rows


def _spread(values: list[float], fmt: str) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "-"
    mid = statistics.median(values)
    return f"{mid:{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]" if len(values) > 1 else f"{mid:{fmt}}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/nf4-limits", help="folder for the runs' results")
    parser.add_argument("--runs", type=int, default=3, help="independent runs (issue 18 asks for >= 3)")
    parser.add_argument("--results", nargs="*", help="summarise these results.json files instead of running")
    args = parser.parse_args()
    print(f"load average before: {_load()}")
    paths = [Path(p) for p in args.results or []]
    if not paths:
        for i in range(args.runs):
            out = Path(args.out) / f"run{i + 1}"
            done = subprocess.run([sys.executable, *COMMAND, "--out", str(out)])
            if done.returncode not in (0, 1):  # 1: some record not ok, still a result to read
                print(f"run {i + 1} failed (exit {done.returncode})", file=sys.stderr)
                return 2
            paths.append(out / "results.json")
    docs = [json.loads(p.read_text()) for p in paths]
    print(f"load average after: {_load()}   ({len(docs)} run(s); median [min-max] over runs)")
    print(f"{'case':<78} {'mode':<7} {'ours ms':>22} {'% read floor':>20} {'% copy floor':>20} "
          f"{'ours/bare':>22} {'read GB/s':>18} thr")
    for (case, mode), row in sorted(_rows(docs).items()):
        short = case.replace("rank=16,blocksize=64,double_quant=true,", "").replace(",bias=false", "")
        print(f"{short:<78} {mode:<7} {_spread(row['ms'], '.3f'):>22} {_spread(row['read'], '.1f'):>20} "
              f"{_spread(row['copy'], '.1f'):>20} {_spread(row['vs_bare'], '.3f'):>22} "
              f"{_spread(row['read_gbps'], '.1f'):>18} {_spread(row['threads'], '.0f')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
