"""Second derivatives through our custom autograd Functions: right, or a clear error; never silently wrong.

A Function whose backward is not built of differentiable ops (``out=`` GEMMs, native or Triton kernels, gradients
formed in forward, quantised gradients) gives, under ``create_graph=True``, gradients with no graph or part of one:
a gradient penalty on them trains nothing, or only some terms. Each Function here is either right (its second
derivatives equal autograd's of the same composition of torch ops) or raises its own ``differentiable_once`` message
(reference/autograd_once.py). The check takes each input's second derivative alone (``torch.autograd.grad`` prunes
graph nodes off the path to the inputs asked for) under a linear loss (constant output gradient) and a quadratic one
(output gradient that requires grad). Each Function is also rebuilt with its wrap removed (``backward.__wrapped__``):
the same check must fail on it, and its first-order gradients must be the wrapped op's, bit for bit.
Triton ops run through the interpreter (tests/conftest.py sets TRITON_INTERPRET=1), tiny shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from second_derivatives import Op, assert_right_or_raises, loss_of
from torch.autograd.function import once_differentiable
from twinbench.reference.autograd_once import differentiable_once


def unwrapped(fn: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """The same Function with differentiable_once's wrap taken off its backward (as it was before)."""
    return type(f"Unwrapped{fn.__name__}", (fn,), {"backward": staticmethod(fn.backward.__wrapped__)})


@dataclass
class Case:
    name: str
    fn: type[torch.autograd.Function]
    call: Callable[..., torch.Tensor]  # call(Function, *leaves) -> the output the loss is taken of
    reference: Op
    leaves: list[torch.Tensor]
    tol: float = 1e-4
    first_tol: float | None = 1e-4

    def op(self, fn: type[torch.autograd.Function] | None = None) -> Op:
        return lambda *leaves: self.call(fn or self.fn, *leaves)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, scale: float = 1.0, gen: torch.Generator) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=gen)


# ---------------------------------------------------------------- the ops, on tiny fp32 inputs


def _sorted_experts() -> Case:
    from twinbench.impls.moe_ffn import sorted_experts as se
    from twinbench.reference.moe import moe_experts

    g = _gen()
    tokens, hidden, experts, inter, k = 6, 8, 3, 5, 2
    idx = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    leaves = [_randn(tokens, hidden, gen=g), torch.rand(tokens, k, generator=g),
              _randn(experts, 2 * inter, hidden, scale=hidden ** -0.5, gen=g),
              _randn(experts, hidden, inter, scale=inter ** -0.5, gen=g)]
    return Case("SortedExperts", se.SortedExperts, lambda fn, h, w, gu, d: fn.apply(se.TorchGemms, h, idx, w, gu, d),
                lambda h, w, gu, d: moe_experts(h, idx, w, gu, d), leaves)


def _fused_dpo() -> Case:
    from twinbench.impls.dpo.fused_torch import TILE_BYTES, FusedLinearDPO
    from twinbench.reference.dpo import linear_dpo

    g = _gen()
    pairs, seq, hidden, vocab = 2, 4, 6, 7
    ref_hidden = _randn(2 * pairs, seq, hidden, gen=g)
    weight = _randn(vocab, hidden, scale=0.5, gen=g)
    ref_weight, ref_bias = weight + _randn(vocab, hidden, scale=0.05, gen=g), _randn(vocab, scale=0.1, gen=g)
    labels = torch.randint(0, vocab, (2 * pairs, seq), generator=g)
    labels[:, 0] = -100
    kw = {"beta": 0.5, "loss_type": "sigmoid", "label_smoothing": 0.0, "ignore_index": -100}

    def call(fn, h, w, b):
        return fn.apply(h, ref_hidden, w, b, ref_weight, ref_bias, labels, *kw.values(), TILE_BYTES)[0]

    return Case("FusedLinearDPO", FusedLinearDPO, call,
                lambda h, w, b: linear_dpo(h, ref_hidden, w, b, ref_weight, ref_bias, labels, **kw)["loss"],
                [_randn(2 * pairs, seq, hidden, gen=g), weight, ref_bias.clone()])


def _fp8_operands():
    from twinbench.reference.fp8 import Operand, quantize

    g = _gen()
    w = quantize(_randn(8, 32, gen=g), "e4m3", "row", Operand.W)
    # the recipe quantises x and dy with straight-through gradients: its first derivatives are the quantised ones,
    # its second derivative in x (through dy) is that of x @ deq(w)^T
    return w, (lambda x: x @ w.dequantize().t()), [_randn(4, 32, gen=g)]


def _torch_fp8() -> Case:
    from twinbench.impls.fp8_linear.torch_paths import _TorchTrainingLinear

    w, ste, leaves = _fp8_operands()
    return Case("_TorchTrainingLinear", _TorchTrainingLinear,
                lambda fn, x: fn.apply(x, w.codes, w.scale, "e4m3", "e5m2", "e4m3", "row", True), ste, leaves,
                tol=0.3, first_tol=None)


def _reference_fp8() -> Case:
    from twinbench.reference.fp8 import Fp8TrainingLinear

    w, ste, leaves = _fp8_operands()
    return Case("Fp8TrainingLinear", Fp8TrainingLinear,
                lambda fn, x: fn.apply(x, w.codes, w.scale, "e4m3", "e5m2", "e4m3", "row", True, torch.float32),
                ste, leaves, tol=0.3, first_tol=None)


def _silu_mul() -> Case:
    from twinbench.impls.qlora.nf4_lora import SiluMul

    g = _gen()
    return Case("SiluMul", SiluMul, lambda fn, a, b: fn.apply(a, b), lambda a, b: F.silu(a) * b,
                [_randn(4, 6, gen=g), _randn(4, 6, gen=g)])


def _nf4(out: int, inp: int, g: torch.Generator):
    """(packed, bnb QuantState) of a random NF4 weight, and its dequantised values."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    packed, state = bnbf.quantize_4bit(_randn(out, inp, scale=0.3, gen=g), blocksize=64, quant_type="nf4")
    return (packed, state), bnbf.dequantize_4bit(packed, state).float()


def _nf4_lora_projections() -> Case:
    from twinbench.impls.qlora.nf4_lora import NF4LoRAProjections

    g = _gen()
    (w1, d1), (w2, d2) = _nf4(8, 64, g), _nf4(4, 64, g)
    scalings = [0.5, 2.0]

    def reference(x, a1, b1, a2, b2):
        return torch.cat([x @ d1.t() + scalings[0] * (x @ a1.t()) @ b1.t(),
                          x @ d2.t() + scalings[1] * (x @ a2.t()) @ b2.t()], -1)

    leaves = [_randn(3, 64, gen=g), _randn(2, 64, scale=0.1, gen=g), _randn(8, 2, scale=0.1, gen=g),
              _randn(2, 64, scale=0.1, gen=g), _randn(4, 2, scale=0.1, gen=g)]
    return Case("NF4LoRAProjections", NF4LoRAProjections,
                lambda fn, x, *lora: fn.apply(x, [w1, w2], scalings, x.dtype, *lora), reference, leaves)


def _rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    hf = h.float()
    return weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps))


def _lora(x, w, a, b, s):
    return x @ w.t() + s * (x @ a.t()) @ b.t()


def _recomputed_mlp() -> Case:
    from twinbench.impls.qlora.recompute import RecomputedMLP

    g = _gen()
    hidden, inter, r = 64, 128, 2
    norm = torch.rand(hidden, generator=g) + 0.5
    (wg, dg), (wu, du), (wd, dd) = _nf4(inter, hidden, g), _nf4(inter, hidden, g), _nf4(hidden, inter, g)
    s = [0.5, 2.0, 1.5]

    def reference(h, ag, bg, au, bu, ad, bd):
        x = _rms_norm(h, norm, 1e-6)
        act = F.silu(_lora(x, dg, ag, bg, s[0])) * _lora(x, du, au, bu, s[1])
        return h + _lora(act, dd, ad, bd, s[2])

    leaves = [_randn(1, 3, hidden, gen=g)] + [_randn(*shape, scale=0.2, gen=g) for shape in
                                             ((r, hidden), (inter, r), (r, hidden), (inter, r), (r, inter), (hidden, r))]
    return Case("RecomputedMLP", RecomputedMLP,
                lambda fn, h, *lora: fn.apply(h, None, norm, 1e-6, [wg, wu, wd], s, *lora), reference, leaves)


def _recomputed_attention() -> Case:
    from twinbench.impls.qlora.attention_op import RecomputedAttention

    g = _gen()
    hidden, heads, kv, d, r, seq = 64, 2, 1, 32, 2, 4
    norm = torch.rand(hidden, generator=g) + 0.5
    nf4 = [_nf4(heads * d, hidden, g), _nf4(kv * d, hidden, g), _nf4(kv * d, hidden, g), _nf4(hidden, heads * d, g)]
    w, deq = [p[0] for p in nf4], [p[1] for p in nf4]
    s = [0.5, 1.0, 2.0, 1.5]
    angle = torch.arange(seq)[:, None] * torch.rand(d // 2, generator=g)
    cos, sin = torch.cat([angle, angle], -1)[None].cos(), torch.cat([angle, angle], -1)[None].sin()
    scale = d ** -0.5

    def rope(t):
        rotated = torch.cat((-t[..., d // 2:], t[..., :d // 2]), -1)
        return t * cos[:, :, None] + rotated * sin[:, :, None]

    def reference(h, aq, bq, ak, bk, av, bv, ao, bo):
        x = _rms_norm(h, norm, 1e-6).reshape(seq, hidden)
        q, k, v = (_lora(x, deq[i], a, b, s[i]).view(1, seq, -1, d).transpose(1, 2)
                   for i, (a, b) in enumerate(((aq, bq), (ak, bk), (av, bv))))
        q, k = rope(q.transpose(1, 2)).transpose(1, 2), rope(k.transpose(1, 2)).transpose(1, 2)
        k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
        causal = torch.ones(seq, seq, dtype=torch.bool).tril()
        att = torch.softmax((q @ k.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf")), -1) @ v
        return _lora(att.transpose(1, 2).reshape(seq, -1), deq[3], ao, bo, s[3]).view(1, seq, hidden)

    shapes = ((r, hidden), (heads * d, r), (r, hidden), (kv * d, r), (r, hidden), (kv * d, r), (r, heads * d),
              (hidden, r))
    leaves = [_randn(1, seq, hidden, gen=g)] + [_randn(*shape, scale=0.2, gen=g) for shape in shapes]
    return Case("RecomputedAttention", RecomputedAttention,
                lambda fn, h, *lora: fn.apply(h, cos, sin, norm, 1e-6, None, w, s, (heads, kv, d), scale, True, *lora),
                reference, leaves)


def _sorted_lora_experts() -> Case:
    from twinbench.impls.qlora.moe_lora import SortedLoRAExperts
    from twinbench.reference.moe import moe_experts

    g = _gen()
    experts, hidden, inter, tokens, k, r = 3, 8, 6, 5, 2, 2
    w_gu, w_d = _randn(experts, 2 * inter, hidden, scale=0.3, gen=g), _randn(experts, hidden, inter, scale=0.3, gen=g)
    idx = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    s = (0.5, 2.0)

    def call(fn, h, wts, l_gu, r_gu, l_d, r_d):
        return fn.apply(h, idx, wts, w_gu, w_d, s, False, l_gu, r_gu, l_d, r_d)

    leaves = [_randn(tokens, hidden, gen=g), torch.rand(tokens, k, generator=g),
              _randn(experts, 2 * inter, r, scale=0.2, gen=g), _randn(experts, r, hidden, scale=0.2, gen=g),
              _randn(experts, hidden, r, scale=0.2, gen=g), _randn(experts, r, inter, scale=0.2, gen=g)]
    return Case("SortedLoRAExperts", SortedLoRAExperts, call,
                lambda h, wts, a, b, c, d: moe_experts(h, idx, wts, w_gu + s[0] * a @ b, w_d + s[1] * c @ d), leaves)


def _triton():
    from twinbench.impls.kernels.availability import triton_available

    ok, why = triton_available(torch.device("cpu"))
    if not ok:
        pytest.skip(why)


def _math_attention(q, k, v):
    k, v = k.repeat_interleave(q.shape[1] // k.shape[1], 1), v.repeat_interleave(q.shape[1] // k.shape[1], 1)
    causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~causal, float("-inf"))
    return torch.softmax(scores, -1) @ v  # not SDPA: its CPU flash kernel has no second derivative


def _flash_attention() -> Case:
    _triton()
    from twinbench.impls.attention import triton_fa_kernels
    from twinbench.impls.attention.triton_fa import FlashAttention

    g = _gen()
    leaves = [_randn(1, 2, 8, 16, gen=g), _randn(1, 1, 8, 16, gen=g), _randn(1, 1, 8, 16, gen=g)]
    return Case("FlashAttention", FlashAttention,
                lambda fn, q, k, v: fn.apply(q, k, v, True, 16 ** -0.5, triton_fa_kernels), _math_attention, leaves)


def _triton_nf4_lora() -> Case:
    _triton()
    from twinbench.impls.kernels.nf4_weight import NF4Weight
    from twinbench.impls.quant_linear.triton_nf4 import _TritonNF4LoRA
    from twinbench.reference.nf4 import dequantize_state, quantize_nf4

    g = _gen()
    n, k, bs = 16, 64, 64
    state = quantize_nf4(_randn(n, k, scale=0.3, gen=g), blocksize=bs)
    weight = NF4Weight(state.packed, state.absmax, state.shape, bs)
    packed2d, scales = weight.packed.reshape(n, k // 2), weight.block_scales().reshape(n, k // bs).contiguous()
    deq = dequantize_state(state, torch.float32)
    leaves = [_randn(3, k, gen=g), _randn(2, k, scale=0.1, gen=g), _randn(n, 2, scale=0.1, gen=g)]
    return Case("_TritonNF4LoRA", _TritonNF4LoRA,
                lambda fn, x, a, b: fn.apply(x, packed2d, scales, a, b, 0.5, bs, "gemv"),
                lambda x, a, b: _lora(x, deq, a, b, 0.5), leaves)


def _triton_fp8_fused() -> Case:
    _triton()
    from twinbench.impls.fp8_linear.triton_fp8 import _fused_path, _FusedRowwiseLinear

    w, ste, leaves = _fp8_operands()
    path = _fused_path("cpu", "e4m3")
    return Case("_FusedRowwiseLinear", _FusedRowwiseLinear,
                lambda fn, x: fn.apply(x, w.codes, w.scale, "e4m3", "e5m2", "e4m3", True, path), ste, leaves,
                tol=0.3, first_tol=None)


WRAPPED = {c.__name__: c for c in (_sorted_experts, _fused_dpo, _torch_fp8, _reference_fp8, _silu_mul,
                                   _nf4_lora_projections, _recomputed_mlp, _recomputed_attention,
                                   _sorted_lora_experts, _flash_attention, _triton_nf4_lora, _triton_fp8_fused)}


@pytest.mark.parametrize("build", WRAPPED.values(), ids=WRAPPED.keys())
def test_second_derivatives_raise_or_are_right_and_the_unwrapped_op_is_caught(build):
    case = build()
    assert_right_or_raises(case.name, case.op(), case.reference, case.leaves, case.tol, case.first_tol)
    # before the wrap: no graph, part of one, or another op's error; the same check fails on it
    with pytest.raises(AssertionError):
        assert_right_or_raises(case.name, case.op(unwrapped(case.fn)), case.reference, case.leaves, case.tol,
                               case.first_tol)


@pytest.mark.parametrize("build", WRAPPED.values(), ids=WRAPPED.keys())
def test_first_order_gradients_are_unchanged_by_the_wrap(build):
    case = build()

    def grads(fn, create_graph):
        leaves = [t.detach().clone().requires_grad_(True) for t in case.leaves]
        out = case.call(fn, *leaves)
        return [g.detach() for g in torch.autograd.grad(loss_of(out, True), leaves, create_graph=create_graph)]

    before = grads(unwrapped(case.fn), False)
    assert all(bool(g.abs().max() > 0) for g in before)
    for after in (grads(case.fn, False), grads(case.fn, True)):  # plain, and the values under create_graph
        assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_topk_softmax_second_derivatives_are_right_and_the_kernels_lse_was_not(monkeypatch):
    """TopKSoftmax's backward is torch ops: rebuilding the kernel's logsumexp from the logits under create_graph
    makes it right (without renorm the constant lse dropped terms); planted: the kernel's lse kept."""
    _triton()
    from twinbench.impls.gating import triton_router
    from twinbench.reference.moe import gating

    g = _gen()
    leaves = [_randn(5, 8, gen=g), _randn(6, 8, gen=g)]

    def pair(renorm: bool) -> tuple[Op, Op]:
        return (lambda h, w: triton_router.triton_topk_softmax(h, w, top_k=2, norm_topk_prob=renorm)["weights"],
                lambda h, w: gating(h, w, top_k=2, norm_topk_prob=renorm)["weights"])

    for renorm in (False, True):
        assert_right_or_raises("TopKSoftmax", *pair(renorm), leaves, 1e-4, 1e-4)
    monkeypatch.setattr(triton_router, "_differentiable_lse", lambda logits, lse: lse)
    assert_right_or_raises("TopKSoftmax", *pair(True), leaves, 1e-4, 1e-4)  # renormalised: lse cancels out
    with pytest.raises(AssertionError, match="silently wrong"):
        assert_right_or_raises("TopKSoftmax", *pair(False), leaves, 1e-4, 1e-4)


def test_once_differentiable_alone_would_be_silently_wrong():
    """Why not torch's once_differentiable: with a constant output gradient it adds no error node, and with one it
    hangs the node on fresh leaves, which torch.autograd.grad(penalty, x) prunes away (measured, torch 2.13)."""

    def cube(decorate):
        class Cube(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                ctx.save_for_backward(x)
                return x ** 3

            @staticmethod
            @decorate
            def backward(ctx, g):
                (x,) = ctx.saved_tensors
                return 3 * x * x * g

        return lambda x: Cube.apply(x)

    x = [torch.linspace(-1.0, 1.0, 5)]
    assert_right_or_raises("Cube", cube(differentiable_once("Cube")), lambda t: t ** 3, x, 1e-6, 1e-6)
    with pytest.raises(AssertionError, match="silently wrong"):
        assert_right_or_raises("Cube", cube(once_differentiable), lambda t: t ** 3, x, 1e-6, 1e-6)
