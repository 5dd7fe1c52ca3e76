"""Item 16: memory that is never written, allocated where poisoning from Python does not reach.

Each impl writes only the first half of its output (or gradient). The other half holds whatever the
allocator had, sometimes the right values of a just-freed temporary; only the harness's poison makes it
fail for the right reason, so the test asserts the poison's verdict ("non-finite ... unwritten").
"""

import torch
from twinbench.harness.core.registry import register_impl


def _silu_grad(x, g):
    s = torch.sigmoid(x)
    return g * (s + x * s * (1 - s))


class _HalfBackward(torch.autograd.Function):
    """torch.empty_like inside a custom backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        out = torch.empty_like(g)
        half = g.shape[0] // 2
        out[:half] = _silu_grad(x, g)[:half]
        return out


class _HalfAtenBackward(torch.autograd.Function):
    """aten.empty_like called directly inside a custom backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        out = torch.ops.aten.empty_like.default(g)
        half = g.shape[0] // 2
        out[:half] = _silu_grad(x, g)[:half]
        return out


@register_impl("hostile", "backward_unwritten")
def backward_unwritten(x):
    return _HalfBackward.apply(x)


@register_impl("hostile", "aten_backward_unwritten")
def aten_backward_unwritten(x):
    return _HalfAtenBackward.apply(x)


@register_impl("hostile", "aten_empty_unwritten", backward=False)
def aten_empty_unwritten(x):
    with torch.no_grad():
        right = x * torch.sigmoid(x)
        del right  # freed just before: the allocator may hand this block back, right values and all
        out = torch.ops.aten.empty.memory_format(list(x.shape), dtype=x.dtype, device=x.device)
        half = x.shape[0] // 2
        out[:half] = (x * torch.sigmoid(x))[:half]
    return out
