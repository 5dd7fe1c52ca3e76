"""Item 22: one NaN where the reference is finite: the reason must say so."""

import torch
from twinbench.harness.core.registry import register_impl


@register_impl("hostile", "nan_output")
def nan_output(x):
    y = x * torch.sigmoid(x)
    return torch.where(torch.arange(y.numel()).view(y.shape) == 5, torch.full_like(y, float("nan")), y)
