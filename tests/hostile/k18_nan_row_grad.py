"""Item 18: right forward, 1.5x wrong gradient on the finite rows, NaN kept in the NaN row."""

import torch
from twinbench.harness.core.registry import register_impl


class _WrongGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x.sum(-1, keepdim=True)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        right = g * x.sum(-1, keepdim=True) + (g * x).sum(-1, keepdim=True)
        return 1.5 * right


@register_impl("hostile_nanrow", "wrong_grad_nan_row")
def wrong_grad_nan_row(x):
    return _WrongGrad.apply(x)
