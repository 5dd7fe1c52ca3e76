"""Item 2: an impl that changes torch's global state, and a canary after it that sees any leak.

The canary answers wrongly (2x) when the state differs from the one the reference first ran under in this worker.
"""

import os

import torch
from twinbench.harness.core.registry import register_impl


def _state() -> str:
    import json

    return json.dumps([torch.get_num_threads(), str(torch.get_default_dtype()), torch.backends.mkldnn.enabled,
                       torch.are_deterministic_algorithms_enabled()])


@register_impl("hostile", "state_leaker", deterministic=False)
def state_leaker(x):
    y = x * torch.sigmoid(x)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    torch.backends.mkldnn.enabled = False
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(1234)
    return y


@register_impl("hostile", "state_canary")
def state_canary(x):
    y = x * torch.sigmoid(x)
    return y if _state() == os.environ.get("HOSTILE_STATE") else 2 * y
