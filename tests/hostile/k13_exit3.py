"""Item 13: log tails. One impl writes its last words and calls _exit(3): its reason quotes them. The next
runs in the fresh worker and exits without a word: its reason must not quote the dead worker's log."""

import os
import sys

from twinbench.harness.core.registry import register_impl

LAST_WORDS = "hostile-item13-last-words"


@register_impl("hostile", "exits_3")
def exits_3(x):
    print(LAST_WORDS, file=sys.stderr, flush=True)
    os._exit(3)


@register_impl("hostile", "exits_3_quietly")
def exits_3_quietly(x):
    os._exit(3)
