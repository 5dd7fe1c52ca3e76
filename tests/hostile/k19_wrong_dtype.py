"""Item 19: a more precise answer in the wrong dtype (fp64 for an fp32 case)."""

import torch
from twinbench.harness.core.registry import register_impl


@register_impl("hostile", "wrong_dtype")
def wrong_dtype(x):
    y = x.double()
    return y * torch.sigmoid(y)
