"""Seeded input helpers for suites: drawn on the CPU, then moved, so every device sees the same numbers."""

from __future__ import annotations

import torch
from twinbench.harness.core.case import torch_dtype


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def randn(shape, dtype: str | torch.dtype, device, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    dt = torch_dtype(dtype) if isinstance(dtype, str) else dtype
    return (torch.randn(tuple(shape), generator=gen, dtype=torch.float32) * scale).to(dt).to(device)


def elem_bytes(dtype: str) -> int:
    return torch.tensor([], dtype=torch_dtype(dtype)).element_size()
