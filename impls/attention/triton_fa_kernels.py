"""Triton FlashAttention-2 kernels: forward (online softmax, log-sum-exp saved), backward (delta, dK/dV, dQ).

Layout: q/o/do [B, Hq, Sq, D], k/v [B, Hkv, Sk, D], last dimension contiguous. Query head h reads kv head
h // GROUP (GQA/MQA); dK/dV of a kv head are summed over its GROUP query heads inside one program (fp32, no
atomics, so every output is deterministic). The causal mask is aligned bottom-right: query i sees key j when
j <= i + (Sk - Sq); a query row that sees no key outputs zeros and gets LSE = +inf (so its exp() is 0).
The head dimension is padded to BLOCK_D (a power of two >= 16) with masked loads/stores.
Scores live in the log2 domain (scale * log2(e) folded in) so the exponential is exp2.

The kernels are module-level (the interpreter resolves jit helpers by global name). Plugin discovery imports
this module: without triton it defines no kernels, and with triton ``@triton.jit`` only wraps the functions
(compilation happens at the first launch). ``@triton.jit`` reads TRITON_INTERPRET when a kernel is defined,
so workers settle it before discovery (docs/method.md §5). tests/test_triton_fa.py builds wrong copies of
these kernels from this file's source and checks that parity catches each.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from twinbench.harness.core.progress import note
from twinbench.impls.kernels.availability import interpreting
from twinbench.impls.kernels.triton_launch import dot_dim, dot_input_precision

try:
    import triton
    import triton.language as tl
except ImportError:  # the impl's availability check reports it
    triton = None

LOG2E = 1.4426950408889634
# Under the interpreter one fixed small config (autotuning would need a GPU timer, and the interpreter runs
# one program at a time, so fewer, larger programs are faster while still crossing block boundaries).
INTERPRETER_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 64}


if triton is not None:  # absent: the module defines no kernels (the impl reports triton missing)

    @triton.jit
    def _diagonal(SEQ_Q, SEQ_K):
        """The bottom-right causal alignment: query row i sees key j when j <= i + _diagonal. Every causal bound
        (the mask and the key/row ranges the loops skip) is derived from this one value."""
        return SEQ_K - SEQ_Q

    @triton.jit
    def _score_mask(offs_m, offs_n, SEQ_Q, SEQ_K, CAUSAL: tl.constexpr):
        """True where query row offs_m may attend key offs_n (inside both lengths, bottom-right causal)."""
        valid = (offs_m[:, None] < SEQ_Q) & (offs_n[None, :] < SEQ_K)
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + _diagonal(SEQ_Q, SEQ_K))
        return valid

    @triton.jit
    def _fwd_kernel(Q, K, V, Out, LSE, qk_scale,
                    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                    H_Q, GROUP, SEQ_Q, SEQ_K, HEAD_DIM,
                    CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        start_m = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1).to(tl.int64)
        b = bh // H_Q
        h = bh % H_Q
        q_base = b * stride_qb + h * stride_qh  # o shares q's layout
        kv_base = b * stride_kb + (h // GROUP) * stride_kh
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        q = tl.load(Q + q_base + offs_m[:, None] * stride_qm + offs_d[None, :],
                    mask=(offs_m[:, None] < SEQ_Q) & d_ok[None, :], other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (log2 domain)
        l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        end_n = SEQ_K
        if CAUSAL:  # keys past the block's last row's reach are all masked: skip them
            end_n = tl.maximum(tl.minimum(SEQ_K, start_m + BLOCK_M + _diagonal(SEQ_Q, SEQ_K)), 0)
        for start_n in range(0, end_n, BLOCK_N):
            cols = start_n + offs_n
            kv_ok = (cols[:, None] < SEQ_K) & d_ok[None, :]
            k = tl.load(K + kv_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            qk = tl.where(_score_mask(offs_m, cols, SEQ_Q, SEQ_K, CAUSAL), qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
            p = tl.math.exp2(qk - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + kv_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
            m_i = m_new

        empty = l_i == 0.0  # no visible key: output 0, LSE +inf
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
        tl.store(Out + q_base + offs_m[:, None] * stride_qm + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=(offs_m[:, None] < SEQ_Q) & d_ok[None, :])
        tl.store(LSE + bh * SEQ_Q + offs_m, lse, mask=offs_m < SEQ_Q)

    @triton.jit
    def _bwd_delta_kernel(Out, DO, DELTA, stride_qb, stride_qh, stride_qm, H_Q, SEQ_Q, HEAD_DIM,
                          BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """delta[b, h, i] = sum_d o * do: the softmax-backward correction term, in fp32."""
        start_m = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1).to(tl.int64)
        base = (bh // H_Q) * stride_qb + (bh % H_Q) * stride_qh
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_m[:, None] < SEQ_Q) & (offs_d[None, :] < HEAD_DIM)
        ptrs = base + offs_m[:, None] * stride_qm + offs_d[None, :]
        o = tl.load(Out + ptrs, mask=mask, other=0.0).to(tl.float32)
        do = tl.load(DO + ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DELTA + bh * SEQ_Q + offs_m, tl.sum(o * do, 1), mask=offs_m < SEQ_Q)

    @triton.jit
    def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, qk_scale, sm_scale,
                         stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                         H_Q, H_KV, GROUP, SEQ_Q, SEQ_K, HEAD_DIM,
                         CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """One block of keys of one kv head: dV = P^T dO, dK = scale * dS^T Q, summed over the GROUP heads."""
        start_n = tl.program_id(0) * BLOCK_N
        bhk = tl.program_id(1).to(tl.int64)
        b = bhk // H_KV
        hk = bhk % H_KV
        kv_base = b * stride_kb + hk * stride_kh
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        kv_mask = (offs_n[:, None] < SEQ_K) & d_ok[None, :]
        kv_ptrs = kv_base + offs_n[:, None] * stride_kn + offs_d[None, :]
        k = tl.load(K + kv_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_ptrs, mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        start_m0 = 0
        if CAUSAL:  # rows before the first one that reaches this key block see none of it
            start_m0 = tl.maximum(start_n - _diagonal(SEQ_Q, SEQ_K), 0) // BLOCK_M * BLOCK_M
        for g in range(0, GROUP):
            bh = b * H_Q + hk * GROUP + g
            q_base = b * stride_qb + (hk * GROUP + g) * stride_qh
            for start_m in range(start_m0, SEQ_Q, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                row_ok = offs_m < SEQ_Q
                q_mask = row_ok[:, None] & d_ok[None, :]
                q_ptrs = q_base + offs_m[:, None] * stride_qm + offs_d[None, :]
                q = tl.load(Q + q_ptrs, mask=q_mask, other=0.0)
                do = tl.load(DO + q_ptrs, mask=q_mask, other=0.0)
                lse = tl.load(LSE + bh * SEQ_Q + offs_m, mask=row_ok, other=float("inf"))
                delta = tl.load(DELTA + bh * SEQ_Q + offs_m, mask=row_ok, other=0.0)
                qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
                visible = _score_mask(offs_m, offs_n, SEQ_Q, SEQ_K, CAUSAL)
                p = tl.where(visible, tl.math.exp2(qk * qk_scale - lse[:, None]), 0.0)
                dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=PRECISION)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                ds = p * (dp - delta[:, None])
                dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PRECISION)
        tl.store(DK + kv_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, qk_scale, sm_scale,
                       stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                       H_Q, GROUP, SEQ_Q, SEQ_K, HEAD_DIM,
                       CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """One block of query rows: dQ = scale * dS K, walking the keys the forward walked."""
        start_m = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1).to(tl.int64)
        b = bh // H_Q
        h = bh % H_Q
        q_base = b * stride_qb + h * stride_qh
        kv_base = b * stride_kb + (h // GROUP) * stride_kh
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        row_ok = offs_m < SEQ_Q
        q_mask = row_ok[:, None] & d_ok[None, :]
        q_ptrs = q_base + offs_m[:, None] * stride_qm + offs_d[None, :]
        q = tl.load(Q + q_ptrs, mask=q_mask, other=0.0)
        do = tl.load(DO + q_ptrs, mask=q_mask, other=0.0)
        lse = tl.load(LSE + bh * SEQ_Q + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + bh * SEQ_Q + offs_m, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        end_n = SEQ_K
        if CAUSAL:
            end_n = tl.maximum(tl.minimum(SEQ_K, start_m + BLOCK_M + _diagonal(SEQ_Q, SEQ_K)), 0)
        for start_n in range(0, end_n, BLOCK_N):
            cols = start_n + offs_n
            kv_ok = (cols[:, None] < SEQ_K) & d_ok[None, :]
            k = tl.load(K + kv_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
            v = tl.load(V + kv_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            visible = _score_mask(offs_m, cols, SEQ_Q, SEQ_K, CAUSAL)
            p = tl.where(visible, tl.math.exp2(qk * qk_scale - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
        tl.store(DQ + q_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


# --- launch: autotuned on GPUs, one fixed config under the interpreter -----------------------------------

def gpu_configs() -> list:
    """The autotuner's candidate tiles on GPUs."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n in ((128, 64), (128, 32), (64, 64), (64, 32), (32, 32))
            for w in (4, 8) for s in (1, 2, 3)
            if not (m == 32 and w == 8)]


@dataclass(frozen=True)
class TileLimits:
    """What a GPU lets one program (block / workgroup) use: the autotuner keeps only configs within it."""

    shared_bytes: int  # shared memory (NVIDIA, opt-in maximum) or LDS (AMD) per block
    amd: bool = False  # AMD keeps the tiles loaded once in registers: less LDS per config (SHARED_ROWS)
    # RDNA (gfx11/gfx12): fp32 tiles with BLOCK_D >= 128 spill VGPRs (hundreds even at 32x32; docs/triton_fa.md)
    spills_large_fp32: bool = False


# Shared memory when nothing better is known: 64 KiB is the smallest per-block limit of the GPUs Triton
# targets (AMD LDS per workgroup on CDNA3 and RDNA3/4; NVIDIA has >= 99 KiB opt-in since sm80).
FALLBACK_SHARED_BYTES = 64 * 1024
# Shared memory per kernel in rows of BLOCK_D elements: (fixed per BLOCK_M row, fixed per BLOCK_N row,
# per stage per BLOCK_M row, per stage per BLOCK_N row). The tiles a kernel loads inside its loop are
# multi-buffered by the pipeliner (num_stages copies); the ones loaded once are not. Fitted to triton AOT
# compiles (docs/triton_fa.md): fp32 D64 128x64 3 stages on sm90 takes exactly q + 3 x (k, v) in the forward,
# 3 x (q, dO) in dK/dV, (q, dO) + 3 x (k, v) in dQ; fp32 D256 adds ~13% of M for layout conversions in
# the forward; fp16 builds use less (fp16 D128 on sm90 does not grow with stages). AMD keeps the tiles loaded
# once in registers: at most num_stages copies of the loop's tiles in LDS (gfx942/gfx1201 fp32 D64 128x64
# 3 stages: 64 KiB fwd and dQ, 160 KiB dK/dV on gfx1201; fp16 D128/D256 16 KiB). tests/test_aot_compile.py
# compiles the kept configs per target and fails when a compiled kernel needs more than this estimate.
SHARED_ROWS = {"fwd": (1.15, 0.0, 0.0, 2.0), "dkdv": (0.5, 2.0, 2.0, 0.0), "dq": (2.0, 0.0, 0.0, 2.0)}
AMD_SHARED_ROWS = {"fwd": (0.0, 0.0, 0.0, 2.0), "dkdv": (0.0, 0.0, 2.0, 0.0), "dq": (0.0, 0.0, 0.0, 2.0)}
SHARED_MARGIN = 1.1
# Largest BLOCK_M x BLOCK_N kept for fp32 with BLOCK_D >= 128 where such tiles spill (TileLimits).
SPILL_SAFE_FP32_TILE = 32 * 32
# NVIDIA, fp32 ("ieee" dots run on FMA units, not tensor cores): tiles of more than this many score elements
# per thread make ptxas give up on registers (32 registers and 7-17 KB of stack per thread in sm80/sm90 builds
# of fwd/dkdv/dq at D64, already at 16 per thread on sm80); at 8 the stack is at most ~1.6 KB, except dK/dV
# (it keeps dk, dv and the recomputed scores: 64x32 with 8 warps gave 4.9 KB on sm100), kept at 32x32
# (docs/triton_fa.md).
NVIDIA_FP32_TILE_PER_THREAD = 8


def spills_large_fp32(arch: str) -> bool:
    """RDNA (consumer AMD, gfx11xx / gfx12xx): 32-wide waves and a register file too small for fp32 tiles
    with BLOCK_D >= 128, which spill to scratch."""
    return str(arch).startswith(("gfx11", "gfx12"))


def shared_estimate(kernel: str, block_m: int, block_n: int, block_d: int, elem: int, num_stages: int,
                    amd: bool = False) -> int:
    """Bytes of shared memory ``kernel`` ("fwd", "dkdv", "dq") needs for one tile configuration."""
    fixed_m, fixed_n, staged_m, staged_n = (AMD_SHARED_ROWS if amd else SHARED_ROWS)[kernel]
    stages = max(num_stages, 1)
    rows = (fixed_m + stages * staged_m) * block_m + (fixed_n + stages * staged_n) * block_n
    return int(rows * block_d * elem * SHARED_MARGIN)


def keep_configs(configs: list, kernel: str, block_d: int, elem: int, limits: TileLimits) -> list:
    """The configs that fit ``limits``: shared memory within the limit, and no fp32 tile known to spill
    (RDNA at BLOCK_D >= 128; NVIDIA above NVIDIA_FP32_TILE_PER_THREAD score elements per thread)."""
    kept = []
    for c in configs:
        m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if shared_estimate(kernel, m, n, block_d, elem, c.num_stages, limits.amd) > limits.shared_bytes:
            continue
        if limits.spills_large_fp32 and elem == 4 and block_d >= 128 and m * n > SPILL_SAFE_FP32_TILE:
            continue
        if not limits.amd and elem == 4 and (m * n > NVIDIA_FP32_TILE_PER_THREAD * 32 * c.num_warps
                                             or (kernel == "dkdv" and m * n > SPILL_SAFE_FP32_TILE)):
            continue
        kept.append(c)
    return kept


@functools.cache
def _device_limits(device_index: int) -> TileLimits:
    props = torch.cuda.get_device_properties(device_index)
    arch = str(getattr(props, "gcnArchName", "")).split(":")[0]
    return TileLimits(shared_memory_limit(device_index), amd=torch.version.hip is not None,
                      spills_large_fp32=spills_large_fp32(arch))


def shared_memory_limit(device) -> int:
    """Shared memory one block may use on ``device`` (a torch device or its index), in bytes: torch's
    ``shared_memory_per_block_optin`` (the opt-in maximum, what Triton launches with), else the triton
    driver's ``max_shared_mem``, else :data:`FALLBACK_SHARED_BYTES`."""
    index = device.index if isinstance(device, torch.device) else int(device)
    index = torch.cuda.current_device() if index is None else index
    try:
        found = int(getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", 0) or 0)
        if found:
            return found
    except Exception:  # noqa: S110  (no torch.cuda on this build: ask the driver)
        pass
    try:
        return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:
        return FALLBACK_SHARED_BYTES


def device_limits(device) -> TileLimits:
    """The limits of a CUDA/ROCm ``device`` (a torch device or its index), read once per device."""
    index = device.index if isinstance(device, torch.device) else int(device)
    return _device_limits(torch.cuda.current_device() if index is None else index)


def fits_somewhere(block_d: int, elem: int, limits: TileLimits) -> tuple[bool, str]:
    """Whether every kernel keeps at least one config under ``limits`` (else the case cannot launch)."""
    for kernel in SHARED_ROWS:
        if not keep_configs(gpu_configs(), kernel, block_d, elem, limits):
            smallest = shared_estimate(kernel, 32, 32, block_d, elem, 1, limits.amd)
            return False, (f"{kernel} needs ~{smallest // 1024} KiB shared memory at head_dim<={block_d} "
                           f"({elem}-byte elements); this GPU allows {limits.shared_bytes // 1024} KiB per block")
    return True, ""


def _pruner(kernel: str):
    """The autotuner's early_config_prune for ``kernel``: the configs that fit the launching device."""

    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
        kept = keep_configs(configs, kernel, block_d, q.element_size(), device_limits(q.device))
        # Nothing fits: triton_fa.supports declines such cases; a direct caller gets the smallest tile's
        # own out-of-resources error rather than an empty autotuner.
        kept = kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))]
        note(f"triton_fa {kernel}: autotuning {len(kept)} configs (head_dim<={block_d}, first call)")
        return kept

    return prune


def _autotune_heartbeat(kernel: str):
    """The autotuner's pre_hook (it runs before each config's benchmark launches, never in a tuned launch):
    a heartbeat per config tried, so a first call that compiles and times many configs on a new GPU is
    progress, not a hang (docs/method.md §6)."""

    def hook(nargs, reset_only=False):
        if not reset_only:
            note(f"triton_fa {kernel}: autotuning BLOCK_M={nargs.get('BLOCK_M')} BLOCK_N={nargs.get('BLOCK_N')} "
                 f"warps={nargs.get('num_warps')} stages={nargs.get('num_stages')} (first call)")

    return hook


_TUNE_KEY = ["SEQ_Q", "SEQ_K", "GROUP", "HEAD_DIM", "CAUSAL"]
_tuned: dict = {}
KERNEL_NAMES = {_fwd_kernel: "fwd", _bwd_dkdv_kernel: "dkdv", _bwd_dq_kernel: "dq"} if triton is not None else {}


def _launcher(kernel):
    """The kernel itself with fixed blocks under the interpreter; an autotuned wrapper on GPUs."""
    if interpreting():
        return kernel, dict(INTERPRETER_BLOCKS)
    if kernel not in _tuned:
        name = KERNEL_NAMES[kernel]
        _tuned[kernel] = triton.autotune(configs=gpu_configs(), key=_TUNE_KEY, pre_hook=_autotune_heartbeat(name),
                                         prune_configs_by={"early_config_prune": _pruner(name)})(kernel)
    return _tuned[kernel], {}


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse): o like q; lse [B, Hq, Sq] fp32 in the log2 domain of the scaled scores (+inf: no key seen)."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty((b, hq, sq), device=q.device, dtype=torch.float32)
    kernel, fixed = _launcher(_fwd_kernel)

    def grid(meta):
        return (triton.cdiv(sq, meta["BLOCK_M"]), b * hq)

    kernel[grid](q, k, v, o, lse, scale * LOG2E, q.stride(0), q.stride(1), q.stride(2),
                 k.stride(0), k.stride(1), k.stride(2), hq, hq // hkv, sq, sk, d,
                 CAUSAL=causal, PRECISION=dot_input_precision(q.dtype), BLOCK_D=dot_dim(d), **fixed)
    return o, lse


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             lse: torch.Tensor, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) for contiguous q, k, v, o, do and the forward's lse."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    block_d = dot_dim(d)
    delta = torch.empty((b, hq, sq), device=q.device, dtype=torch.float32)
    _bwd_delta_kernel[(triton.cdiv(sq, 64), b * hq)](o, do, delta, q.stride(0), q.stride(1), q.stride(2),
                                                     hq, sq, d, BLOCK_M=64, BLOCK_D=block_d)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    common = dict(CAUSAL=causal, PRECISION=dot_input_precision(q.dtype), BLOCK_D=block_d)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    kernel, fixed = _launcher(_bwd_dkdv_kernel)

    def grid_kv(meta):
        return (triton.cdiv(sk, meta["BLOCK_N"]), b * hkv)

    kernel[grid_kv](q, k, v, do, lse, delta, dk, dv, scale * LOG2E, scale, *strides,
                    hq, hkv, hq // hkv, sq, sk, d, **common, **fixed)
    kernel, fixed = _launcher(_bwd_dq_kernel)

    def grid_q(meta):
        return (triton.cdiv(sq, meta["BLOCK_M"]), b * hq)

    kernel[grid_q](q, k, v, do, lse, delta, dq, scale * LOG2E, scale, *strides,
                   hq, hq // hkv, sq, sk, d, **common, **fixed)
    return dq, dk, dv


def natural_lse(lse2: torch.Tensor) -> torch.Tensor:
    """The forward's log2-domain LSE as the usual natural-log logsumexp of the scaled scores."""
    return lse2 * math.log(2.0)
