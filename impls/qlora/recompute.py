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

The residual adds stay outside (they save nothing).
"""

from __future__ import annotations

import types
from collections.abc import Iterable

import torch
from torch.utils.checkpoint import checkpoint
from twinbench.impls.qlora.attention_op import fusable_attention, recomputed_attention
from twinbench.impls.qlora.nf4_lora import (
    bias_free,
    dequantized,
    lora_parts,
    rms_norm_backward,
    rms_norm_with_rstd,
)
from twinbench.reference.qlora.breakdown import scope

BLOCKS = ("attn", "mlp", "dense_mlp")


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
    if "attn" not in recompute:
        h = h + attn(h)
    elif self._twinbench_fused_attn and attention_mask is None and h.device.type == "cpu" and not use_cache:
        h = h + recomputed_attention(h, self.input_layernorm, self.self_attn, position_embeddings)
    else:
        h = h + checkpoint(attn, h, use_reentrant=False)
    fused = getattr(self, "_twinbench_fused_mlp", False)
    if fused and ("mlp" in recompute or "dense_mlp" in recompute):
        return h + recomputed_mlp(h, self.post_attention_layernorm, self.mlp)
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


def _gate_up(x: torch.Tensor, w_gu: torch.Tensor, xa: torch.Tensor, lora, scalings, inter: int, rank: int):
    """[gate | up] = x W^T + s (x A^T) B^T per half (adapters accumulated into their column block)."""
    out = x @ w_gu.t()
    out[:, :inter].addmm_(xa[:, :rank], lora[1].t(), alpha=scalings[0])
    out[:, inter:].addmm_(xa[:, rank:], lora[3].t(), alpha=scalings[1])
    return out


class RecomputedMLP(torch.autograd.Function):
    """y = down(silu(gate(x)) * up(x)), x = RMSNorm(h), LoRA on gate/up/down over NF4 weights.

    Saved: h, the rank-r ``x A^T`` of gate/up and ``act A_d^T`` of down, the adapters. Backward rebuilds x,
    [gate | up] (one GEMM with the dequantised weight it needs for dx anyway) and the activation."""

    @staticmethod
    def forward(ctx, h, norm_weight, eps, nf4, scalings, *lora):  # lora = A_g, B_g, A_u, B_u, A_d, B_d
        dtype, inter, rank = lora[0].dtype, lora[1].shape[0], lora[0].shape[0]
        h2 = h.reshape(-1, h.shape[-1])
        x, _ = rms_norm_with_rstd(h2, norm_weight, eps, dtype)
        with scope("lora"):
            xa = x @ torch.cat([lora[0], lora[2]]).t()
        gate_up = _gate_up(x, dequantized(nf4[:2], dtype), xa, lora, scalings, inter, rank)
        act = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        del gate_up
        with scope("lora"):
            act_a = act @ lora[4].t()
        y = (act @ dequantized(nf4[2:], dtype).t()).addmm_(act_a, lora[5].t(), alpha=scalings[2])
        ctx.nf4, ctx.scalings, ctx.eps, ctx.dims = nf4, scalings, eps, (inter, rank)
        ctx.save_for_backward(h, norm_weight, xa, act_a, *lora)
        return y.view(*h.shape[:-1], y.shape[-1]).to(h.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        h, norm_weight, xa, act_a, a_g, b_g, a_u, b_u, a_d, b_d = ctx.saved_tensors
        (inter, rank), (s_g, s_u, s_d), dtype = ctx.dims, ctx.scalings, a_g.dtype
        h2 = h.reshape(-1, h.shape[-1])
        gy = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
        x, _ = rms_norm_with_rstd(h2, norm_weight, ctx.eps, dtype)
        gate_up = _gate_up(x, dequantized(ctx.nf4[:2], dtype), xa, (a_g, b_g, a_u, b_u), ctx.scalings, inter, rank)
        del x  # rebuilt at the end: one norm is cheaper than holding it across the peak
        gate, up = gate_up[:, :inter], gate_up[:, inter:]
        silu_gate = torch.nn.functional.silu(gate)
        # down: y = act W_d^T + s_d (act A_d^T) B_d^T
        g_act_a = torch.mm(gy, b_d).mul_(s_d)
        grad_b_d = torch.mm(gy.t(), act_a).mul_(s_d)
        grad_a_d = g_act_a.t() @ (silu_gate * up)
        g_act = (gy @ dequantized(ctx.nf4[2:], dtype)).addmm_(g_act_a, a_d)
        # act = silu(gate) * up; each gradient overwrites a buffer that is no longer needed (the op's peak:
        # [gate | up], silu(gate) and g_act, measured)
        g_up = silu_gate.mul_(g_act)
        g_gate = torch.ops.aten.silu_backward.grad_input(g_act.mul_(up), gate, grad_input=gate)
        del g_act, up
        # gate/up: [gate | up] = x W^T + s (x A^T) B^T per half; the weight dequantised again rather than
        # held across the peak, one weight at a time
        g_xa_g, g_xa_u = torch.mm(g_gate, b_g).mul_(s_g), torch.mm(g_up, b_u).mul_(s_u)
        grad_b_g = torch.mm(g_gate.t(), xa[:, :rank]).mul_(s_g)
        grad_b_u = torch.mm(g_up.t(), xa[:, rank:]).mul_(s_u)
        grad_x = g_gate @ dequantized(ctx.nf4[:1], dtype)  # one weight at a time: no concatenated copy
        grad_x.addmm_(g_up, dequantized(ctx.nf4[1:2], dtype)).addmm_(g_xa_g, a_g).addmm_(g_xa_u, a_u)
        del g_gate, g_up, gate_up, gate
        x, rstd = rms_norm_with_rstd(h2, norm_weight, ctx.eps, dtype)
        grad_a_g, grad_a_u = g_xa_g.t() @ x, g_xa_u.t() @ x
        grad_h = rms_norm_backward(grad_x, h2, norm_weight, rstd).view(h.shape)
        return (grad_h, None, None, None, None, grad_a_g, grad_b_g, grad_a_u, grad_b_u, grad_a_d, grad_b_d)


def recomputed_mlp(h: torch.Tensor, norm, mlp) -> torch.Tensor:
    """``mlp(norm(h))`` through ``RecomputedMLP`` (a layer ``_fusable_mlp`` accepted)."""
    parts = [lora_parts(getattr(mlp, p)) for p in ("gate_proj", "up_proj", "down_proj")]
    lora = [t for p in parts for t in (p[2], p[3])]
    with scope("mlp_experts"):
        return RecomputedMLP.apply(h, norm.weight, norm.variance_epsilon, [(p[0], p[1]) for p in parts],
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
