"""The per-call cost of the native few-rows path (issue 18 item 1; docs/quant_linear.md, "Per-call cost of the
few-rows path"): a weight is checked once and its checked form (nf4_native.CheckedWeight) cached on the
NF4Weight; what that cache must never do is answer for a weight that changed. Each test plants the cache
without its safeguard and shows the difference is seen."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from nf4_calls import few_rows_native, native_path_calls
from twinbench.impls.kernels import nf4_native, nf4_op
from twinbench.impls.kernels.nf4_weight import NF4Weight
from twinbench.impls.quant_linear import fused
from twinbench.reference.nf4 import quantize_nf4

native = pytest.mark.skipif(not nf4_native.status()[0], reason=f"native NF4 kernels: {nf4_native.status()[1]}")


def _weight(n: int = 96, k: int = 256, double_quant: bool = True, seed: int = 0) -> NF4Weight:
    gen = torch.Generator().manual_seed(seed)
    st = quantize_nf4(torch.randn(n, k, generator=gen) / k**0.5, 64, double_quant)
    return NF4Weight(st.packed, st.absmax, (n, k), 64, st.absmax2, st.code2, st.offset)


def _inputs(n: int = 96, k: int = 256, rows: int = 2, rank: int = 8, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, k, generator=gen), torch.randn(rank, k, generator=gen) * 0.1,
            torch.randn(n, rank, generator=gen) * 0.1, torch.randn(rows, n, generator=gen))


def _fresh_copy(w: NF4Weight) -> NF4Weight:
    """The same values in a new NF4Weight (nothing cached): what a correct cache must agree with."""
    return NF4Weight(w.packed, w.absmax, w.shape, w.blocksize, w.absmax2, w.code2, w.offset)


def _count_checks(monkeypatch) -> list[int]:
    checks: list[int] = []
    real = nf4_native.check_weight
    monkeypatch.setattr(nf4_native, "check_weight", lambda *a, **kw: checks.append(1) or real(*a, **kw))
    return checks


@few_rows_native
def test_weight_is_checked_once_then_again_when_it_changes(monkeypatch):
    """Repeated calls reuse the checked weight; an in-place change of any of its tensors (here the offset,
    which the cache read as a float) or a field set to another tensor gets it checked again, and the results
    follow (bitwise those of an uncached NF4Weight). Planted: a cache blind to version counters (the cache's
    key and the checked weight's own check, which alone would refuse the stale weight) keeps answering with the
    old offset. An offset given as a float (not a tensor) works too."""
    w = _weight()
    x, a, b, _ = _inputs()
    checks = _count_checks(monkeypatch)
    first = fused.nf4_lora_linear(x, w, a, b, 2.0)
    for _ in range(3):
        assert torch.equal(fused.nf4_lora_linear(x, w, a, b, 2.0), first)
    assert len(checks) == 1
    w.offset.add_(0.25)  # in place: same object, new value
    moved = fused.nf4_lora_linear(x, w, a, b, 2.0)
    assert len(checks) == 2 and not torch.equal(moved, first)
    assert torch.equal(moved, fused.nf4_lora_linear(x, _fresh_copy(w), a, b, 2.0))
    w.absmax2 = w.absmax2 * 2  # another tensor in the field
    assert torch.equal(fused.nf4_lora_linear(x, w, a, b, 2.0), fused.nf4_lora_linear(x, _fresh_copy(w), a, b, 2.0))

    as_float = NF4Weight(w.packed, w.absmax, w.shape, w.blocksize, w.absmax2, w.code2, float(w.offset))
    assert torch.equal(fused.nf4_lora_linear(x, as_float, a, b, 2.0), fused.nf4_lora_linear(x, w, a, b, 2.0))

    monkeypatch.setattr(fused, "_versions", lambda tensors: ())  # planted: identity only
    monkeypatch.setattr(nf4_native.CheckedWeight, "fresh", lambda self: True)
    w2 = _weight(seed=3)
    before = fused.nf4_lora_linear(x, w2, a, b, 2.0)
    w2.offset.add_(0.25)
    assert torch.equal(fused.nf4_lora_linear(x, w2, a, b, 2.0), before)  # stale: what the real key prevents


@few_rows_native
def test_cached_weight_follows_the_environment(monkeypatch):
    """TWINBENCH_NF4_NATIVE=0 set after a weight was cached turns the native kernels off at the next call
    (the inductor route runs, and agrees within fp32 summation order)."""
    w = _weight()
    x, a, b, _ = _inputs()
    native_out = fused.nf4_lora_linear(x, w, a, b, 2.0)
    calls = native_path_calls(monkeypatch)
    monkeypatch.setenv("TWINBENCH_NF4_NATIVE", "0")
    off = fused.nf4_lora_linear(x, w, a, b, 2.0)
    assert calls == [] and torch.allclose(off, native_out, rtol=1e-5, atol=1e-5)
    monkeypatch.delenv("TWINBENCH_NF4_NATIVE")
    fused.nf4_lora_linear(x, w, a, b, 2.0)
    assert calls == ["lora_op"]


@few_rows_native
@pytest.mark.parametrize("modify", ["packed", "offset"])
def test_weight_changed_between_forward_and_backward_is_refused(modify, monkeypatch):
    """The compiled op saves the weight and the tensors it was derived from (nf4_native.CheckedWeight.watched)
    through autograd: a weight modified in place after the forward makes the backward raise, not differentiate
    a weight the forward did not use (the offset is read into a float at the check: only the watched tensor
    carries its version). Planted: an op given copies and no watched tensors runs the backward silently."""
    x, a, b, g = _inputs()

    def forward_then_modify():
        w = _weight()
        leaves = [t.clone().requires_grad_() for t in (x, a, b)]
        out = fused.nf4_lora_linear(leaves[0], w, leaves[1], leaves[2], 2.0)
        (w.packed.bitwise_xor_(0x11) if modify == "packed" else w.offset.add_(0.25))
        return out, leaves

    out, leaves = forward_then_modify()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out, leaves, g)
    real = fused._native_gemv_weight

    def unwatched(w, lib):  # planted: the op's weight arguments copied, nothing watched
        checked = real(w, lib)
        weight, _, *rest = checked.op_args
        return dataclasses.replace(checked, op_args=([t.clone() for t in weight], [], *rest))

    monkeypatch.setattr(fused, "_native_gemv_weight", unwatched)
    out, leaves = forward_then_modify()
    torch.autograd.grad(out, leaves, g)  # runs, on the weight of the forward


@native
def test_checked_weight_gives_the_raw_call_bits_and_is_refused_when_stale():
    """Every GEMV wrapper returns bitwise the same with a CheckedWeight as with the raw tensors (nested and
    fp32 scales, fp64 second-level scales converted once, bf16 x); once a tensor it was derived from is changed
    in place (here a resize that can move the bytes) every wrapper refuses it before a pointer reaches C."""
    for double_quant in (False, True):
        w = _weight(double_quant=double_quant)
        packed2d = w.packed.reshape(96, 128)
        scales = nf4_native.NestedScales(w.absmax.reshape(96, 4), w.absmax2.double(), w.code2, float(w.offset)) \
            if double_quant else w.block_scales().reshape(96, 4)
        checked = nf4_native.check_weight(packed2d, scales)
        x, a, b, g = _inputs()
        for xd in (torch.float32, torch.bfloat16):
            xx = x.to(xd)
            assert torch.equal(nf4_native.gemv(xx, checked, None), nf4_native.gemv(xx, packed2d, scales))
        assert torch.equal(nf4_native.gemv_t(g, checked, None), nf4_native.gemv_t(g, packed2d, scales))
        y, xa = nf4_native.lora_gemv(x, checked, None, a, b, 2.0)
        y_raw, xa_raw = nf4_native.lora_gemv(x, packed2d, scales, a, b, 2.0)
        assert torch.equal(y, y_raw) and torch.equal(xa, xa_raw)
        grads = nf4_native.lora_gemv_t(g, checked, None, a, b, xa, 2.0, x)
        assert all(torch.equal(p, q) for p, q in zip(grads, nf4_native.lora_gemv_t(g, packed2d, scales, a, b, xa,
                                                                                     2.0, x)))
        assert checked.fresh()
        packed2d.resize_(96 * 128 * 4)  # the bytes may move
        for call in (lambda: nf4_native.gemv(x, checked, None), lambda: nf4_native.gemv_t(g, checked, None),
                     lambda: nf4_native.lora_gemv(x, checked, None, a, b, 2.0),
                     lambda: nf4_native.lora_gemv_t(g, checked, None, a, b, xa, 2.0, x)):
            with pytest.raises(ValueError, match="changed in place since it was checked"):
                call()


@native
def test_checked_weight_calls_still_check_their_other_arguments():
    """Skipping the weight's checks skips nothing else: x, g, the LoRA factors and the bias are checked per call."""
    checked = nf4_native.check_weight(_weight().packed.reshape(96, 128), _weight().block_scales().reshape(96, 4))
    x, a, b, g = _inputs()
    refused = {
        r"x must be \[M <= 4, 256\]": lambda: nf4_native.lora_gemv(torch.randn(5, 256), checked, None, a, b, 2.0),
        "x: need a contiguous CPU": lambda: nf4_native.lora_gemv(x.to("meta"), checked, None, a, b, 2.0),
        "LoRA factors must be": lambda: nf4_native.lora_gemv(x, checked, None, a, b[:, :4], 2.0),
        r"bias must be \[96\]": lambda: nf4_native.lora_gemv(x, checked, None, a, b, 2.0, torch.zeros(95)),
        r"x must be \[M, 256\]": lambda: nf4_native.gemv(torch.randn(1, 255), checked, None),
        r"g must be \[M, 96\]": lambda: nf4_native.gemv_t(torch.randn(1, 95), checked, None),
        "need g": lambda: nf4_native.lora_gemv_t(g, checked, None, a, b, torch.zeros(2, 7), 2.0, x),
    }
    for message, call in refused.items():
        with pytest.raises(ValueError, match=message):
            call()


@few_rows_native
def test_few_rows_forward_and_backward_read_the_environment_once(monkeypatch):
    """With the weight cached, a forward + backward reads the environment once (the forward's choice of
    kernels; the backward runs on the build its forward used): each read costs ~1 us per variable."""
    w = _weight()
    x, a, b, g = _inputs()
    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    fused.nf4_lora_linear(leaves[0], w, leaves[1], leaves[2], 2.0)  # caches the checked weight
    reads: list[int] = []
    real = nf4_native._load
    monkeypatch.setattr(nf4_native, "_load", lambda: reads.append(1) or real())
    out = fused.nf4_lora_linear(leaves[0], w, leaves[1], leaves[2], 2.0)
    torch.autograd.grad(out, leaves, g)
    assert len(reads) == 1


def test_suite_impl_reuses_its_weight_only_for_the_same_tensors():
    """The suite impls rebuild their NF4Weight from the case's tensors on every call; the last one is kept
    while every tensor is the same object and the layout the same (planted: a memo keyed on the packed bytes
    alone would hand a weight with other scales)."""
    w = _weight()
    fields = (w.packed, w.absmax, w.shape, w.blocksize, w.absmax2, w.code2, w.offset)
    first = fused._LastWeight.of(*fields)
    assert fused._LastWeight.of(*fields) is first
    other_scales = fused._LastWeight.of(w.packed, w.absmax.clone(), *fields[2:])
    assert other_scales is not first and other_scales.absmax is not w.absmax
    assert fused._LastWeight.of(*fields[:2], (48, 512), *fields[3:]).shape == (48, 512)


def _wrapper_route(x, w, a, b, bias, scaling, g):
    """out and gradients by the ctypes wrappers (nf4_native.lora_gemv / lora_gemv_t / gemv_t) in fp32, rounded
    once to the callers' dtypes: what the compiled op must give bit for bit."""
    n, k = w.shape
    checked = fused._native_gemv_weight(w, nf4_native.loaded())
    ab = None if a is None else ((a, b) if a.dtype == b.dtype == torch.bfloat16 else (a.float(), b.float()))
    out, xa = nf4_native.lora_gemv(x.float(), checked, None, *(ab or (None, None)), scaling,
                                   None if bias is None else bias.float())
    if ab is None:
        dx, da, db = nf4_native.gemv_t(g.float(), checked, None), None, None
    else:
        dx, da, db = nf4_native.lora_gemv_t(g.float(), checked, None, *ab, xa, scaling, x.float())
        da, db = da.to(a.dtype), db.to(b.dtype)
    dbias = None if bias is None else g.float().sum(0).to(g.dtype)
    return out.to(x.dtype), dx.to(x.dtype), da, db, dbias


@few_rows_native
@pytest.mark.parametrize("threads", [1, 2])
def test_compiled_op_gives_the_wrapper_bits(threads, monkeypatch):
    """The compiled op (impls/kernels/nf4_op.cpp) against the ctypes wrappers on the same kernels: out, dx, dA,
    dB and dbias bitwise equal, for fp32/bf16/fp16 x, with and without LoRA and bias, nested and fp32 scales,
    1-4 rows, one and two threads (every thread count split for these small weights). Planted: an op that
    drops the LoRA scaling, the bias or the rounding to x's dtype is told apart."""
    monkeypatch.setattr(nf4_native, "BYTES_PER_THREAD", 1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for double_quant in (True, False):
            w = _weight(double_quant=double_quant)
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                for rows, lora, with_bias in ((1, True, True), (3, True, False), (4, False, True), (2, False, False)):
                    x, a, b, g = (t.to(dtype) for t in _inputs(rows=rows, seed=rows))
                    a, b = (a, b) if lora else (None, None)
                    bias = torch.randn(96, generator=torch.Generator().manual_seed(7)).to(dtype) if with_bias else None
                    given = {"x": x, "a": a, "b": b, "bias": bias}
                    leaves = {name: t.clone().requires_grad_() for name, t in given.items() if t is not None}
                    out = fused.nf4_lora_linear(leaves["x"], w, leaves.get("a"), leaves.get("b"), 2.0,
                                                leaves.get("bias"))
                    got = (out, *torch.autograd.grad(out, list(leaves.values()), g))
                    want = [t for t in _wrapper_route(x, w, a, b, bias, 2.0, g) if t is not None]
                    assert all(p.dtype == q.dtype and torch.equal(p, q) for p, q in zip(got, want, strict=True)), \
                        (double_quant, dtype, rows, lora, with_bias)
                    if lora:
                        assert not torch.equal(_wrapper_route(x, w, a, b, bias, 1.0, g)[0], got[0])
                    if with_bias:
                        assert not torch.equal(_wrapper_route(x, w, a, b, None, 2.0, g)[0], got[0])
                    if dtype != torch.float32:  # unrounded: the fp32 result of the same kernels
                        unrounded = _wrapper_route(x.float(), w, a, b, bias, 2.0, g)[0]
                        assert got[0].dtype == dtype and not torch.equal(got[0].float(), unrounded)
    finally:
        torch.set_num_threads(before)


@few_rows_native
def test_compiled_op_checks_what_a_pointer_needs():
    """The op trusts nothing a C pointer reads: x, the LoRA factors, the bias and the weight list are checked
    (ValueError, one line) before the kernel runs."""
    w = _weight()
    checked = fused._native_gemv_weight(w, nf4_native.loaded())
    weight, watched, offset, bs, kernels = checked.op_args
    op = nf4_op.loaded()
    x, a, b, _ = _inputs()

    def call(x=x, a=a, b=b, bias=None, weight=weight, bs=bs):
        return op(x, a, b, bias, weight, watched, offset, bs, 2.0, 1, kernels)

    call()
    refused = {
        r"x must be a CPU \[M <= 4, 256\]": lambda: call(x=torch.randn(5, 256)),
        r"x must be a CPU \[M <= 4, 256\], got \[2, 255\]": lambda: call(x=torch.randn(2, 255)),
        "LoRA factors must be": lambda: call(b=b[:, :4]),
        "pass both LoRA factors or neither": lambda: call(b=None),
        r"bias must be a CPU \[96\]": lambda: call(bias=torch.zeros(95)),
        "packed must be a contiguous CPU uint8": lambda: call(weight=[weight[0], weight[1].t(), *weight[2:]]),
        "code16 must be 16 fp32 values": lambda: call(weight=[weight[0][:8], *weight[1:]]),
        "the weight is": lambda: call(weight=weight[:2]),
        "nested scales must be": lambda: call(weight=[*weight[:3], weight[3][:0], weight[4]]),
        "do not cover a 96x256 weight": lambda: call(bs=32),
    }
    for message, bad in refused.items():
        with pytest.raises(ValueError, match=message):
            bad()
    with pytest.raises(ValueError, match="cannot open the NF4 kernels"):
        op(x, a, b, None, weight, watched, offset, bs, 2.0, 1, "/nonexistent/nf4.so")


@native
def test_without_the_compiled_op_few_rows_take_the_composed_route(monkeypatch):
    """Where the op cannot be built (here: reported unusable) the few-rows call runs the NF4 GEMV kernels with
    torch's LoRA products around them, and agrees with the op's results within fp32 summation order."""
    w = _weight()
    x, a, b, g = _inputs()
    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    with_op = None
    if nf4_op.status()[0]:
        out = fused.nf4_lora_linear(leaves[0], w, leaves[1], leaves[2], 2.0)
        with_op = (out, *torch.autograd.grad(out, leaves, g))
    calls = native_path_calls(monkeypatch)
    monkeypatch.setattr(nf4_op, "loaded", lambda: None)
    out = fused.nf4_lora_linear(leaves[0], w, leaves[1], leaves[2], 2.0)
    composed = (out, *torch.autograd.grad(out, leaves, g))
    assert set(calls) == {"gemv", "gemv_t"}
    if with_op is not None:
        assert all(torch.allclose(p, q, rtol=1e-5, atol=1e-5) for p, q in zip(composed, with_op))


def test_compiled_op_says_why_it_cannot_build(monkeypatch):
    """No C++ compiler: a reason, not a crash (uncached call of the loader)."""
    monkeypatch.setenv("CXX", "")
    monkeypatch.setattr(nf4_op.shutil, "which", lambda name: None)
    assert nf4_op._load.__wrapped__() == (False, "no C++ compiler found (set CXX, or install g++)")


@few_rows_native
def test_compiled_op_gives_each_gradient_in_its_inputs_dtype():
    """Called directly with a bias in another dtype than x (nf4_lora_linear casts it first; the op must not rely
    on that): every gradient comes back in its own input's dtype, the bias's summed in fp32 then rounded once."""
    w = _weight()
    weight, watched, offset, bs, kernels = fused._native_gemv_weight(w, nf4_native.loaded()).op_args
    x, a, b, g = _inputs()
    xl, al, bl = (t.to(torch.bfloat16).requires_grad_() for t in (x, a, b))
    bias = torch.randn(96, dtype=torch.float64, requires_grad=True)
    out = nf4_op.loaded()(xl, al, bl, bias, weight, watched, offset, bs, 2.0, 1, kernels)
    grads = torch.autograd.grad(out, (xl, al, bl, bias), g.to(torch.bfloat16))
    assert [t.dtype for t in grads] == [torch.bfloat16] * 3 + [torch.float64]
    assert torch.equal(grads[3], g.to(torch.bfloat16).float().sum(0).double())
