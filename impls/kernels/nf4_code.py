"""bitsandbytes' NF4 code table as our NF4 kernels read it: a leaf module (it imports no other kernel module).

Kept here rather than imported from reference/, so that the impls and the reference they are judged against
do not share a table: a wrong value on either side is caught (docs/method.md §1). The Triton kernels
(nf4_triton.py) spell the same 16 values out as a select tree.
"""

from __future__ import annotations

import functools

import torch

NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


@functools.cache
def nf4_table(device: str) -> torch.Tensor:
    """NF4_CODE as a contiguous fp32 tensor on ``device`` (one per device, shared: never write to it)."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
