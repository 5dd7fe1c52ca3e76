"""Order-balanced statistics of interleaved timing (numpy only: the gate's parent process imports no torch)."""

from __future__ import annotations

import numpy as np


def two_round_blocks(per_round: np.ndarray) -> np.ndarray:
    """Means of consecutive pairs of per-round values (rounds 0+1, 2+3, ...; an odd last round is left out).

    Interleaved timing alternates the order of the timed sides round by round (harness/core/timing.py's
    ``interleaved``, the gate's Pair.measure), and a sample taken right after another kernel's is slower (its caches were evicted):
    per-round log ratios then alternate around the truth by that order effect, and over an odd number of
    rounds their median is off by the whole effect, in favour of whoever went first more often
    (docs/method.md §2; measured 2026-12-06: ~30% on a one-call fwd+bwd sample with both workers on one CPU).
    Two consecutive rounds ran in opposite orders, so the mean of their log ratios cancels it, whatever its
    size."""
    blocks = per_round.size // 2
    return (per_round[0:2 * blocks:2] + per_round[1:2 * blocks:2]) / 2
