"""Item 17: an impl that computes once and returns that output for every later input."""

import torch
from twinbench.harness.core.registry import register_impl

_CACHE: dict = {}


@register_impl("hostile", "stale_cache", backward=False)
def stale_cache(x):
    key = (tuple(x.shape), x.dtype)
    if key not in _CACHE:
        with torch.no_grad():
            _CACHE[key] = x * torch.sigmoid(x)
    return _CACHE[key].clone()
