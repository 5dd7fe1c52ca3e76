"""LoRA on an MoE block's fused 3-D expert weights (peft ``target_parameters``) without building W + B A.

peft 0.21 adapts ``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj`` [E, H, I] through a
parametrization: every forward builds ``W + s L R`` for all experts (a ``baddbmm`` over the whole stack, and
one more when the parametrization is registered), the experts multiply by it, autograd keeps it for the
backward, which returns a dense [E, out, in] gradient that two more ``bmm`` turn into dL, dR. Measured on
the tiny Qwen3-MoE at 64 tokens (docs/qlora.md): that weight-sized traffic was the patched loop's largest
cost after the GEMMs themselves, and the kept W + B A (1.5 MB per layer) most of its extra memory.

Here, per expert e, over its rows (tokens sorted by expert once per call, as ``impls.moe_ffn_sorted``):

    forward   h = x W^T + s (x R^T) L^T            (x R^T is kept: [rows, r])
    backward  gL = g L;  dx = g W + s gL R;  dL = s g^T (x R^T);  dR = s gL^T x

so nothing weight-sized is built or saved, the frozen base W gets no gradient, and the adapters' gradients
come from rank-r products. The router weights' gradient comes from the down projection's backward (an
identity, in ``backward``), so the experts' output is neither kept nor rebuilt. ``patch_lora_experts``
routes a peft model's MoE blocks through it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from twinbench.impls.moe_ffn.sorted_experts import Routing
from twinbench.reference.autograd_once import differentiable_once
from twinbench.reference.qlora.breakdown import scope


def _row_blocks(route: Routing, n_experts: int) -> list[int]:
    """Rows per expert (zeros included), for ``Tensor.split``: one call gives every block's view."""
    sizes = [0] * n_experts
    for e, a, b in route.blocks:
        sizes[e] = b - a
    return sizes


def _lora_rows(x: torch.Tensor, w: torch.Tensor, lhs: torch.Tensor, rhs: torch.Tensor, s: float,
               sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(x W_e^T + s (x R_e^T) L_e^T, x R_e^T) over each expert's row block; W [E, out, in], L [E, out, r],
    R [E, r, in]. Per expert three GEMMs on views made once per call (at these sizes the dispatch of a
    slice or a transpose costs about as much as a small GEMM)."""
    out = x.new_empty((x.shape[0], w.shape[1]))
    xr = x.new_empty((x.shape[0], rhs.shape[1]))
    blocks = zip(x.split(sizes), out.split(sizes), xr.split(sizes), w.transpose(1, 2).unbind(0),
                 lhs.transpose(1, 2).unbind(0), rhs.transpose(1, 2).unbind(0))
    for x_e, out_e, xr_e, w_t, l_t, r_t in blocks:
        if x_e.shape[0]:
            torch.mm(x_e, r_t, out=xr_e)
            torch.mm(x_e, w_t, out=out_e)
            out_e.addmm_(xr_e, l_t, alpha=s)
    return out, xr


def _rank_rows(x: torch.Tensor, rhs: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """x R_e^T over each expert's row block (``_lora_rows``' second output, alone)."""
    xr = x.new_empty((x.shape[0], rhs.shape[1]))
    for x_e, xr_e, r_t in zip(x.split(sizes), xr.split(sizes), rhs.transpose(1, 2).unbind(0)):
        if x_e.shape[0]:
            torch.mm(x_e, r_t, out=xr_e)
    return xr


def _lora_rows_backward(g: torch.Tensor, x: torch.Tensor, xr: torch.Tensor, w: torch.Tensor, lhs: torch.Tensor,
                        rhs: torch.Tensor, s: float, sizes: list[int], need_lora: bool
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dL, dR) of ``_lora_rows`` for its output gradient ``g``; experts without rows get zero dL, dR."""
    gx = g.new_empty((g.shape[0], w.shape[2]))
    d_lhs = d_rhs = None
    if need_lora:  # experts without rows: zero gradients; the others are written whole below
        make = torch.zeros_like if 0 in sizes else torch.empty_like
        d_lhs, d_rhs = make(lhs), make(rhs)
    grads = zip(d_lhs.unbind(0), d_rhs.unbind(0)) if need_lora else ((None, None) for _ in sizes)
    blocks = zip(g.split(sizes), x.split(sizes), xr.split(sizes), gx.split(sizes), w.unbind(0), lhs.unbind(0),
                 rhs.unbind(0), grads)
    for g_e, x_e, xr_e, gx_e, w_e, l_e, r_e, (dl_e, dr_e) in blocks:
        if not g_e.shape[0]:
            continue
        gl = g_e @ l_e  # [rows, r]
        torch.mm(g_e, w_e, out=gx_e)
        gx_e.addmm_(gl, r_e, alpha=s)
        if need_lora:
            torch.mm(g_e.t(), xr_e, out=dl_e)
            torch.mm(gl.t(), x_e, out=dr_e)
    if need_lora:  # the scaling once per stack, not once per expert
        d_lhs.mul_(s)
        d_rhs.mul_(s)
    return gx, d_lhs, d_rhs


def _contiguous(factors):
    """peft's factors are permuted views of lora_B / lora_A: copied contiguous once per forward and once per
    backward, not kept (or every per-expert GEMM would copy its slice first)."""
    return tuple(t.contiguous() for t in factors)


class SortedLoRAExperts(torch.autograd.Function):
    """SwiGLU experts over expert-sorted rows with LoRA factors on both fused weights; base weights frozen."""

    @staticmethod
    def forward(ctx, hidden_states, top_k_index, top_k_weights, w_gu, w_d, scalings, recompute, l_gu, r_gu, l_d,
                r_d):
        s_gu, s_d = scalings
        factors = (l_gu, r_gu, l_d, r_d)  # saved as given (views of the adapters: no memory of their own)
        l_gu, r_gu, l_d, r_d = _contiguous(factors)
        route = Routing(top_k_index, w_gu.shape[0])
        xs = hidden_states.index_select(0, route.token)
        w = top_k_weights.reshape(-1).index_select(0, route.order).unsqueeze(1)
        sizes = _row_blocks(route, w_gu.shape[0])
        h, xr_gu = _lora_rows(xs, w_gu, l_gu, r_gu, s_gu, sizes)  # [S, 2I]
        gate, up = h.chunk(2, dim=-1)
        y, xr_d = _lora_rows(F.silu(gate) * up, w_d, l_d, r_d, s_d, sizes)  # [S, H], unweighted
        out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        out.index_add_(0, route.token, (y * w).float())  # fp32 sum over the k slots, as moe_ffn_sorted
        ctx.route, ctx.sizes, ctx.scalings = route, sizes, scalings
        if recompute:  # keep only inputs: backward rebuilds h and the SwiGLU (the gate/up experts forward again)
            ctx.save_for_backward(hidden_states, top_k_weights, w_gu, w_d, *factors, w)
        else:
            ctx.save_for_backward(hidden_states, top_k_weights, w_gu, w_d, *factors, w, h, xr_gu, xr_d)
        return out.to(hidden_states.dtype)

    @staticmethod
    @differentiable_once("SortedLoRAExperts")  # out= GEMMs per expert, gradients written over rebuilt buffers
    def backward(ctx, grad_out):
        hidden_states, top_k_weights, w_gu, w_d, l_gu, r_gu, l_d, r_d, w, *kept = ctx.saved_tensors
        route, sizes, (s_gu, s_d) = ctx.route, ctx.sizes, ctx.scalings
        l_gu, r_gu, l_d, r_d = _contiguous((l_gu, r_gu, l_d, r_d))
        need_lora = any(ctx.needs_input_grad[7:11])
        xs = hidden_states.index_select(0, route.token)  # re-gathered, not stored
        if kept:
            h, xr_gu, xr_d = kept
        else:
            h, xr_gu = _lora_rows(xs, w_gu, l_gu, r_gu, s_gu, sizes)
        gate, up = h.chunk(2, dim=-1)
        act = F.silu(gate)
        a = act * up
        if not kept:
            xr_d = _rank_rows(a, r_d, sizes)
        g_out = grad_out.index_select(0, route.token)  # [S, H], before the router weight
        # The experts' output y = a W^T + s (a R^T) L^T is never rebuilt: the router weight's gradient
        # <g_out, y> equals <g_out W + s (g_out L) R, a>, the down projection's backward of the unweighted
        # gradient; its adapter gradients take the weight on their inputs instead ((w g)^T xr = g^T (w xr)).
        a_w = a.mul_(w)  # in place: a is rebuilt from act and up below, when fewer buffers are alive
        g_a, d_ld, d_rd = _lora_rows_backward(g_out, a_w, xr_d * w, w_d, l_d, r_d, s_d, sizes, need_lora)
        del g_out, a, a_w  # each [S, ...] buffer is dropped as soon as it is used up: the backward's own peak
        grad_w_sorted = (act * up).float().mul_(g_a.float()).sum(-1)  # d(router weight)
        g_a.mul_(w)  # the gradient reaching a
        # d [gate | up], written over the rebuilt h when it is ours (kept, it is a saved tensor): the
        # backward's peak was h, this gradient and two temporaries (measured)
        g_h = torch.empty_like(h) if kept else h
        d_up = act.mul_(g_a)
        torch.ops.aten.silu_backward.grad_input(g_a.mul_(up), gate, grad_input=g_h[:, :gate.shape[1]])
        g_h[:, gate.shape[1]:].copy_(d_up)
        del h, gate, up, act, g_a, d_up
        g_xs, d_lgu, d_rgu = _lora_rows_backward(g_h, xs, xr_gu, w_gu, l_gu, r_gu, s_gu, sizes, need_lora)
        del g_h, xs
        grad_x = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        grad_x.index_add_(0, route.token, g_xs.float())
        grad_w = torch.empty(route.order.shape, dtype=torch.float32, device=grad_x.device)
        grad_w[route.order] = grad_w_sorted
        return (grad_x.to(hidden_states.dtype), None, grad_w.view_as(top_k_weights).to(top_k_weights.dtype),
                None, None, None, None, d_lgu, d_rgu, d_ld, d_rd)


def lora_experts(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 gate_up: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float],
                 down: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float], recompute: bool = False) -> torch.Tensor:
    """Sparse SwiGLU experts with LoRA: ``gate_up`` / ``down`` = (W [E, out, in], L [E, out, r], R [E, r, in],
    scaling), the effective weight being ``W + scaling L R`` (peft's ``get_delta_factors``). ``recompute``:
    save only the inputs and rebuild the expert activations in backward (less memory, one more forward)."""
    (w_gu, l_gu, r_gu, s_gu), (w_d, l_d, r_d, s_d) = gate_up, down
    with scope("mlp_experts"):
        return SortedLoRAExperts.apply(hidden_states, top_k_index, top_k_weights.to(hidden_states.dtype), w_gu, w_d,
                                       (float(s_gu), float(s_d)), recompute, l_gu, r_gu, l_d, r_d)


# ---------------------------------------------------------------- peft patching


def _wrapper_chain(module) -> tuple[dict[str, Any], Any]:
    """{parameter name: peft ParamWrapper} along nested wrappers, and the experts module they wrap."""
    wrappers: dict[str, Any] = {}
    while hasattr(module, "parameter_name") and hasattr(module, "get_delta_factors"):
        wrappers[module.parameter_name] = module
        module = module.base_layer
    return wrappers, module


def _why_not(wrappers: dict[str, Any], experts) -> str:
    """'' when the fused LoRA experts path computes exactly what peft's wrappers would, now; else why not."""
    if set(wrappers) != {"gate_up_proj", "down_proj"}:
        return f"adapted expert parameters {sorted(wrappers)} (needs gate_up_proj and down_proj)"
    if getattr(experts, "is_transposed", False) or not getattr(experts, "is_concatenated", True) \
            or getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True):
        return "experts layout is not concatenated gate/up, [E, out, in], without bias"
    for name, wrapper in wrappers.items():
        if wrapper.disable_adapters or wrapper.merged:
            return f"{name}: adapters disabled or merged"
        active = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
        if len(active) != 1 or wrapper.num_experts <= 1:
            return f"{name}: {len(active)} active adapters over {wrapper.num_experts} experts"
        if getattr(experts, name).requires_grad:
            return f"{name}: base weight is trainable"
    return ""


def patch_lora_experts(model: torch.nn.Module, recompute: bool = False) -> tuple[int, str]:
    """Route every MoE block whose ``experts`` are peft-wrapped on gate_up_proj and down_proj through
    :func:`lora_experts`; a call that does not qualify (``_why_not``) runs peft's own forward. Returns
    (blocks patched, why some were not)."""
    patched, why = 0, ""
    for block in model.modules():
        outer = getattr(block, "experts", None)
        wrappers, experts = _wrapper_chain(outer)
        if not wrappers:
            continue
        reason = _why_not(wrappers, experts)
        if reason:
            why = why or reason
            continue
        original = outer.forward

        def forward(hidden_states, top_k_index, top_k_weights, *args, _wrappers=wrappers, _experts=experts,
                    _original=original, **kwargs):
            if args or kwargs or _why_not(_wrappers, _experts):
                return _original(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
            factors = {}
            for name, wrapper in _wrappers.items():
                adapter = next(a for a in wrapper.active_adapters if a in wrapper.lora_A)
                lhs, rhs, scaling = wrapper.get_delta_factors(adapter)
                factors[name] = (getattr(_experts, name), lhs, rhs, scaling)
            return lora_experts(hidden_states, top_k_index, top_k_weights, factors["gate_up_proj"],
                                factors["down_proj"], recompute)

        outer.forward = forward
        patched += 1
    return patched, why
