"""Selective activation recomputation for the patched QLoRA loop: checkpoint decoder sub-blocks, not layers.

The reference checkpoints whole decoder layers (only each layer's input is kept; backward re-runs the whole
layer). ``patch_decoder_layers(model, blocks)`` replaces each decoder layer's forward with the same residual
structure in which the chosen sub-blocks run under ``torch.utils.checkpoint`` (non-reentrant):

- ``"mlp"``: post-attention RMSNorm + MLP (or MoE block). Kept: the residual stream entering it. Dropped:
  the norm output, the gate/up output and the SwiGLU activation (the largest saved tensors of the layer,
  measured in docs/qlora.md). A dense SwiGLU MLP with LoRA over NF4 on gate/up/down runs as one autograd op
  (``RecomputedMLP``) whose backward rebuilds only norm, gate/up and SiLU (not the down projection, whose
  output backward never needs) and dequantises gate/up again for dx rather than hold them across its peak;
  other MLPs (MoE) go through checkpoint.
- ``"dense_mlp"``: like ``"mlp"`` where ``RecomputedMLP`` applies, nothing elsewhere (measured: checkpointing
  the MoE block costs time and saves little, its experts' LoRA op already rebuilds its activations).
- ``"attn"``: input RMSNorm + attention (q/k/v, RoPE, SDPA, o). On the CPU, unmasked and with LoRA over NF4
  on q/k/v/o, as one op (``impls.qlora_attention_op``) that keeps the layer input, the attention output and
  its log-sum-exp and in backward rebuilds only norm, q/k/v and RoPE; elsewhere under checkpoint (kept: the
  layer input; backward re-runs the block).

- ``"attn_out"``: with ``"attn"`` and ``"mlp"``/``"dense_mlp"`` both running as their ops, the attention's
  output projection moves from the attention op into the MLP op, which then keeps the attention output
  (the attention op keeps that storage anyway) instead of the residual stream between the sub-blocks and
  rebuilds that residual in backward: one [tokens, hidden] tensor less per layer for one o_proj GEMM more
  (docs/qlora.md, the 100M section). Elsewhere it changes nothing.

The residual adds stay outside the checkpointed blocks (they save nothing); ``RecomputedMLP`` does its own.
"""

from __future__ import annotations

import types
from collections.abc import Iterable

import torch
from torch.utils.checkpoint import checkpoint
from twinbench.impls.qlora.attention_op import fusable_attention, recomputed_attention
from twinbench.impls.qlora.nf4_lora import (
    NF4Panels,
    bias_free,
    dequantized,
    lora_parts,
    panel_bounds,
    rms_norm_backward,
    rms_norm_with_rstd,
)
from twinbench.reference.autograd_once import differentiable_once
from twinbench.reference.qlora.breakdown import scope

BLOCKS = ("attn", "mlp", "dense_mlp", "attn_out")


def _selective_forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                       use_cache=False, position_embeddings=None, **kwargs):
    """Llama / Qwen3-MoE decoder-layer forward with ``self._twinbench_recompute`` sub-blocks checkpointed."""
    recompute = self._twinbench_recompute if self.training else ()

    def attn(h):
        out, _ = self.self_attn(hidden_states=self.input_layernorm(h), attention_mask=attention_mask,
                                position_ids=position_ids, cache=cache, use_cache=use_cache,
                                position_embeddings=position_embeddings, **kwargs)
        return out

    def mlp(h):
        return self.mlp(self.post_attention_layernorm(h))

    h = hidden_states
    fused_mlp = getattr(self, "_twinbench_fused_mlp", False) and ("mlp" in recompute or "dense_mlp" in recompute)
    fused_attn = ("attn" in recompute and self._twinbench_fused_attn and attention_mask is None
                  and h.device.type == "cpu" and not use_cache)
    if fused_attn and fused_mlp and "attn_out" in recompute:  # o_proj moves into the MLP op
        out = recomputed_attention(h, self.input_layernorm, self.self_attn, position_embeddings, project=False)
        return recomputed_mlp(h, self.post_attention_layernorm, self.mlp, out, self.self_attn.o_proj)
    if "attn" not in recompute:
        h = h + attn(h)
    elif fused_attn:
        h = h + recomputed_attention(h, self.input_layernorm, self.self_attn, position_embeddings)
    else:
        h = h + checkpoint(attn, h, use_reentrant=False)
    if fused_mlp:
        return recomputed_mlp(h, self.post_attention_layernorm, self.mlp)
    return h + (checkpoint(mlp, h, use_reentrant=False) if "mlp" in recompute else mlp(h))


# ---------------------------------------------------------------- the dense MLP as one op


def _fusable_mlp(norm, mlp) -> bool:
    """RMSNorm with a frozen weight, then SiLU-gated gate/up/down, each a single peft LoRA over a bias-free
    bnb NF4 layer without dropout (the op has neither)."""
    names = ("gate_proj", "up_proj", "down_proj")
    try:
        parts = [lora_parts(getattr(mlp, p)) for p in names]
        no_dropout = all(isinstance(getattr(mlp, n).lora_dropout[getattr(mlp, n).active_adapters[0]],
                                    torch.nn.Identity) for n in names)
    except (AttributeError, IndexError, KeyError, TypeError):
        return False
    return (no_dropout and all(p[1] is not None and len(getattr(mlp, n).active_adapters) == 1
                               and bias_free(getattr(mlp, n)) for p, n in zip(parts, names))
            and type(mlp.act_fn).__name__ in ("SiLU", "SiLUActivation")
            and hasattr(norm, "variance_epsilon") and not norm.weight.requires_grad)


# The MLP runs its intermediate dimension in column panels of at most this many [tokens, panel] elements
# (2^19 fp32 = 2 MB; llama 100M: 6 panels of 512 for 1024 tokens): its gate/up/SiLU working set and the
# dequantised weights it multiplies by are then a panel's, not the whole [tokens, intermediate] and
# [intermediate, hidden] (docs/qlora.md, the 100M section). Same FLOPs; only the GEMMs' shapes change.
PANEL_ELEMENTS = 1 << 19


def _panel(x, w_gate, w_up, xa, lora, scalings, c0: int, c1: int, rank: int):
    """gate and up columns [c0, c1): x W^T + s (x A^T) B[c0:c1]^T each."""
    gate = (x @ w_gate.t()).addmm_(xa[:, :rank], lora[1][c0:c1].t(), alpha=scalings[0])
    up = (x @ w_up.t()).addmm_(xa[:, rank:], lora[3][c0:c1].t(), alpha=scalings[1])
    return gate, up


def _panels(inter: int, tokens: int, weights: list[NF4Panels]) -> list[tuple[int, int]]:
    """The intermediate dimension's panels; one (the whole weights) unless every weight can be cut and the
    GEMMs run in fp32: in bf16/fp16 the down projection and dx, summed panel by panel in place, would be
    rounded to the short mantissa once per panel, where one GEMM accumulates in fp32 and rounds once."""
    if weights[0].dtype != torch.float32 or not all(w.panelable for w in weights):
        return [(0, inter)]
    return panel_bounds(inter, tokens, weights[0].block, PANEL_ELEMENTS)


def _out_projection(attn2, nf4_o, oa, b_o, s_o, dtype):
    """o(attn) = attn W_o^T + s_o (attn A_o^T) B_o^T, the weight dequantised for this call only."""
    return (attn2 @ dequantized(nf4_o, dtype).t()).addmm_(oa, b_o.t(), alpha=s_o)


class RecomputedMLP(torch.autograd.Function):
    """out = h1 + down(silu(gate(x)) * up(x)), x = RMSNorm(h1), LoRA on gate/up/down over NF4 weights; with
    ``attn`` given, h1 = h + o(attn) (the attention's output projection, LoRA over NF4 too), else h1 = h.

    Saved: h (and attn: the attention op keeps the same storage), the rank-r ``x A^T`` of gate/up, ``act
    A_d^T`` of down and ``attn A_o^T``, the adapters. Backward rebuilds h1 (one o GEMM), x, gate/up and the
    activation. Both directions run the intermediate dimension in panels (``PANEL_ELEMENTS``), each
    dequantising only its rows of W_gate/W_up and columns of W_down (``NF4Panels``)."""

    @staticmethod
    def forward(ctx, h, attn, norm_weight, eps, nf4, scalings, *lora):
        # lora = A_g, B_g, A_u, B_u, A_d, B_d[, A_o, B_o]; nf4 and scalings: gate, up, down[, o]
        dtype, inter, rank = lora[0].dtype, lora[1].shape[0], lora[0].shape[0]
        h2 = h.reshape(-1, h.shape[-1])
        oa = None
        if attn is not None:
            attn2 = attn.transpose(1, 2).reshape(h2.shape[0], -1).to(dtype)  # [B, S, H, D] memory: a view
            with scope("attention"):
                oa = attn2 @ lora[6].t()
                h2 = h2 + _out_projection(attn2, nf4[3:], oa, lora[7], scalings[3], dtype).to(h.dtype)
            del attn2
        x, _ = rms_norm_with_rstd(h2, norm_weight, eps, dtype)
        with scope("lora"):
            xa = x @ torch.cat([lora[0], lora[2]]).t()
        w_gate, w_up, w_down = (NF4Panels(w, dtype) for w in nf4[:3])
        act_a = x.new_zeros((x.shape[0], lora[4].shape[0]))
        y = None
        for c0, c1 in _panels(inter, x.shape[0], [w_gate, w_up, w_down]):
            gate, up = _panel(x, w_gate.rows(c0, c1), w_up.rows(c0, c1), xa, lora, scalings, c0, c1, rank)
            act = torch.nn.functional.silu(gate, inplace=True).mul_(up)
            del gate, up
            with scope("lora"):
                act_a.addmm_(act, lora[4][:, c0:c1].t())
            w_d = w_down.cols(c0, c1)
            y = act @ w_d.t() if y is None else y.addmm_(act, w_d.t())
            del act, w_d
        y.addmm_(act_a, lora[5].t(), alpha=scalings[2])
        ctx.nf4, ctx.scalings, ctx.eps = nf4, scalings, eps
        ctx.fused_o = attn is not None
        ctx.save_for_backward(h, attn, norm_weight, xa, act_a, oa, *lora)
        return (h2 + y.to(h.dtype)).view(h.shape)

    @staticmethod
    @differentiable_once("RecomputedMLP")  # in-place GEMMs into buffers, NF4 weights rebuilt outside autograd
    def backward(ctx, grad_out):
        h, attn, norm_weight, xa, act_a, oa, *lora = ctx.saved_tensors
        a_g, b_g, a_u, b_u, a_d, b_d = lora[:6]
        scalings, dtype, inter, rank = ctx.scalings, a_g.dtype, b_g.shape[0], a_g.shape[0]
        s_g, s_u, s_d = scalings[:3]
        h2 = h.reshape(-1, h.shape[-1])
        attn2 = None
        if ctx.fused_o:  # rebuild the residual entering the MLP: h1 = h + o(attn)
            attn2 = attn.transpose(1, 2).reshape(h2.shape[0], -1).to(dtype)
            with scope("attention"):
                h2 = h2 + _out_projection(attn2, ctx.nf4[3:], oa, lora[7], scalings[3], dtype).to(h.dtype)
        gy = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
        x, rstd = rms_norm_with_rstd(h2, norm_weight, ctx.eps, dtype)
        w_gate, w_up, w_down = (NF4Panels(w, dtype) for w in ctx.nf4[:3])
        # down: y = act W_d^T + s_d (act A_d^T) B_d^T
        g_act_a = torch.mm(gy, b_d).mul_(s_d)
        grad_b_d = torch.mm(gy.t(), act_a).mul_(s_d)
        grad_a_d = a_d.new_empty(a_d.shape)
        grad_b_g, grad_b_u = b_g.new_empty(b_g.shape), b_u.new_empty(b_u.shape)
        g_xa = xa.new_zeros(xa.shape)  # the gradient reaching [x A_g^T | x A_u^T]
        grad_x = None
        for c0, c1 in _panels(inter, x.shape[0], [w_gate, w_up, w_down]):
            wg, wu = w_gate.rows(c0, c1), w_up.rows(c0, c1)
            gate, up = _panel(x, wg, wu, xa, (a_g, b_g, a_u, b_u), scalings, c0, c1, rank)
            silu_gate = torch.nn.functional.silu(gate)
            grad_a_d[:, c0:c1] = g_act_a.t() @ (silu_gate * up)
            g_act = (gy @ w_down.cols(c0, c1)).addmm_(g_act_a, a_d[:, c0:c1])
            # act = silu(gate) * up; each gradient overwrites a buffer that is no longer needed
            g_up = silu_gate.mul_(g_act)
            g_gate = torch.ops.aten.silu_backward.grad_input(g_act.mul_(up), gate, grad_input=gate)
            del g_act, up, silu_gate
            # gate/up: [gate | up] = x W^T + s (x A^T) B^T per half
            g_xa[:, :rank].addmm_(g_gate, b_g[c0:c1], alpha=s_g)
            g_xa[:, rank:].addmm_(g_up, b_u[c0:c1], alpha=s_u)
            grad_b_g[c0:c1] = torch.mm(g_gate.t(), xa[:, :rank]).mul_(s_g)
            grad_b_u[c0:c1] = torch.mm(g_up.t(), xa[:, rank:]).mul_(s_u)
            grad_x = g_gate @ wg if grad_x is None else grad_x.addmm_(g_gate, wg)
            grad_x.addmm_(g_up, wu)
            del g_gate, g_up, gate, wg, wu
        grad_x.addmm_(g_xa[:, :rank], a_g).addmm_(g_xa[:, rank:], a_u)
        grad_a_g, grad_a_u = g_xa[:, :rank].t() @ x, g_xa[:, rank:].t() @ x
        del x
        grad_h = grad_out + rms_norm_backward(grad_x, h2, norm_weight, rstd).view(h.shape)
        grads = [grad_a_g, grad_b_g, grad_a_u, grad_b_u, grad_a_d, grad_b_d]
        grad_attn = None
        if ctx.fused_o:  # o: h1 = h + attn W_o^T + s_o (attn A_o^T) B_o^T
            a_o, b_o, s_o = lora[6], lora[7], scalings[3]
            g = grad_h.reshape(-1, grad_h.shape[-1]).to(dtype)
            with scope("attention"):
                g_oa = torch.mm(g, b_o).mul_(s_o)
                grads += [g_oa.t() @ attn2, torch.mm(g.t(), oa).mul_(s_o)]
                grad_attn = (g @ dequantized(ctx.nf4[3:], dtype)).addmm_(g_oa, a_o)
            b, s, heads, d = attn.shape[0], attn.shape[2], attn.shape[1], attn.shape[3]
            grad_attn = grad_attn.to(attn.dtype).view(b, s, heads, d).transpose(1, 2)
        return (grad_h, grad_attn, None, None, None, None, *grads)


def recomputed_mlp(h: torch.Tensor, norm, mlp, attn: torch.Tensor | None = None, o_proj=None) -> torch.Tensor:
    """``h1 + mlp(norm(h1))`` through ``RecomputedMLP`` (a layer ``_fusable_mlp`` accepted); h1 = h, or with
    ``attn`` (the attention output, [B, H, S, D]) and its ``o_proj``, h1 = h + o_proj(attn)."""
    parts = [lora_parts(getattr(mlp, p)) for p in ("gate_proj", "up_proj", "down_proj")]
    if attn is not None:
        parts.append(lora_parts(o_proj))
    lora = [t for p in parts for t in (p[2], p[3])]
    with scope("mlp_experts"):
        return RecomputedMLP.apply(h, attn, norm.weight, norm.variance_epsilon, [(p[0], p[1]) for p in parts],
                                   [p[4] for p in parts], *lora)


def patch_decoder_layers(model, blocks: Iterable[str]) -> int:
    """Install the selective forward on every decoder layer (input/post-attention norms, self_attn, mlp);
    returns how many were patched."""
    chosen = tuple(blocks)
    unknown = [b for b in chosen if b not in BLOCKS]
    if unknown:
        raise ValueError(f"unknown recompute blocks {unknown}; choose from {BLOCKS}")
    n = 0
    for module in model.modules():
        if all(hasattr(module, a) for a in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")):
            module._twinbench_recompute = chosen
            module._twinbench_fused_mlp = _fusable_mlp(module.post_attention_layernorm, module.mlp)
            module._twinbench_fused_attn = fusable_attention(module.input_layernorm, module.self_attn)
            module.forward = types.MethodType(_selective_forward, module)
            n += 1
    return n
