"""The fused NF4 linear inside a torch.compile'd function (inductor, the default backend): it runs eagerly there
behind a graph break (impls/quant_linear/fused.py, ``_eager_under_compile``), and the compiled function gives
eager's output and gradients. Planted: without that break, Dynamo traces into the ctypes-reached kernels and
inductor's result is wrong (non-finite on the GEMM route) or the compiled few-rows op fails its fake-tensor run."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from nf4_calls import few_rows_native
from twinbench.impls.kernels.nf4_weight import NF4Weight
from twinbench.impls.quant_linear import fused
from twinbench.reference.nf4 import quantize_nf4


def _problem(rows: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    st = quantize_nf4(torch.randn(96, 256, generator=gen) / 16, 64, True)
    w = NF4Weight(st.packed, st.absmax, (96, 256), 64, st.absmax2, st.code2, st.offset)
    leaves = [torch.randn(rows, 256, generator=gen), torch.randn(8, 256, generator=gen) * 0.1,
              torch.randn(96, 8, generator=gen) * 0.1]
    leaves = [t.requires_grad_() for t in leaves]

    def loss(x, a, b):
        return torch.relu(fused.nf4_lora_linear(x, w, a, b, 2.0)).sum()

    return loss, leaves


@few_rows_native
@pytest.mark.parametrize("rows", [2, 8], ids=["few-rows-op", "gemm-route"])
def test_compiled_function_gives_eager_results(rows):
    loss, leaves = _problem(rows)
    want = loss(*leaves)
    want_grads = torch.autograd.grad(want, leaves)
    torch._dynamo.reset()
    got = torch.compile(loss)(*leaves)
    got_grads = torch.autograd.grad(got, leaves)
    assert torch.allclose(got, want, rtol=1e-5)
    assert all(torch.allclose(g, h, rtol=1e-5, atol=1e-6) for g, h in zip(got_grads, want_grads))


@few_rows_native
def test_without_the_graph_break_compile_goes_wrong():
    """Planted: ``torch.compiler.is_compiling`` reads False, so Dynamo traces the fused linear's own code."""
    with mock.patch.object(torch.compiler, "is_compiling", lambda: False):
        loss, leaves = _problem(8)
        want = loss(*leaves)
        torch._dynamo.reset()
        got = torch.compile(loss)(*leaves)
        assert not torch.allclose(got, want, rtol=1e-5)
        loss, leaves = _problem(2)
        torch._dynamo.reset()
        with pytest.raises(Exception, match="fake"):
            torch.compile(loss)(*leaves)
    torch._dynamo.reset()
