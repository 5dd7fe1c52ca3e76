"""What a training loop hands back: the outputs another loop is compared on, and what it measured itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LoopOutcome:
    """``outputs``: tensors judged against the reference loop's (curves, gradients, counts);
    ``metrics``: JSON-serialisable numbers the loop measured (step time, peak memory...), recorded as-is."""

    outputs: dict[str, torch.Tensor]
    metrics: dict[str, Any] = field(default_factory=dict)
