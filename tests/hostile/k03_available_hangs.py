"""Item 3: availability and support checks that hang or kill their process."""

import os
import time

import torch
from twinbench.harness.core.registry import register_impl


def _hang(*_):
    time.sleep(10_000)
    return True, ""


def _abort(*_):
    os.abort()


@register_impl("hostile", "available_hangs", available=_hang)
def available_hangs(x):
    return x * torch.sigmoid(x)


@register_impl("hostile", "supports_hangs", supports=_hang)
def supports_hangs(x):
    return x * torch.sigmoid(x)


@register_impl("hostile", "available_aborts", available=_abort)
def available_aborts(x):
    return x * torch.sigmoid(x)
