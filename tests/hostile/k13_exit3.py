"""Item 13: log tails. A noisy impl; one that writes its last words and calls _exit(3) (its reason shows
those); then, in the fresh worker, one that exits quietly: its reason must not quote the dead worker's log."""

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


@register_impl("hostile", "exits_3_quietly")
def exits_3_quietly(x):
    os._exit(3)
