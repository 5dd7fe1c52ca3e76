"""Reference attention: softmax(Q K^T * scale) V, with bottom-right causal mask and GQA/MQA."""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

# Bytes of one query block's score matrix [B, Hq, rows, Sk]. The full attention grid's fp32 reference
# (b=8, h=32, s=4096) would hold several 17 GB score tensors at once (scores, probabilities, their copies for
# backward): out of memory on 80 GB cards. Row blocks are independent (softmax is per row), so computing
# them one at a time is the same math with a bounded footprint.
SCORE_BLOCK_BYTES = 512 * 2**20


def query_block_rows(q: torch.Tensor, seq_k: int, block_bytes: int = SCORE_BLOCK_BYTES) -> int:
    """Query rows per block so that one block's scores [B, Hq, rows, Sk] stay within ``block_bytes``."""
    b, hq, sq, _ = q.shape
    per_row = b * hq * seq_k * q.element_size()
    return max(1, min(sq, block_bytes // max(per_row, 1)))


def _attention_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_row: int, causal: bool,
                    scale: float, seq_q: int) -> torch.Tensor:
    """Output rows first_row .. first_row + len(q) of the whole attention (k, v already per query head)."""
    sk = k.shape[2]
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if causal:
        i = torch.arange(first_row, first_row + q.shape[2], device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        scores = scores.masked_fill(j > i + (sk - seq_q), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # fully masked rows: no key visible -> zero output
    return torch.matmul(probs, v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: float | None = None, block_bytes: int = SCORE_BLOCK_BYTES) -> torch.Tensor:
    """q: [B, Hq, Sq, D]; k, v: [B, Hkv, Sk, D] with Hq a multiple of Hkv. Computes in the inputs' dtype.

    The causal mask is aligned bottom-right (query i sees keys j <= i + Sk - Sq), as flash-attention does
    when seq_q != seq_k; a query row that sees no key outputs zeros. Query rows are processed in blocks whose
    scores fit ``block_bytes``; under autograd each block is recomputed in backward (checkpoint), so the
    backward too holds one block's scores at a time.
    """
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads {hq} not a multiple of kv heads {hkv}")
    if hq != hkv:  # GQA/MQA: each kv head serves hq // hkv consecutive query heads
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    rows = query_block_rows(q, sk, block_bytes)
    if rows >= sq:
        return _attention_rows(q, k, v, 0, causal, scale, sq)
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    blocks = []
    for start in range(0, sq, rows):
        q_rows = q[:, :, start:start + rows]
        if recompute:
            blocks.append(checkpoint(_attention_rows, q_rows, k, v, start, causal, scale, sq, use_reentrant=False))
        else:
            blocks.append(_attention_rows(q_rows, k, v, start, causal, scale, sq))
    return torch.cat(blocks, dim=2)
