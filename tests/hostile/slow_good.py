"""Right but slow (0.4 s a call): gives time to interrupt a run, or to start a second one beside it."""

import time

import torch
from twinbench.harness.core.registry import register_impl


@register_impl("hostile", "slow_good")
def slow_good(x):
    time.sleep(0.4)
    return x * torch.sigmoid(x)
