"""Ours, GPU path: the sorted-experts algorithm of impls/moe_ffn/sorted_experts.py with Triton grouped GEMMs.

Two kernels, both reading the expert weights in place through strides (no per-expert copies):
- ``rows_gemm``: out[rows of e] = a[rows of e] @ W[e] (W[e] possibly a transposed view); one program per
  (row tile of one expert, column tile); the tile -> expert map is built on the host from the counts the
  sort already synchronised.
- ``weight_grad_gemm``: grad[e] = g[rows of e]^T @ a[rows of e]; one program per (expert, tile of grad[e]),
  looping over that expert's rows; an expert with no rows writes zeros.
On the CPU it runs under TRITON_INTERPRET=1 (fp16/fp32, tiny shapes): parity only, never timed.
"""

from __future__ import annotations

import functools

import torch
from twinbench.harness.core.registry import register_impl
from twinbench.impls.kernels.availability import triton_available
from twinbench.impls.kernels.triton_launch import dot_input_precision
from twinbench.impls.moe_ffn.sorted_experts import Routing, SortedExperts

BLOCK_M, BLOCK_N, BLOCK_K = 32, 32, 32   # tl.dot needs >= 16; the interpreter is cheapest with few programs


def _supports(case, device) -> tuple[bool, str]:
    if getattr(device, "backend", "cpu") != "cpu":
        return True, ""
    if case.get("dtype") == "bf16":
        return False, "Triton interpreter: no bf16 tl.dot on the CPU (triton #11584); fp16/fp32 only"
    work = case["batch"] * case["seq"] * case["top_k"] * case["hidden"] * case["inter"]
    if work > 2**22:
        return False, "Triton interpreter on the CPU runs one program at a time: tiny cases only"
    return True, ""


@functools.cache
def _kernels():
    """The @triton.jit kernels, built on first use so this module imports without triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def rows_gemm(a_ptr, w_ptr, out_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr, n, k,
                  stride_am, stride_ak, stride_we, stride_wk, stride_wn, stride_om, stride_on,
                  PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        tile, pid_n = tl.program_id(0), tl.program_id(1)
        expert = tl.load(tile_expert_ptr + tile)
        row0, row_end = tl.load(tile_start_ptr + tile), tl.load(tile_end_ptr + tile)
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                        mask=(rows[:, None] < row_end) & (ks[None, :] < k), other=0.0)
            w = tl.load(w_ptr + expert * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                        mask=(ks[:, None] < k) & (cols[None, :] < n), other=0.0)
            acc += tl.dot(a, w, input_precision=PRECISION)
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < row_end) & (cols[None, :] < n))

    @triton.jit
    def weight_grad_gemm(g_ptr, a_ptr, grad_ptr, starts_ptr, ends_ptr, n, k,
                         stride_gm, stride_gn, stride_am, stride_ak, stride_de, stride_dn, stride_dk,
                         PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
        expert, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start, end = tl.load(starts_ptr + expert), tl.load(ends_ptr + expert)
        ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for r0 in range(start, end, BLOCK_M):
            rs = r0 + tl.arange(0, BLOCK_M)
            g_t = tl.load(g_ptr + rs[None, :] * stride_gm + ns[:, None] * stride_gn,
                          mask=(rs[None, :] < end) & (ns[:, None] < n), other=0.0)       # [BLOCK_N, BLOCK_M]
            a = tl.load(a_ptr + rs[:, None] * stride_am + ks[None, :] * stride_ak,
                        mask=(rs[:, None] < end) & (ks[None, :] < k), other=0.0)         # [BLOCK_M, BLOCK_K]
            acc += tl.dot(g_t, a, input_precision=PRECISION)
        tl.store(grad_ptr + expert * stride_de + ns[:, None] * stride_dn + ks[None, :] * stride_dk,
                 acc.to(grad_ptr.dtype.element_ty), mask=(ns[:, None] < n) & (ks[None, :] < k))

    return (triton, rows_gemm, weight_grad_gemm)


def expert_row_tiles(route: Routing, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row tiles that never straddle two experts: (expert, first row, end row) per tile."""
    experts, starts, ends = [], [], []
    for e, s, t in route.blocks:
        for r in range(s, t, BLOCK_M):
            experts.append(e)
            starts.append(r)
            ends.append(min(r + BLOCK_M, t))
    as_t = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    return as_t(experts), as_t(starts), as_t(ends)


class TritonGemms:
    name = "Triton grouped GEMM"

    @staticmethod
    def rows_times_weight(a: torch.Tensor, w: torch.Tensor, route: Routing, transpose: bool) -> torch.Tensor:
        triton, rows_gemm, _ = _kernels()
        wv = w.transpose(-2, -1) if transpose else w        # [E, K, N] view of the weight
        n, k = wv.shape[2], wv.shape[1]
        out = torch.empty((a.shape[0], n), dtype=a.dtype, device=a.device)
        if not hasattr(route, "tiles"):
            route.tiles = expert_row_tiles(route, a.device)
        tile_expert, tile_start, tile_end = route.tiles
        if tile_expert.numel():
            grid = (tile_expert.numel(), triton.cdiv(n, BLOCK_N))
            rows_gemm[grid](a, wv, out, tile_expert, tile_start, tile_end, n, k,
                            a.stride(0), a.stride(1), wv.stride(0), wv.stride(1), wv.stride(2),
                            out.stride(0), out.stride(1), PRECISION=dot_input_precision(a.dtype),
                            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
        return out

    @staticmethod
    def weight_grad(g: torch.Tensor, a: torch.Tensor, like: torch.Tensor, route: Routing) -> torch.Tensor:
        triton, _, weight_grad_gemm = _kernels()
        e, n, k = like.shape
        grad = torch.empty_like(like)
        ends = route.offs.to(device=g.device, dtype=torch.int32)
        starts = torch.cat([ends.new_zeros(1), ends[:-1]])
        grid = (e, triton.cdiv(n, BLOCK_N), triton.cdiv(k, BLOCK_K))
        weight_grad_gemm[grid](g, a, grad, starts, ends, n, k, g.stride(0), g.stride(1), a.stride(0), a.stride(1),
                               grad.stride(0), grad.stride(1), grad.stride(2),
                               PRECISION=dot_input_precision(a.dtype), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                               BLOCK_K=BLOCK_K)
        return grad


@register_impl("moe_ffn", "triton_grouped", tags=("ours", "interpreter-on-cpu"), available=triton_available,
               supports=_supports)
def triton_grouped(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj):
    return SortedExperts.apply(TritonGemms, hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj)
