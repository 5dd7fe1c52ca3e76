"""Second derivatives through the fused NF4 linear (create_graph=True, then a backward through the gradients, as a
gradient penalty does), by the shared check of tests/second_derivatives.py. The GEMM route's gradients are torch ops
and differentiate again correctly; the few-rows routes (the compiled op and the composed route) compute g W in the
GEMV kernel, without a graph, so a second backward that reaches them raises the op's message instead of silently
losing the weight's part (impls/quant_linear/fused.py through reference/autograd_once.py's error node;
impls/kernels/nf4_op.cpp, ``differentiable_once``). Planted: the composed route without that node gives a wrong
second derivative, and the check catches it. (The other custom Functions: tests/test_double_backward.py.)"""

from __future__ import annotations

import pytest
import torch
from nf4_calls import few_rows_native, native_path_calls
from second_derivatives import assert_right_or_raises, loss_of
from twinbench.impls.kernels import nf4_op
from twinbench.impls.kernels.nf4_weight import NF4Weight
from twinbench.impls.quant_linear import fused
from twinbench.reference.nf4 import quantize_nf4

N, K, RANK, SCALING, TOL = 48, 128, 4, 0.5, 1e-4
OP = "twinbench_nf4.lora_linear"        # the compiled op's name in its message
COMPOSED = "the NF4 few-rows linear"    # the composed route's


def _problem(rows: int):
    gen = torch.Generator().manual_seed(rows)
    st = quantize_nf4(torch.randn(N, K, generator=gen) / 8, 64, True)
    w = NF4Weight(st.packed, st.absmax, (N, K), 64, st.absmax2, st.code2, st.offset)
    leaves = [torch.randn(rows, K, generator=gen), torch.randn(RANK, K, generator=gen) * 0.1,
              torch.randn(N, RANK, generator=gen) * 0.1, torch.randn(N, generator=gen) * 0.1]
    return w, leaves


def _dequantised_linear(w: NF4Weight):
    weight = w.dequantize(torch.float32)
    return lambda x, a, b, bias: x @ weight.t() + SCALING * (x @ a.t()) @ b.t() + bias


def _fused_linear(w: NF4Weight, keep_w: bool = False):
    return lambda x, a, b, bias: fused.nf4_lora_linear(x, w, a, b, SCALING, bias, keep_dequantized=keep_w)


def _first_gradients_unchanged_by_create_graph(linear, leaves) -> None:
    leaves = [t.clone().requires_grad_() for t in leaves]
    with_graph = torch.autograd.grad(loss_of(linear(*leaves), True), leaves, create_graph=True)
    plain = torch.autograd.grad(loss_of(linear(*leaves), True), leaves)
    assert all(torch.equal(g.detach(), h) for g, h in zip(with_graph, plain))


@pytest.mark.parametrize("keep_w", [False, True], ids=["dequantise-again", "keep-w"])
def test_gemm_route_differentiates_twice_correctly(keep_w):
    """Right, not refused: the name given is neither route's, so raising any message fails the check."""
    w, leaves = _problem(8)
    assert_right_or_raises("the GEMM route (never refuses)", _fused_linear(w, keep_w), _dequantised_linear(w),
                           leaves, TOL, TOL)


@few_rows_native
def test_compiled_op_refuses_a_second_derivative(monkeypatch):
    calls = native_path_calls(monkeypatch)
    w, leaves = _problem(2)
    assert_right_or_raises(OP, _fused_linear(w), _dequantised_linear(w), leaves, TOL, TOL)
    _first_gradients_unchanged_by_create_graph(_fused_linear(w), leaves)
    assert "lora_op" in calls


def test_composed_few_rows_route_refuses_a_second_derivative(monkeypatch):
    monkeypatch.setattr(nf4_op, "loaded", lambda: None)
    w, leaves = _problem(3)
    assert_right_or_raises(COMPOSED, _fused_linear(w), _dequantised_linear(w), leaves, TOL, TOL)
    _first_gradients_unchanged_by_create_graph(_fused_linear(w), leaves)


def test_without_the_wrap_the_second_derivative_is_silently_wrong(monkeypatch):
    """Planted: the composed few-rows route with its error node taken out runs the second backward without an
    error, and its result is not the true second derivative (the GEMV's g W part is lost): the check fails."""
    monkeypatch.setattr(nf4_op, "loaded", lambda: None)
    monkeypatch.setattr(fused, "with_error_node", lambda msg, grads, anchors: grads)
    w, leaves = _problem(3)
    with pytest.raises(AssertionError, match="silently wrong"):
        assert_right_or_raises(COMPOSED, _fused_linear(w), _dequantised_linear(w), leaves, TOL, TOL)
