"""The attention sub-block of a decoder layer as one autograd op that keeps almost nothing for backward.

``recomputed_attention(h, norm, attn, (cos, sin))`` computes ``o_proj(attention(rope(q/k/v(rms_norm(h)))))`` for a
Llama / Qwen3(-MoE) layer whose q/k/v/o are peft LoRA over bitsandbytes NF4 (causal, no mask, CPU):

- saved: the layer input ``h``, the attention output (it is also o_proj's input), the kernel's log-sum-exp,
  the rank-r ``x A^T`` of q/k/v and o, the adapters: ~2 [tokens, hidden] tensors instead of the ~7 that
  autograd keeps through the same ops (measured in docs/qlora.md: 0.98 MB of the 4.56 MB a llama step
  saves at seq 64);
- backward rebuilds the norm, q/k/v (one GEMM with the dequantised weight that dx needs anyway), the
  Qwen3 q/k norms and RoPE, then runs the fused kernel's own backward from the saved output and
  log-sum-exp, so neither SDPA nor o_proj is re-run (``torch.utils.checkpoint`` re-runs the whole block,
  which costs a tenth of the reference's step time and more: docs/qlora.md);
- the kernel is ATen's CPU flash attention (``_scaled_dot_product_flash_attention_for_cpu`` and its
  backward: the kernel ``F.scaled_dot_product_attention`` picks on the CPU for this causal case, GQA
  native). Other devices and masked batches take ``torch.utils.checkpoint`` (see ``qlora_recompute``).
"""

from __future__ import annotations

import torch
from twinbench.impls.qlora.nf4_lora import (
    bias_free,
    dequantized,
    lora_parts,
    rms_norm_backward,
    rms_norm_with_rstd,
)
from twinbench.reference.autograd_once import differentiable_once
from twinbench.reference.qlora.breakdown import scope

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def fusable_attention(norm, attn) -> bool:
    """Frozen RMSNorm before q/k/v/o, each a single dropout-free peft LoRA over a bias-free bnb NF4 layer,
    one rank for all four; no attention dropout, no sliding window; Qwen3's per-head q/k norms frozen."""
    try:
        layers = [getattr(attn, p) for p in PROJECTIONS]
        parts = [lora_parts(layer) for layer in layers]
        no_dropout = all(isinstance(layer.lora_dropout[layer.active_adapters[0]], torch.nn.Identity)
                         for layer in layers)
    except (AttributeError, IndexError, KeyError, TypeError):
        return False
    qk_norms = [getattr(attn, n) for n in ("q_norm", "k_norm") if hasattr(attn, n)]
    return (no_dropout and all(p[1] is not None and len(layer.active_adapters) == 1 and bias_free(layer)
                               for p, layer in zip(parts, layers))
            and len({p[2].shape[0] for p in parts}) == 1 and not getattr(attn, "attention_dropout", 0.0)
            and getattr(attn, "sliding_window", None) is None and hasattr(norm, "variance_epsilon")
            and not norm.weight.requires_grad
            and all(hasattr(n, "variance_epsilon") and not n.weight.requires_grad for n in qk_norms)
            and len({n.variance_epsilon for n in qk_norms}) <= 1)  # q and k are normalised in one call


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' ``apply_rotary_pos_emb`` on [B, S, heads, D] with cos/sin [B, S, 1, D]:
    ``x * cos + rotate_half(x) * sin`` with half-width temporaries instead of three full ones (the same
    products and sums: ``a + (-b) * s`` is ``a - b * s`` exactly)."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half] -= x[..., half:] * sin[..., :half]
    out[..., half:] += x[..., :half] * sin[..., half:]
    return out


def _rope_backward(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rotate_half is linear with transpose -rotate_half: ``grad * cos - rotate_half(grad * sin)``, written
    over ``grad`` (returned) with one temporary instead of four (the attention backward's peak at 100M:
    docs/qlora.md); the same products and sums, so the same numbers."""
    half = grad.shape[-1] // 2
    scaled = grad * sin
    grad.mul_(cos)
    grad[..., :half] += scaled[..., half:]  # - (-t2)
    grad[..., half:] -= scaled[..., :half]
    return grad


class _Layout:
    """Shapes of one call: batch, sequence, heads, KV heads, head dim, rank of each adapter."""

    def __init__(self, h: torch.Tensor, n_heads: int, n_kv: int, head_dim: int, rank: int):
        self.batch, self.seq = h.shape[0], h.shape[1]
        self.n_heads, self.n_kv, self.head_dim, self.rank = n_heads, n_kv, head_dim, rank
        q, kv = n_heads * head_dim, n_kv * head_dim
        self.cols = (q, kv, kv)  # q/k/v widths in the fused projection
        self.qk_cols = q + kv

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        """[tokens, n * D] -> [B, S, n, D] (a view)."""
        return t.view(self.batch, self.seq, -1, self.head_dim)

    def split_qk(self, qk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, S, H + KV, D] -> q [B, H, S, D], k [B, KV, S, D] (views: the kernel takes any strides)."""
        return qk[:, :, :self.n_heads].transpose(1, 2), qk[:, :, self.n_heads:].transpose(1, 2)


def _qkv(x, w_qkv, xa, lora, scalings, lay: _Layout) -> torch.Tensor:
    """[q | k | v] = x W^T + s_i (x A_i^T) B_i^T per column block."""
    out = x @ w_qkv.t()
    col = 0
    for i, width in enumerate(lay.cols):
        out[:, col:col + width].addmm_(xa[:, i * lay.rank:(i + 1) * lay.rank], lora[2 * i + 1].t(),
                                       alpha=scalings[i])
        col += width
    return out


def _qk_norm_weight(qk_norms, lay: _Layout) -> torch.Tensor:
    """Qwen3's q_norm and k_norm weights as one [H + KV, D] (q and k are normalised per head together)."""
    (w_q, _), (w_k, _) = qk_norms
    return torch.cat([w_q.expand(lay.n_heads, -1), w_k.expand(lay.n_kv, -1)])


def _rotated_qk(qkv, qk_norms, cos, sin, lay: _Layout):
    """q and k (one [B, S, H + KV, D] tensor) after the optional per-head norms and RoPE, computed once for
    both (half the ops of doing q and k apart); and the norms' (input, weight, 1/rms) for backward."""
    qk = lay.heads(qkv[:, :lay.qk_cols])
    normed = None
    if qk_norms is not None:
        weight = _qk_norm_weight(qk_norms, lay)
        y, rstd = rms_norm_with_rstd(qk, weight, qk_norms[0][1], qk.dtype)
        normed, qk = (qk, weight, rstd), y
    return _rope(qk, cos, sin), normed


class RecomputedAttention(torch.autograd.Function):
    """y = o(flash(rope(q(x)), rope(k(x)), v(x))), x = RMSNorm(h); LoRA on q/k/v/o over NF4 weights."""

    @staticmethod
    def forward(ctx, h, cos, sin, norm_weight, eps, qk_norms, nf4, scalings, shape, scale, project, *lora):
        # lora = A_q, B_q, A_k, B_k, A_v, B_v[, A_o, B_o]; shape = (heads, kv heads, head dim); ``project``
        # False: no o_proj (nor its adapters), the attention output [B, H, S, D] is returned (and kept)
        # GEMMs in the adapters' (bnb compute) dtype; norms, RoPE and attention in the residual stream's, as
        # the reference runs them (bnb and peft return their projections in their input's dtype; the CPU flash
        # kernel's bf16 backward is several times slower than its fp32 one: docs/qlora.md)
        dtype, act = lora[0].dtype, h.dtype
        lay = _Layout(h, *shape, rank=lora[0].shape[0])
        h2 = h.reshape(-1, h.shape[-1])
        cos, sin = cos.to(act).unsqueeze(2), sin.to(act).unsqueeze(2)  # [B, S, 1, D]
        x, _ = rms_norm_with_rstd(h2, norm_weight, eps, dtype)
        xa = x @ torch.cat(lora[0:6:2]).t()
        qkv = _qkv(x, dequantized(nf4[:3], dtype), xa, lora, scalings, lay).to(act)
        del x
        qk, _ = _rotated_qk(qkv, qk_norms, cos, sin, lay)
        q, k = lay.split_qk(qk)
        v = lay.heads(qkv[:, lay.qk_cols:]).transpose(1, 2)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        del q, k, v, qk, qkv
        ctx.nf4, ctx.scalings, ctx.eps, ctx.qk_norms, ctx.lay, ctx.scale = nf4, scalings, eps, qk_norms, lay, scale
        ctx.project = project
        if not project:
            ctx.save_for_backward(h, cos, sin, norm_weight, xa, out, lse, None, *lora)
            return out
        attn = out.transpose(1, 2).reshape(h2.shape[0], -1).to(dtype)  # [B, S, H, D] in memory: a view in fp32
        oa = attn @ lora[6].t()
        y = (attn @ dequantized(nf4[3:], dtype).t()).addmm_(oa, lora[7].t(), alpha=scalings[3])
        ctx.save_for_backward(h, cos, sin, norm_weight, xa, out, lse, oa, *lora)
        return y.view(*h.shape[:-1], y.shape[-1]).to(h.dtype)

    @staticmethod
    @differentiable_once("RecomputedAttention")  # the CPU flash kernel's backward has no derivative; in-place work
    def backward(ctx, grad_y):
        h, cos, sin, norm_weight, xa, out, lse, oa, *lora = ctx.saved_tensors
        lay, scalings, dtype, r = ctx.lay, ctx.scalings, lora[0].dtype, ctx.lay.rank
        h2 = h.reshape(-1, h.shape[-1])
        o_grads = []
        if ctx.project:
            a_o, b_o, s_o = lora[6], lora[7], scalings[3]
            gy = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
            attn = out.transpose(1, 2).reshape(h2.shape[0], -1).to(dtype)
            # o: y = attn W_o^T + s_o (attn A_o^T) B_o^T
            g_oa = torch.mm(gy, b_o).mul_(s_o)
            o_grads = [g_oa.t() @ attn, torch.mm(gy.t(), oa).mul_(s_o)]
            g_attn = (gy @ dequantized(ctx.nf4[3:], dtype)).addmm_(g_oa, a_o).to(h.dtype)
            g_out = lay.heads(g_attn).transpose(1, 2)
            del gy, g_oa, attn
        else:
            g_out = grad_y.to(h.dtype)
        # rebuild q/k/v, then the kernel's backward from its saved output and log-sum-exp
        # x and the dequantised weight are rebuilt again for dx rather than held across the kernel's
        # backward (the op's peak at 100M, docs/qlora.md): one norm and one dequantisation more
        x, _ = rms_norm_with_rstd(h2, norm_weight, ctx.eps, dtype)
        qkv = _qkv(x, dequantized(ctx.nf4[:3], dtype), xa, lora, scalings, lay).to(h.dtype)
        del x
        qk, normed = _rotated_qk(qkv, ctx.qk_norms, cos, sin, lay)
        q, k = lay.split_qk(qk)
        v = lay.heads(qkv[:, lay.qk_cols:]).transpose(1, 2)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            g_out, q, k, v, out, lse, 0.0, True, scale=ctx.scale)
        del q, k, v, qk, g_out
        # [dq | dk] through RoPE and the per-head norms at once, then [dq | dk | dv] as the projection's gradient
        # without q/k norms nothing reads the rebuilt q/k/v any more: their gradient takes the buffer (Qwen3's
        # norm backward still reads its input, a view of qkv)
        g_qkv = qkv if normed is None else torch.empty_like(qkv)
        del qkv
        g_qk = lay.heads(g_qkv[:, :lay.qk_cols])
        g_qk[:, :, :lay.n_heads] = dq.transpose(1, 2)
        g_qk[:, :, lay.n_heads:] = dk.transpose(1, 2)
        lay.heads(g_qkv[:, lay.qk_cols:]).copy_(dv.transpose(1, 2))
        del dq, dk, dv
        grad = _rope_backward(g_qk, cos, sin)
        if normed is not None:
            grad = rms_norm_backward(grad, *normed)
        if grad is not g_qk:
            g_qk.copy_(grad)
        del grad, normed, g_qk
        g_qkv = g_qkv.to(dtype)
        # q/k/v: [q | k | v] = x W^T + s_i (x A_i^T) B_i^T
        g_xa = g_qkv.new_empty((g_qkv.shape[0], 3 * r))
        grads, col = [], 0
        for i, width in enumerate(lay.cols):
            g_i, xa_i = g_qkv[:, col:col + width], xa[:, i * r:(i + 1) * r]
            g_xa[:, i * r:(i + 1) * r].addmm_(g_i, lora[2 * i + 1], beta=0, alpha=scalings[i])
            grads.append(torch.mm(g_i.t(), xa_i).mul_(scalings[i]))
            col += width
        del g_i  # a view: it would keep g_qkv alive
        grad_x = (g_qkv @ dequantized(ctx.nf4[:3], dtype)).addmm_(g_xa, torch.cat(lora[0:6:2]))
        del g_qkv
        x, rstd = rms_norm_with_rstd(h2, norm_weight, ctx.eps, dtype)
        grad_a = g_xa.t() @ x
        del x
        grad_h = rms_norm_backward(grad_x, h2, norm_weight, rstd).view(h.shape)
        lora_grads = [grad_a[:r], grads[0], grad_a[r:2 * r], grads[1], grad_a[2 * r:], grads[2], *o_grads]
        return (grad_h, None, None, None, None, None, None, None, None, None, None, *lora_grads)


def recomputed_attention(h: torch.Tensor, norm, attn, position_embeddings, project: bool = True) -> torch.Tensor:
    """``attn(norm(h))`` (causal, unmasked) through ``RecomputedAttention``, for a layer ``fusable_attention``
    accepted; ``project=False``: without o_proj, the attention output [B, H, S, D] (``RecomputedMLP`` then
    applies o_proj)."""
    parts = [lora_parts(getattr(attn, p)) for p in (PROJECTIONS if project else PROJECTIONS[:3])]
    lora = [t for p in parts for t in (p[2], p[3])]
    qk_norms = ([(n.weight, n.variance_epsilon) for n in (attn.q_norm, attn.k_norm)]
                if hasattr(attn, "q_norm") else None)
    cfg = attn.config
    shape = (cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim)
    cos, sin = position_embeddings
    with scope("attention"):
        return RecomputedAttention.apply(h, cos, sin, norm.weight, norm.variance_epsilon, qk_norms,
                                         [(p[0], p[1]) for p in parts], [p[4] for p in parts], shape, attn.scaling,
                                         project, *lora)
