"""Item 12: an impl that returns one row too few: wrong, not crashed."""

import torch
from twinbench.harness.core.registry import register_impl


@register_impl("hostile", "wrong_shape")
def wrong_shape(x):
    return (x * torch.sigmoid(x))[:-1]
