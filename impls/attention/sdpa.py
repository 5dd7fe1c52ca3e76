"""PyTorch scaled_dot_product_attention (each backend's fused kernel; the CPU-native fast path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from twinbench.harness.core.registry import register_impl


def causal_mask(sq: int, sk: int, device) -> torch.Tensor:
    """Boolean bottom-right causal mask (True = attend); SDPA's is_causal is top-left when sq != sk."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return j <= i + (sk - sq)


@register_impl("attention", "sdpa", tags=("library",))
def sdpa(q, k, v, *, causal, scale):
    sq, sk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if causal and sq != sk:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(sq, sk, q.device), scale=scale,
                                              enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
