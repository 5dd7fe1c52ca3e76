"""Ours, GPU path: one Triton program per token does softmax (fp32) -> top-k (lowest index wins ties) ->
optional renormalisation in registers, writing only the k weights, k ids and the row's logsumexp.
The backward (dense over E per row, cheap) and the aux / z losses are PyTorch, from the saved logsumexp.
On the CPU it runs under TRITON_INTERPRET=1: parity only, never timed.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from twinbench.harness.core.registry import register_impl
from twinbench.impls.kernels.availability import triton_available
from twinbench.reference.moe import router_losses


def _supports(case, device) -> tuple[bool, str]:
    if getattr(device, "backend", "cpu") == "cpu" and case.get("dtype") == "bf16":
        return False, "Triton interpreter: no bf16 arithmetic on the CPU (triton #11584); fp16/fp32 only"
    if case["experts"] > 1024:
        return False, "one program holds all experts of a row: at most 1024"
    return True, ""


@functools.cache
def _kernel():
    """The @triton.jit kernel, built on first use so this module imports without triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def topk_softmax_kernel(logits_ptr, weights_ptr, ids_ptr, lse_ptr, n_experts, stride_row,
                            TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                            RENORM: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK_E)
        valid = offs < n_experts
        x = tl.load(logits_ptr + row * stride_row + offs, mask=valid, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=0)
        ex = tl.exp(x - m)
        total = tl.sum(ex, axis=0)
        probs = ex / total
        finite = (total == total) & (total < float("inf")) & (m > float("-inf"))   # NaN/Inf row -> all NaN
        work = tl.where(valid, probs, -1.0)
        kofs = tl.arange(0, BLOCK_K)
        top_v = tl.zeros([BLOCK_K], dtype=tl.float32)
        top_i = tl.zeros([BLOCK_K], dtype=tl.int32)
        for j in tl.static_range(TOP_K):
            best = tl.max(work, axis=0)
            idx = tl.min(tl.where(work == best, offs, BLOCK_E), axis=0)   # lowest index among the maxima
            top_v = tl.where(kofs == j, best, top_v)
            top_i = tl.where(kofs == j, idx, top_i)
            work = tl.where(offs == idx, -2.0, work)
        if RENORM:
            top_v = top_v / tl.sum(tl.where(kofs < TOP_K, top_v, 0.0), axis=0)
        top_v = tl.where(finite, top_v, float("nan"))
        top_i = tl.where(finite, top_i, kofs)          # like a stable sort of an all-NaN row: 0..k-1
        keep = kofs < TOP_K
        tl.store(weights_ptr + row * TOP_K + kofs, top_v, mask=keep)
        tl.store(ids_ptr + row * TOP_K + kofs, top_i.to(tl.int64), mask=keep)
        tl.store(lse_ptr + row, m + tl.log(total))

    return (triton, topk_softmax_kernel)


def topk_softmax(logits: torch.Tensor, top_k: int, renorm: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights fp32 [T, k], ids int64 [T, k], logsumexp fp32 [T]) from router logits [T, E]."""
    triton, kernel = _kernel()
    logits = logits.contiguous()
    t, e = logits.shape
    weights = torch.empty((t, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((t, top_k), dtype=torch.int64, device=logits.device)
    lse = torch.empty((t,), dtype=torch.float32, device=logits.device)
    if t:
        kernel[(t,)](logits, weights, ids, lse, e, logits.stride(0), TOP_K=top_k,
                     BLOCK_E=triton.next_power_of_2(e), BLOCK_K=triton.next_power_of_2(top_k), RENORM=renorm)
    return weights, ids, lse


def _differentiable_lse(logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """The row's logsumexp for a backward under create_graph: the kernel's ``lse`` is a constant to autograd, and
    without renorm the second derivative then lost the terms through it (measured); rebuilt from the logits, the
    backward below is made of differentiable ops only, so second derivatives are right (tests/test_double_backward.py).
    The first-order values move by rounding only (torch's logsumexp, not the kernel's)."""
    return torch.logsumexp(logits.float(), -1)


class TopKSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, top_k, renorm):
        weights, ids, lse = topk_softmax(logits.detach(), top_k, renorm)
        ctx.save_for_backward(logits, weights, ids, lse)
        ctx.renorm = renorm
        ctx.mark_non_differentiable(ids)
        return weights, ids

    @staticmethod
    def backward(ctx, grad_weights, _grad_ids):
        logits, weights, ids, lse = ctx.saved_tensors
        if torch.is_grad_enabled():
            lse = _differentiable_lse(logits, lse)
        g = grad_weights.float()
        if ctx.renorm:  # w = v / sum(v): dv = (dw - sum(dw * w)) / sum(v), and v = w * sum(v)
            probs_top = torch.exp(logits.float().gather(-1, ids) - lse[:, None])
            g = (g - (g * weights).sum(-1, keepdim=True)) / probs_top.sum(-1, keepdim=True)
        probs = torch.exp(logits.float() - lse[:, None])
        g_probs = torch.zeros_like(probs).scatter_(-1, ids, g)
        g_logits = probs * (g_probs - (g_probs * probs).sum(-1, keepdim=True))   # softmax backward
        return g_logits.to(logits.dtype), None, None


@register_impl("gating", "triton_topk_softmax", tags=("ours", "interpreter-on-cpu"), available=triton_available,
               supports=_supports)
def triton_topk_softmax(hidden_states, router_weight, *, top_k, norm_topk_prob):
    logits = F.linear(hidden_states, router_weight)
    weights, ids = TopKSoftmax.apply(logits, top_k, norm_topk_prob)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    aux, z = router_losses(logits, probs, ids, router_weight.shape[0])
    return {"weights": weights.to(hidden_states.dtype), "ids": ids, "aux_loss": aux, "z_loss": z}
