"""Two toy suites for the hostile plugins: ``hostile`` (y = x * sigmoid(x)) and ``hostile_nanrow``.

``hostile_nanrow`` (y = x * rowsum(x)) always has a NaN in row 0, so that row's output and gradient are NaN
and the other rows are finite: a checker that gives up on a tensor holding any NaN compares nothing there.
The reference publishes the torch global state of its first call in a worker (``HOSTILE_STATE``) for the state-leak canary.
"""

import json
import os

import torch
from twinbench.harness.core.case import Case
from twinbench.harness.core.inputs import generator, randn
from twinbench.harness.core.registry import Inputs, Suite, register_impl, register_suite


def torch_state() -> str:
    """The global settings an impl could leak to the next one, as comparable text."""
    return json.dumps([torch.get_num_threads(), str(torch.get_default_dtype()), torch.backends.mkldnn.enabled,
                       torch.are_deterministic_algorithms_enabled()])


def make_inputs(case: Case, device, seed: int) -> Inputs:
    x = randn((case["rows"], case["cols"]), case["dtype"], device, generator(seed))
    return Inputs(tensors={"x": x}, grad=("x",))


def make_nanrow_inputs(case: Case, device, seed: int) -> Inputs:
    x = randn((case["rows"], case["cols"]), case["dtype"], device, generator(seed))
    with torch.no_grad():
        x[0, 0] = float("nan")
    return Inputs(tensors={"x": x}, grad=("x",))


register_suite(Suite(
    name="hostile", description="y = x * sigmoid(x), target of the hostile plugins",
    profiles={"quick": [Case.of(rows=16, cols=64, dtype="fp32")],
              "two": [Case.of(rows=16, cols=64, dtype="fp32"), Case.of(rows=8, cols=32, dtype="fp32")]},
    make_inputs=make_inputs, reference="reference", trials=2,
    flops=lambda case: {"fwd": 4.0 * case["rows"] * case["cols"]},
    bytes=lambda case: {"fwd": 8.0 * case["rows"] * case["cols"]},
))

register_suite(Suite(
    name="hostile_nanrow", description="y = x * rowsum(x) with a NaN in row 0",
    profiles={"quick": [Case.of(rows=8, cols=16, dtype="fp32")]},
    make_inputs=make_nanrow_inputs, reference="reference", trials=1,
))


@register_impl("hostile", "reference", tags=("reference",))
def reference(x):
    os.environ.setdefault("HOSTILE_STATE", torch_state())  # the worker's first state
    return x * torch.sigmoid(x)


@register_impl("hostile", "good", tags=("ours",))
def good(x):
    return x * torch.sigmoid(x)


@register_impl("hostile_nanrow", "reference", tags=("reference",))
def nanrow_reference(x):
    return x * x.sum(-1, keepdim=True)


@register_impl("hostile_nanrow", "good", tags=("ours",))
def nanrow_good(x):
    return x * x.sum(-1, keepdim=True)
