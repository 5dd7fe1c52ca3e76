"""Item 16: memory that is never written, where poisoning from Python does not reach.

Each impl first computes the right answer into a temporary and frees it, so the allocator hands the same
block back: the unwritten half then holds stale right values, and passes unless it is poisoned.
"""

import torch
from twinbench.harness.core.registry import register_impl


class _HalfBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        right = g * (s + x * s * (1 - s))
        del right
        out = torch.empty_like(g)
        half = g.shape[0] // 2
        out[:half] = (g * (s + x * s * (1 - s)))[:half]
        return out


@register_impl("hostile", "backward_unwritten")
def backward_unwritten(x):
    return _HalfBackward.apply(x)


@register_impl("hostile", "aten_empty_unwritten", backward=False)
def aten_empty_unwritten(x):
    with torch.no_grad():
        right = x * torch.sigmoid(x)
        del right
        out = torch.ops.aten.empty.memory_format(list(x.shape), dtype=x.dtype, device=x.device)
        half = x.shape[0] // 2
        out[:half] = (x * torch.sigmoid(x))[:half]
    return out
