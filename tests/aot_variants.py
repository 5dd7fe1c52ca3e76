"""Every Triton kernel of the built-in impls, in every configuration its launcher or autotuner may choose,
as ahead-of-time compile variants (impls/kernels/aot.py). ``ci_subset`` picks the few that CI compiles;
``nox -s aot`` compiles them all."""

from __future__ import annotations

import itertools

from twinbench.impls.kernels import aot
from twinbench.impls.kernels.aot import Target, Variant

DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
ELEMENT_SIZE = {"fp32": 4, "fp16": 2, "bf16": 2}


def signature(fn, pointers: dict[str, str], floats: tuple[str, ...] = ()) -> dict[str, str]:
    """Triton signature: constexprs by the kernel's own declaration, pointers by ``pointers``, floats named,
    every other scalar a 32-bit integer (strides and sizes of tensors below 2**31 elements)."""
    sig = {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + pointers[name]
        else:
            sig[name] = "fp32" if name in floats else "i32"
    return sig


def _without_unknown(fn, constexprs: dict) -> dict:
    names = {p.name for p in fn.params}
    return {k: v for k, v in constexprs.items() if k in names}


FA_KERNELS = {"fa_fwd": "fwd", "fa_bwd_dkdv": "dkdv", "fa_bwd_dq": "dq"}


def fa_limits(target: Target):
    """The limits the FA autotuner prunes by, for an AOT target (the same function a GPU launch uses)."""
    from twinbench.impls.attention import triton_fa_kernels as fa

    return fa.TileLimits(target.shared_limit, amd=target.backend == "hip",
                         spills_large_fp32=fa.spills_large_fp32(str(target.arch)))


def attention_variants(target: Target) -> list[Variant]:
    """Per dtype and head-dim block, exactly the configs the FA autotuner keeps on ``target``."""
    from twinbench.impls.attention import triton_fa_kernels as fa

    out = []
    kernels = {"fa_fwd": (fa._fwd_kernel, ("Q", "K", "V", "Out"), ("LSE",)),
               "fa_bwd_dkdv": (fa._bwd_dkdv_kernel, ("Q", "K", "V", "DO", "DK", "DV"), ("LSE", "DELTA")),
               "fa_bwd_dq": (fa._bwd_dq_kernel, ("Q", "K", "V", "DO", "DQ"), ("LSE", "DELTA"))}
    limits = fa_limits(target)
    for dtype, block_d in itertools.product(DTYPES, (64, 128, 256)):
        precision = "ieee" if dtype == "fp32" else None
        elem = ELEMENT_SIZE[dtype]
        for name, (fn, io, fp32_ptrs) in kernels.items():
            pointers = {p: dtype for p in io} | {p: "fp32" for p in fp32_ptrs}
            sig = signature(fn, pointers, floats=("qk_scale", "sm_scale"))
            for config in fa.keep_configs(fa.gpu_configs(), FA_KERNELS[name], block_d, elem, limits):
                m, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
                consts = _without_unknown(fn, {"CAUSAL": True, "PRECISION": precision, "BLOCK_D": block_d,
                                               **config.kwargs})
                out.append(Variant(name, fn, sig, consts, config.num_warps, config.num_stages, fp32=dtype == "fp32",
                                   estimated_shared=fa.shared_estimate(FA_KERNELS[name], m, n, block_d, elem,
                                                                       config.num_stages, limits.amd),
                                   note=f"{dtype} head_dim<={block_d}"))
        delta = fa._bwd_delta_kernel
        out.append(Variant("fa_bwd_delta", delta, signature(delta, {"Out": dtype, "DO": dtype, "DELTA": "fp32"}),
                           {"BLOCK_M": 64, "BLOCK_D": block_d}, fp32=dtype == "fp32", note=f"{dtype} head_dim<={block_d}"))
    return out


def kept_counts(targets=None) -> dict[str, dict[str, dict[str, int]]]:
    """{target: {"fp16 D128": {"fwd": n, "dkdv": n, "dq": n, "before": n}}}: configs the FA autotuner keeps per
    target and kernel, against the old single 64 KiB estimate ("before", the same for every target)."""
    from twinbench.impls.attention import triton_fa_kernels as fa

    def old_rule(elem, block_d):  # the rule before per-target limits: (M + 2N) * D * elem * stages <= 64 KiB
        fit = [c for c in fa.gpu_configs() if (c.kwargs["BLOCK_M"] + 2 * c.kwargs["BLOCK_N"]) * block_d * elem
               * max(c.num_stages, 1) <= 64 * 1024]
        return len(fit) or 1  # none fitting: it kept the smallest

    out = {}
    for name in targets or TARGET_ORDER:
        limits = fa_limits(aot.TARGETS[name])
        out[name] = {f"{dtype} D{d}": {**{k: len(fa.keep_configs(fa.gpu_configs(), k, d, elem, limits))
                                          for k in fa.SHARED_ROWS}, "before": old_rule(elem, d)}
                     for (dtype, elem), d in itertools.product((("fp16", 2), ("fp32", 4)), (64, 128, 256))}
    return out


def moe_variants() -> list[Variant]:
    from twinbench.impls.moe_ffn import triton_grouped as moe

    _, rows_gemm, weight_grad_gemm = moe._kernels()
    blocks = {"BLOCK_M": moe.BLOCK_M, "BLOCK_N": moe.BLOCK_N, "BLOCK_K": moe.BLOCK_K}
    out = []
    for dtype in DTYPES:
        ids = {"tile_expert_ptr": "i32", "tile_start_ptr": "i32", "tile_end_ptr": "i32"}
        out.append(Variant("moe_rows_gemm", rows_gemm,
                           signature(rows_gemm, {"a_ptr": dtype, "w_ptr": dtype, "out_ptr": dtype} | ids),
                           _without_unknown(rows_gemm, dict(blocks, PRECISION="ieee" if dtype == "fp32" else None)),
                           fp32=dtype == "fp32", note=dtype))
        out.append(Variant("moe_weight_grad_gemm", weight_grad_gemm,
                           signature(weight_grad_gemm, {"g_ptr": dtype, "a_ptr": dtype, "grad_ptr": dtype,
                                                        "starts_ptr": "i32", "ends_ptr": "i32"}),
                           _without_unknown(weight_grad_gemm, dict(blocks, PRECISION="ieee" if dtype == "fp32" else None)),
                           fp32=dtype == "fp32", note=dtype))
    return out


def gating_variants() -> list[Variant]:
    from twinbench.impls.gating import triton_router

    _, kernel = triton_router._kernel()
    out = []
    for dtype, (experts, top_k) in itertools.product(DTYPES, ((8, 2), (128, 8))):
        sig = signature(kernel, {"logits_ptr": dtype, "weights_ptr": "fp32", "ids_ptr": "i64", "lse_ptr": "fp32"})
        out.append(Variant("gating_topk_softmax", kernel, sig,
                           {"TOP_K": top_k, "BLOCK_E": experts, "BLOCK_K": max(top_k, 2), "RENORM": True},
                           fp32=dtype == "fp32", note=f"{dtype} experts={experts} top_k={top_k}"))
    return out


def nf4_variants() -> list[Variant]:
    from twinbench.impls.kernels import nf4_triton as k
    from twinbench.impls.quant_linear import triton_nf4

    gemv_tiles, gemm_tiles = triton_nf4.GPU_TILES["gemv"], triton_nf4.GPU_TILES["gemm"]
    out = []
    for dtype, lora in itertools.product(DTYPES, (True, False)):
        lora_ptrs = {"xa_ptr": dtype, "b_ptr": dtype, "gb_ptr": dtype, "a_ptr": dtype}
        for name in ("gemm_fwd", "gemm_bwd"):
            fn = getattr(k, name)
            io = {"x_ptr": dtype, "g_ptr": dtype, "out_ptr": dtype, "dx_ptr": dtype}
            sig = signature(fn, {"packed_ptr": "u8", "scales_ptr": "fp32"} | io | lora_ptrs, floats=("scaling",))
            consts = {"BS": 64, "HAS_LORA": lora, "RP": 16, "PRECISION": "ieee" if dtype == "fp32" else None,
                      "BM": gemm_tiles[0], "BN": gemm_tiles[1], "BK": gemm_tiles[2]}
            out.append(Variant(f"nf4_{name}", fn, sig, _without_unknown(fn, consts), fp32=dtype == "fp32",
                               note=f"{dtype} lora={lora}"))
        for name in ("gemv_fwd", "gemv_bwd"):
            fn = getattr(k, name)
            io = {"x_ptr": dtype, "g_ptr": dtype, "out_ptr": dtype, "dx_ptr": dtype}
            sig = signature(fn, {"packed_ptr": "u8", "scales_ptr": "fp32"} | io | lora_ptrs, floats=("scaling",))
            consts = {"BS": 64, "HAS_LORA": lora, "RP": 16, "BN": gemv_tiles[0], "BK": gemv_tiles[1]}
            out.append(Variant(f"nf4_{name}", fn, sig, _without_unknown(fn, consts), fp32=dtype == "fp32",
                               note=f"{dtype} lora={lora}"))
    return out


def lowp_variants(target: Target) -> list[Variant]:
    """Our FP8 and MXFP4 GEMMs (impls/kernels/fp8_gemm_triton.py, mxfp4_gemm_triton.py) as their launchers
    build them: the decode paths on every target (FNUZ on NVIDIA too), the native fp8 ``tl.dot`` in the formats
    ``target`` has (OCP on sm89+/gfx950/gfx12, FNUZ on gfx942), ``tl.dot_scaled`` where MX instructions exist
    (sm100, gfx950).
    Each kernel's first variant is its most demanding one (block scales, mixed formats), which the CI subset
    keeps."""
    from twinbench.harness.core.devices import Device, lowp_support
    from twinbench.impls.kernels import fp8_gemm_triton as fp8
    from twinbench.impls.kernels import mxfp4_gemm_triton as mx

    if target.backend == "cuda":
        device = Device(name="aot", backend="cuda", torch_device="cuda", model=target.name, arch=f"sm_{target.arch}",
                        extra={"capability": f"{int(target.arch) // 10}.{int(target.arch) % 10}"})
    else:
        device = Device(name="aot", backend="rocm", torch_device="cuda", model=target.name, arch=str(target.arch))
    native = {name for name in fp8.FP8_LAYOUTS if lowp_support(device, name).native}
    codes = {name: layout.code for name, layout in fp8.FP8_LAYOUTS.items()}
    bm, bn, bk = fp8.GPU_TILES
    launch = fp8.GPU_LAUNCH
    out = []
    gemm = fp8.fp8_gemm_kernel
    sig = signature(gemm, {"x_ptr": "u8", "w_ptr": "u8", "sx_ptr": "fp32", "sw_ptr": "fp32", "y_ptr": "bf16"})
    pairs = [("e5m2", "e4m3"), ("e4m3", "e4m3"), ("e5m2fnuz", "e4m3fnuz"), ("e4m3fnuz", "e4m3fnuz")]
    for (x_fmt, w_fmt), scaling in itertools.product(pairs, (fp8.Scaling.BLOCK, fp8.Scaling.ROW, fp8.Scaling.TENSOR)):
        for is_native in (False, True):
            if is_native and not {x_fmt, w_fmt} <= native:
                continue
            consts = {"X_FMT": codes[x_fmt], "W_FMT": codes[w_fmt], "SCALING": fp8.SCALING_CODES[scaling],
                      "NATIVE": is_native, "BM": bm, "BN": bn, "BK": bk}
            out.append(Variant("fp8_gemm_native" if is_native else "fp8_gemm_decode", gemm, sig, consts, **launch,
                               note=f"{x_fmt} x {w_fmt} {scaling.value}"))
    fused = fp8.fp8_rowwise_quant_gemm_kernel
    # the target's native format first: the CI subset keeps each kernel's first variant
    for dtype, fmt in itertools.product(("bf16", "fp32"), sorted(("e4m3", "e4m3fnuz"), key=lambda f: f not in native)):
        sig = signature(fused, {"x_ptr": dtype, "w_ptr": "u8", "sw_ptr": "fp32", "y_ptr": dtype, "xq_ptr": "u8",
                                "sx_ptr": "fp32"})
        for is_native in (True, False):  # the CI subset keeps the first: native where the target has it
            if is_native and fmt not in native:
                continue
            consts = {"X_FMT": codes[fmt], "W_FMT": codes[fmt], "FMT_MAX": fp8.FP8_LAYOUTS[fmt].max,
                      "WRITE_Q": False, "NATIVE": is_native, "BM": bm, "BN": bn, "BK": bk}
            out.append(Variant("fp8_rowwise_quant_gemm", fused, sig, consts, **launch,
                               note=f"{dtype} {fmt} {'native' if is_native else 'decode'}"))
    mxk = mx.mxfp4_gemm_kernel
    dot_scaled = lowp_support(device, "mxfp4").native
    # (x pointer dtype, X_KIND, DOT_BF16): fp32 first (the TF32 check of the decode path's fp32 dot), then
    # MXFP4 activations (what triton_mxfp4_* on mx_linear launch: the CI subset's dot_scaled build), bf16, MXFP8
    kinds = [("fp32", 0, False), ("u8", 5, True), ("bf16", 4, True), ("u8", 1, True)]
    for x_dtype, kind, dot_bf16 in kinds:
        mx_x = kind in (1, 5)
        sig = signature(mxk, {"x_ptr": x_dtype, "xs_ptr": "u8" if mx_x else x_dtype, "w_ptr": "u8",
                              "ws_ptr": "u8", "y_ptr": "fp32" if kind == 0 or mx_x else x_dtype})
        for scaled in (False, True):
            if scaled and (not dot_scaled or kind == 0):
                continue
            (bm, bn, bk), options = mx.gpu_config(mx.MxPath.DOT_SCALED if scaled else mx.MxPath.DECODE, dot_bf16)
            consts = {"X_KIND": kind, "DOT_SCALED": scaled, "DOT_BF16": dot_bf16, "BM": bm, "BN": bn, "BK": bk}
            out.append(Variant("mxfp4_gemm_dot_scaled" if scaled else "mxfp4_gemm_decode", mxk, sig, consts,
                               **options, fp32=kind == 0, note=f"x {x_dtype} kind={kind}"))
    return out


def all_variants(target: Target) -> list[Variant]:
    """Every variant compiled for ``target`` (the FA configs depend on its limits; the others do not)."""
    return (attention_variants(target) + moe_variants() + gating_variants() + nf4_variants()
            + lowp_variants(target))


def _tile_size(v: Variant) -> int:
    return sum(x for k, x in v.constexprs.items() if k.startswith("BLOCK") or k in ("BM", "BN", "BK")) * max(v.num_stages, 1)


def ci_subset(variants: list[Variant]) -> list[Variant]:
    """Per kernel, its fp32 build (the TF32/XF32 check; a kernel without one, e.g. an fp8 dot: its first
    build) with the largest tiles the autotuner keeps (the most shared memory and registers), at head_dim 64
    where the kernel has one: every kernel on every CI target in about two minutes. The full sweep (all
    dtypes, head dims and configs) is ``nox -s aot``."""
    chosen: dict[str, Variant] = {}
    for v in variants:
        if ("head_dim" in v.note and "<=64" not in v.note) or "lora=False" in v.note:
            continue
        if v.kernel not in chosen or (v.fp32, _tile_size(v)) > (chosen[v.kernel].fp32, _tile_size(chosen[v.kernel])):
            chosen[v.kernel] = v
    return list(chosen.values())


def planted_variants() -> list[Variant]:
    """Kernels built to fail the checks (so the checks can fail): an fp32 tl.dot left at the backend's default
    precision (TF32 on NVIDIA) or asking for tf32 (XF32 on CDNA3), the same with "ieee" (passes), and a tile
    whose operands need more shared memory than a 64 KiB LDS."""
    import triton
    import triton.language as tl

    @triton.jit
    def planted_dot(a_ptr, b_ptr, c_ptr, PRECISION: tl.constexpr):
        offs = tl.arange(0, 32)
        a = tl.load(a_ptr + offs[:, None] * 32 + offs[None, :])
        b = tl.load(b_ptr + offs[:, None] * 32 + offs[None, :])
        tl.store(c_ptr + offs[:, None] * 32 + offs[None, :], tl.dot(a, b, input_precision=PRECISION))

    @triton.jit
    def planted_big_tile(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
        rows = tl.arange(0, BLOCK)
        cols = tl.arange(0, 256)
        acc = tl.zeros((BLOCK, 256), dtype=tl.float32)
        for k0 in range(0, 1024, 256):
            a = tl.load(a_ptr + rows[:, None] * 1024 + k0 + cols[None, :])
            b = tl.load(b_ptr + (k0 + cols[:, None]) * 256 + cols[None, :])
            acc += tl.dot(a, b)
        tl.store(c_ptr + rows[:, None] * 256 + cols[None, :], acc)

    dot_sig = {"a_ptr": "*fp32", "b_ptr": "*fp32", "c_ptr": "*fp32", "PRECISION": "constexpr"}
    big_sig = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "BLOCK": "constexpr"}
    return [Variant("planted_default_precision", planted_dot, dot_sig, {"PRECISION": None}, fp32=True),
            Variant("planted_tf32", planted_dot, dot_sig, {"PRECISION": "tf32"}, fp32=True),
            Variant("planted_ieee", planted_dot, dot_sig, {"PRECISION": "ieee"}, fp32=True),
            Variant("planted_big_tile", planted_big_tile, big_sig, {"BLOCK": 128}, num_stages=3)]


def compile_for_target(target: str, which: str = "ci") -> list[dict]:
    """Reports (JSON) for one target, ``which`` = ci | full | planted. Run in a fresh process: the kernels
    must be defined with the interpreter off (the tests turn it on for everything else)."""
    import os

    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated (silences its warning)
    from twinbench.impls.kernels import aot

    if which == "planted":
        chosen = planted_variants()
    else:
        variants = all_variants(aot.TARGETS[target])
        chosen = variants if which == "full" else ci_subset(variants)
    return [r.to_json() | {"note": v.note} for v, r in zip(chosen, aot.sweep(chosen, [aot.TARGETS[target]]))]


def compile_in_processes(targets, which: str = "ci", jobs: int = 2) -> list[dict]:
    """``compile_for_target`` for each target, ``jobs`` spawned processes at a time."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return [r for rs in pool.map(compile_for_target, targets, [which] * len(targets)) for r in rs]


def table(reports: list[dict]) -> str:
    """Markdown: kernel x target -> compiles, worst shared memory, most registers and spills (NVIDIA: stack
    bytes per thread, where ptxas spills; AMD: spilled registers)."""
    targets = sorted({r["target"] for r in reports}, key=lambda n: list(TARGET_ORDER).index(n))
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in reports:
        cells.setdefault((r["kernel"], r["target"]), []).append(r)
    lines = ["| kernel | " + " | ".join(targets) + " |", "|---" * (len(targets) + 1) + "|"]
    for kernel in dict.fromkeys(r["kernel"] for r in reports):
        row = []
        for target in targets:
            got = cells.get((kernel, target), [])
            bad = sum(not r["ok"] for r in got)
            shared = max((r["shared_bytes"] for r in got), default=0)
            spills = max((r["spills"] or 0 for r in got), default=0)
            regs = max((r["registers"] or 0 for r in got), default=0)
            spill_unit = "B stack" if target.startswith("sm") else "spilled regs"
            row.append(f"{len(got) - bad}/{len(got)} ok, {shared / 1024:.0f} KiB, {regs} regs, {spills} {spill_unit}")
        lines.append(f"| {kernel} | " + " | ".join(row) + " |")
    return "\n".join(lines)


TARGET_ORDER = ("sm80", "sm89", "sm90", "sm100", "gfx942", "gfx950", "gfx1201")


def main(argv: list[str] | None = None) -> int:
    """``python tests/aot_variants.py [--full] [--out aot.json] [TARGET ...]``: compile, print the table,
    exit 1 when any variant fails a check."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("targets", nargs="*", default=list(TARGET_ORDER))
    parser.add_argument("--full", action="store_true", help="every variant (default: the CI subset)")
    parser.add_argument("--out", default=None, help="write every report as JSON here")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    reports = compile_in_processes(args.targets, "full" if args.full else "ci", args.jobs)
    print(table(reports))
    for r in reports:
        if not r["ok"]:
            print(f"FAIL {r['target']} {r['variant']}: {'; '.join(r['problems'])}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(reports, fh, indent=1)
    return 1 if any(not r["ok"] for r in reports) else 0


if __name__ == "__main__":
    import sys

    sys.exit(main())


def kernel_names(targets) -> dict[str, tuple[set[str], set[str]]]:
    """{target: (every kernel, the CI subset's kernels)}, computed with the interpreter off (run it in a
    fresh process)."""
    import os

    os.environ.pop("TRITON_INTERPRET", None)
    out = {}
    for target in targets:
        variants = all_variants(aot.TARGETS[target])
        out[target] = {v.kernel for v in variants}, {v.kernel for v in ci_subset(variants)}
    return out


def lowp_ci_notes(targets) -> dict[str, dict[str, str]]:
    """{target: {kernel: note}} of the low-precision kernels in the CI subset (interpreter off: run it in a
    fresh process)."""
    import os

    os.environ.pop("TRITON_INTERPRET", None)
    return {target: {v.kernel: v.note for v in ci_subset(lowp_variants(aot.TARGETS[target]))} for target in targets}


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a spawned process: Triton kernels defined there are real JIT functions, not the
    interpreter's (the tests turn TRITON_INTERPRET on for everything else)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()
