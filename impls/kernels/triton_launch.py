"""Launch-side choices shared by our Triton kernels (plain Python: importing this never imports triton)."""

from __future__ import annotations

import torch

DOT_MIN_DIM = 16  # tl.dot wants every dimension >= 16


def dot_dim(n: int) -> int:
    """The block size that holds ``n`` along a ``tl.dot`` dimension: a power of two, at least DOT_MIN_DIM."""
    return max(DOT_MIN_DIM, 1 << max(0, n - 1).bit_length())


def dot_input_precision(dtype: torch.dtype) -> str | None:
    """``input_precision`` of our ``tl.dot`` calls: fp32 inputs must not be rounded to tf32 on tensor cores
    (parity compares against an fp64 reference, docs/method.md §1); 16-bit inputs take the backend's default
    (naming "tf32" would be rejected by AMD backends other than gfx942)."""
    return "ieee" if dtype == torch.float32 else None
