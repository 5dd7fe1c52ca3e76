"""The second-derivative check shared by tests/test_double_backward.py and tests/test_nf4_double_backward.py: an op's
second derivatives (create_graph=True, then differentiating the gradients) equal autograd's of a reference
composition of torch ops, or differentiating them raises the op's ``differentiable_once`` message
(reference/autograd_once.py). Never silently wrong."""

from __future__ import annotations

from collections.abc import Callable

import torch
from twinbench.reference.autograd_once import message

Op = Callable[..., torch.Tensor]


def loss_of(out: torch.Tensor, quadratic: bool) -> torch.Tensor:
    c = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).view(out.shape)
    return (out * c).sum() + (0.5 * (out * out).sum() if quadratic else 0.0)


def _derivatives(fn: Op, leaves: list[torch.Tensor], quadratic: bool):
    """(first derivatives, second derivatives) of the loss; the second: of sum |first|^2, input by input. An input
    the penalty's graph does not reach gets zeros: what a training step would add to it."""
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    firsts = torch.autograd.grad(loss_of(fn(*leaves), quadratic), leaves, create_graph=True, allow_unused=True)
    penalty = sum((g.float() ** 2).sum() for g in firsts if g is not None)
    seconds = []
    for leaf in leaves:
        s = (torch.autograd.grad(penalty, leaf, retain_graph=True, allow_unused=True)[0]
             if penalty.requires_grad else None)
        seconds.append(torch.zeros_like(leaf) if s is None else s)
    return [None if g is None else g.detach() for g in firsts], seconds


def _close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * float(want.abs().max()),
                               msg=lambda m: f"{what}: {m}")


def assert_right_or_raises(name: str, op: Op, reference: Op, leaves: list[torch.Tensor], tol: float,
                           first_tol: float | None) -> None:
    """Under both losses: the op's second derivatives equal the reference's, or differentiating the op's gradients
    raises ``message(name)``. ``first_tol`` None: the op's first derivatives are not the reference's (a quantised
    recipe against its straight-through composition), only the second ones are compared."""
    reference_nonzero = False
    for quadratic in (False, True):
        want_first, want_second = _derivatives(reference, leaves, quadratic)
        reference_nonzero |= any(bool(s.abs().max() > 0) for s in want_second)
        try:
            got_first, got_second = _derivatives(op, leaves, quadratic)
        except RuntimeError as exc:
            assert message(name) in str(exc), f"{name}: a second derivative raised, but not the op's message: {exc}"
            continue
        loss = "quadratic" if quadratic else "linear"
        if first_tol is not None:
            for i, (g, w) in enumerate(zip(got_first, want_first)):
                _close(g, w, first_tol, f"{name}: first derivative {i} ({loss} loss) is not the reference's")
        for i, (g, w) in enumerate(zip(got_second, want_second)):
            _close(g, w, tol, f"{name}: second derivative {i} ({loss} loss) silently wrong")
    assert reference_nonzero, f"{name}: the reference's second derivatives are all zero, the check is empty"
