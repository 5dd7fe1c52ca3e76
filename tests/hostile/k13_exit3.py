"""Item 13: a noisy impl, then one that writes its last words and calls _exit(3): the reason shows those."""

import os
import sys

import torch
from twinbench.harness.core.registry import register_impl

LAST_WORDS = "hostile-item13-last-words"


@register_impl("hostile", "noisy")
def noisy(x):
    for _ in range(50):
        print("hostile-item13-earlier-noise", file=sys.stderr)
    return x * torch.sigmoid(x)


@register_impl("hostile", "exits_3")
def exits_3(x):
    print(LAST_WORDS, file=sys.stderr, flush=True)
    os._exit(3)
