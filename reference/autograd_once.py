"""Custom autograd Functions that are differentiable once: a second derivative through them raises, naming the op.

A Function whose backward computes its gradients with operations autograd cannot follow (``out=`` and in-place
GEMMs, native or Triton kernels, gradients formed in forward, quantised gradients) returns, under
``torch.autograd.grad(..., create_graph=True)``, gradients without a graph or with only part of it: a gradient
penalty built on them then trains nothing, or only some of its terms, and nothing says so.

PyTorch's ``torch.autograd.function.once_differentiable`` does not close that gap (measured, torch 2.13): it hangs
its error node only when an output gradient requires grad (dq = f(do, q) with a constant ``do`` keeps no graph
although q requires grad), and it hangs it on fresh leaves, so ``torch.autograd.grad(penalty, q)`` prunes the node
away and returns None (or, with another path to q, only the other path's part). ``differentiable_once`` feeds the
error node the tensors the gradients depend on as well (the saved tensors and output gradients that require grad),
so any second derivative that needs them reaches the node and raises. It lives here, not in impls/, because
reference Functions use it too (reference/fp8.py) and impls may import reference, not the other way round.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

Backward = Callable[..., Any]


def message(op: str) -> str:
    """The error a second derivative through ``op`` raises."""
    return (f"{op} is differentiable once: its backward computes gradients autograd cannot differentiate, so a "
            "second derivative through it (create_graph=True, then differentiating the gradients) is not supported")


def differentiable_once(op: str) -> Callable[[Backward], Backward]:
    """Decorate a Function's ``backward``: unchanged without ``create_graph`` (one ``torch.is_grad_enabled()``
    check); with it, the backward runs under no_grad (its ``out=`` kernels would refuse tensors that require grad)
    and each gradient it returns carries an error node that raises ``message(op)`` when differentiated.
    The wrapped backward stays reachable as ``__wrapped__`` (the tests rebuild the unwrapped op from it)."""

    def decorate(backward: Backward) -> Backward:
        @functools.wraps(backward)
        def wrapper(ctx: Any, *grad_outputs: Any) -> Any:
            if not torch.is_grad_enabled():  # first-order backward: the only cost is this check
                return backward(ctx, *grad_outputs)
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            # what the gradients may depend on: saved inputs (and saved outputs, whose graph leads to every input)
            # and output gradients; with none requiring grad the gradients are constants, their second derivative 0
            anchors = [t for t in (*ctx.saved_tensors, *grad_outputs)
                       if isinstance(t, torch.Tensor) and t.requires_grad]
            return with_error_node(message(op), grads, anchors) if anchors else grads

        return wrapper

    return decorate


def with_error_node(msg: str, grads: Any, anchors: list[torch.Tensor]) -> Any:
    """``grads`` (a tensor or a tuple with Nones and non-tensors) with the same values, each defined tensor now the
    output of one DelayedError node (the node ``once_differentiable`` uses) whose inputs include ``anchors``."""
    single = not isinstance(grads, tuple)
    items = (grads,) if single else grads
    slots = [i for i, g in enumerate(items) if isinstance(g, torch.Tensor)]
    if not slots:
        return grads
    inputs = [items[i].detach() for i in slots] + anchors
    # returns a tensor, not a tuple, for one input; there are always anchors, so at least two here
    outputs = torch._C._functions.DelayedError(msg, len(inputs))(*inputs)
    wrapped = list(items)
    for i, out in zip(slots, outputs):
        wrapped[i] = out
    return wrapped[0] if single else tuple(wrapped)
