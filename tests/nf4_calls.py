"""Which NF4 kernels a call ran: spies on the ctypes wrappers of nf4_native and on the compiled few-rows op
(impls/kernels/nf4_op.py), for tests that must show the native path really ran."""

from __future__ import annotations

import pytest
from twinbench.impls.kernels import nf4_native, nf4_op

WRAPPERS = ("gemv", "gemv_t", "lora_gemv", "lora_gemv_t", "dequantize")

# the few-rows route needs both: the C kernels and the compiled op that calls them
few_rows_native = pytest.mark.skipif(
    not (nf4_native.status()[0] and nf4_op.status()[0]),
    reason=f"native NF4 kernels: {nf4_native.status()[1]}; compiled op: {nf4_op.status()[1]}")


def native_path_calls(monkeypatch) -> list[str]:
    """The list each call appends to: a wrapper's name, ``lora_op`` per call of the compiled op and ``lora_op
    backward`` when its backward ran (a hook on the output's autograd node)."""
    calls: list[str] = []
    for name in WRAPPERS:
        real = getattr(nf4_native, name)
        monkeypatch.setattr(nf4_native, name, lambda *a, _real=real, _n=name, **kw: calls.append(_n) or _real(*a, **kw))
    real_loaded = nf4_op.loaded

    def spied_op():
        op = real_loaded()
        if op is None:
            return None

        def call(*args):
            calls.append("lora_op")
            out = op(*args)
            if out.grad_fn is not None:
                out.grad_fn.register_hook(lambda *_: calls.append("lora_op backward"))
            return out
        return call

    monkeypatch.setattr(nf4_op, "loaded", spied_op)
    return calls
