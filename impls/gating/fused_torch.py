"""Ours, CPU-native and any device: the router in a few fused PyTorch ops.

``torch.topk`` does not promise which index wins a tie (on the CPU an all-zero row does not come back
as 0, 1, 2, ...: docs/moe.md). Probabilities are >= 0, so their fp32 bit patterns order like the values; packing
``bits << 16 | (65535 - index)`` into one int64 key makes every key unique, and ``topk`` on the keys is
the stable, lowest-index-wins selection, at topk's O(E) cost instead of a full sort.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from twinbench.harness.core.registry import register_impl
from twinbench.reference.moe import router_losses, softmax_dtype

_INDEX_BITS = 16


def lowest_index_topk(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Ids of the k largest probabilities per row; among equal values the lowest index wins."""
    if probs.shape[-1] >= 2**_INDEX_BITS:
        raise ValueError(f"at most {2**_INDEX_BITS - 1} experts")
    bits = probs.detach().float().view(torch.int32).to(torch.int64)
    index = torch.arange(probs.shape[-1], device=probs.device, dtype=torch.int64)
    key = (bits << _INDEX_BITS) | (2**_INDEX_BITS - 1 - index)
    return (2**_INDEX_BITS - 1) - (torch.topk(key, k, dim=-1).values & (2**_INDEX_BITS - 1))


@register_impl("gating", "fused_torch", tags=("ours",))
def fused_torch(hidden_states, router_weight, *, top_k, norm_topk_prob):
    logits = F.linear(hidden_states, router_weight)
    probs = torch.softmax(logits, dim=-1, dtype=softmax_dtype(logits.dtype))
    ids = lowest_index_topk(probs, top_k)
    weights = probs.gather(-1, ids)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    aux, z = router_losses(logits, probs, ids, router_weight.shape[0])
    return {"weights": weights.to(hidden_states.dtype), "ids": ids, "aux_loss": aux, "z_loss": z}
