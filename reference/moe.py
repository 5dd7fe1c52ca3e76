"""Reference MoE pieces (transformers Qwen3-MoE semantics): the top-k router with its auxiliary losses,
and the sparse SwiGLU experts as a plain per-expert loop. Dtype-following: they compute in the inputs'
dtype (the router softmax in at least fp32), so the harness can run them upcast.

Rules this reference fixes (docs/method.md §1):
- top-k is a *stable* descending sort: among equal probabilities the lowest expert index wins.
- a token whose router probabilities are not all finite (NaN/Inf in its hidden state) keeps NaN weights;
  its ids are not defined (suites exclude them from the id comparison) and it is left out of the losses,
  which would otherwise be NaN for the whole batch and hide every finite token's gradient.
- aux loss (Switch Transformer, as transformers' ``load_balancing_loss_func``):
  ``E * sum_e f_e * P_e``, f_e = (token, slot) assignments to expert e / tokens (sums to top_k),
  P_e = mean router probability of expert e; router z-loss (ST-MoE): mean over tokens of logsumexp^2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """The router softmax runs in fp32 (transformers: ``softmax(..., dtype=float)``), or fp64 when upcast."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def router_losses(logits: torch.Tensor, probs: torch.Tensor, ids: torch.Tensor,
                  num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(aux_loss, z_loss) over the tokens whose probabilities are finite; both in the softmax dtype."""
    finite = torch.isfinite(probs).all(dim=-1)
    p, lg, sel = probs[finite], logits[finite].to(probs.dtype), ids[finite]
    tokens = max(int(finite.sum()), 1)
    counts = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device)
    counts.index_add_(0, sel.reshape(-1), torch.ones(sel.numel(), dtype=probs.dtype, device=probs.device))
    aux = num_experts * (counts / tokens * p.sum(0) / tokens).sum()
    z = torch.logsumexp(lg, dim=-1).square().sum() / tokens
    return aux, z


def gating(hidden_states: torch.Tensor, router_weight: torch.Tensor, *, top_k: int,
           norm_topk_prob: bool) -> dict[str, torch.Tensor]:
    """Router linear -> softmax (fp32) -> stable top-k -> optional renormalisation -> cast to the input dtype.

    hidden_states [T, H], router_weight [E, H]. Returns weights [T, k] (input dtype), ids [T, k] (int64),
    aux_loss and z_loss (scalars in the softmax dtype).
    """
    logits = F.linear(hidden_states, router_weight)
    probs = torch.softmax(logits, dim=-1, dtype=softmax_dtype(logits.dtype))
    order = torch.sort(probs, dim=-1, descending=True, stable=True).indices
    ids = order[:, :top_k]
    weights = probs.gather(-1, ids)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    aux, z = router_losses(logits, probs, ids, router_weight.shape[0])
    return {"weights": weights.to(hidden_states.dtype), "ids": ids, "aux_loss": aux, "z_loss": z}


def swiglu_expert(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert: down(silu(gate(x)) * up(x)); gate_up [2I, H] is [gate; up] stacked, down [H, I]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def moe_experts(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """Sparse SwiGLU experts, transformers-v5 layout: gate_up_proj [E, 2I, H], down_proj [E, H, I].

    Each token's output is the sum over its k routed experts of weight * expert(token), accumulated with
    ``index_add_`` in the input dtype, experts in index order (as transformers' eager loop does).
    """
    out = torch.zeros_like(hidden_states)
    # unbind, not gate_up_proj[e]: indexing would make autograd add a dense [E, 2I, H] zero tensor per expert
    for e, (gate_up, down) in enumerate(zip(gate_up_proj.unbind(0), down_proj.unbind(0))):
        token, slot = torch.where(top_k_index == e)
        if token.numel() == 0:
            continue
        y = swiglu_expert(hidden_states[token], gate_up, down)
        out.index_add_(0, token, y * top_k_weights[token, slot, None])
    return out
