"""A tiny op for end-to-end tests of reports and the gate: y = x @ w, a right and a wrong impl."""

import torch
from twinbench.harness.core.case import Case
from twinbench.harness.core.inputs import generator, randn
from twinbench.harness.core.registry import Inputs, Suite, register_impl, register_suite


def make_inputs(case: Case, device, seed: int) -> Inputs:
    gen = generator(seed)
    n = case["n"]
    x = randn((n, n), case["dtype"], device, gen)
    w = randn((n, n), case["dtype"], device, gen)
    return Inputs(tensors={"x": x, "w": w}, grad=("x", "w"))


register_suite(Suite(
    name="toy_matmul", description="y = x @ w (test op)",
    profiles={"quick": [Case.of(n=32, dtype="fp32"), Case.of(n=48, dtype="fp32")]},
    make_inputs=make_inputs, reference="reference", trials=2,
    flops=lambda case: {"fwd": 2.0 * case["n"] ** 3, "bwd": 4.0 * case["n"] ** 3},
    bytes=lambda case: {"fwd": 12.0 * case["n"] ** 2, "bwd": 24.0 * case["n"] ** 2},
))


@register_impl("toy_matmul", "reference", tags=("reference",))
def reference(x, w):
    return x @ w


@register_impl("toy_matmul", "mm", tags=("ours",))
def mm(x, w):
    return torch.mm(x, w)


@register_impl("toy_matmul", "off_by_one_percent", tags=("ours",))
def off_by_one_percent(x, w):
    return torch.mm(x, w) * 1.01
