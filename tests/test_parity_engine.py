"""The parity rule must catch wrong attention kernels and pass a right one over many seeds."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from twinbench.harness.core.case import Case
from twinbench.harness.core.parity import (
    ImplRun,
    ParityVerdict,
    PoisonedAllocations,
    TensorCheck,
    TrialChecks,
    check_parity,
    compare_tensor,
    make_grad_outputs,
    merge_trial,
    reference_placement,
    run_impl_poisoned,
    run_reference,
    same_results,
)
from twinbench.harness.core.registry import IMPLS, Impl, Tolerance, load_plugins
from twinbench.reference.attention import attention
from twinbench.suites.attention import SUITE

load_plugins()
REF = IMPLS[("attention", "reference")]

SQUARE = Case.of(batch=1, heads=4, kv_heads=2, seq_q=24, seq_k=24, head_dim=16, causal=True, dtype="fp32")
RECT = Case.of(batch=1, heads=4, kv_heads=2, seq_q=12, seq_k=20, head_dim=16, causal=True, dtype="fp32")
BF16 = SQUARE.replace(dtype="bf16")


def _impl(fn, name="planted", deterministic=True):
    return Impl(name=name, suite="attention", fn=fn, deterministic=deterministic)


def no_causal_mask(q, k, v, *, causal, scale):
    return attention(q, k, v, causal=False, scale=scale)


def wrong_scale(q, k, v, *, causal, scale):
    return attention(q, k, v, causal=causal, scale=scale * 1.05)


def top_left_mask(q, k, v, *, causal, scale):
    # SDPA's is_causal aligns top-left: wrong when seq_q != seq_k (a real, subtle bug)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)


def unwritten_tail(q, k, v, *, causal, scale):
    good = attention(q, k, v, causal=causal, scale=scale)
    out = torch.empty_like(good)
    out[..., :-1] = good[..., :-1]  # forgets the last column: the poison shows it
    return out


def mutates_input(q, k, v, *, causal, scale):
    out = attention(q, k, v, causal=causal, scale=scale)
    q.data[0, 0, 0, 0] += 1.0
    return out


def returns_nan(q, k, v, *, causal, scale):
    out = attention(q, k, v, causal=causal, scale=scale).clone()
    out[0, 0, 0, 0] = float("nan")
    return out


def wrong_gqa_mapping(q, k, v, *, causal, scale):
    groups = q.shape[1] // k.shape[1]
    return attention(q, k.repeat(1, groups, 1, 1), v.repeat(1, groups, 1, 1), causal=causal, scale=scale)


def wrong_backward(q, k, v, *, causal, scale):
    class Half(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * 0.5

    return attention(Half.apply(q), k, v, causal=causal, scale=scale)


def nondeterministic(q, k, v, *, causal, scale):
    out = attention(q, k, v, causal=causal, scale=scale)
    return out + torch.rand(()) * 1e-6


def returns_zeros(q, k, v, *, causal, scale):
    return torch.zeros_like(q) + 0 * q


PLANTED = [
    ("no causal mask", no_causal_mask, SQUARE),
    ("wrong scale", wrong_scale, SQUARE),
    ("top-left causal mask", top_left_mask, RECT),
    ("unwritten output", unwritten_tail, SQUARE),
    ("mutates its input", mutates_input, SQUARE),
    ("returns NaN", returns_nan, SQUARE),
    ("wrong GQA mapping", wrong_gqa_mapping, SQUARE),
    ("wrong gradient", wrong_backward, SQUARE),
    ("non-deterministic", nondeterministic, SQUARE),
    ("all zeros", returns_zeros, SQUARE),
    ("no causal mask (bf16)", no_causal_mask, BF16),
]


@pytest.mark.parametrize("label,fn,case", PLANTED, ids=[p[0] for p in PLANTED])
def test_planted_bug_is_caught(label, fn, case):
    verdict = check_parity(SUITE, _impl(fn), REF, case, "cpu", trials=2)
    assert not verdict.ok, f"{label} passed parity: {verdict.checks}"


def test_failure_details_name_the_problem():
    v = check_parity(SUITE, _impl(mutates_input), REF, SQUARE, "cpu", trials=1)
    assert "mutated its input 'q'" in v.problems
    v = check_parity(SUITE, _impl(unwritten_tail), REF, SQUARE, "cpu", trials=1)
    assert "non-finite" in v.checks["out"].detail
    v = check_parity(SUITE, _impl(wrong_backward), REF, SQUARE, "cpu", trials=1)
    assert v.checks["out"].ok and not v.checks["grad:q"].ok and v.checks["grad:k"].ok


@pytest.mark.parametrize("case", [SQUARE, RECT, BF16, SQUARE.replace(dtype="fp16", head_dim=40)],
                         ids=lambda c: c.id)
def test_sdpa_passes_over_many_seeds(case):
    verdict = check_parity(SUITE, IMPLS[("attention", "sdpa")], REF, case, "cpu", trials=12, seed=100)
    assert verdict.ok, verdict.checks
    assert verdict.stable
    worst = max(c.ratio for c in verdict.checks.values())
    assert 0 < worst <= 1.0
    assert set(verdict.checks) == {"out", "grad:q", "grad:k", "grad:v"}


def test_bound_uses_the_low_precision_reference():
    v = check_parity(SUITE, IMPLS[("attention", "sdpa")], REF, BF16, "cpu", trials=1)
    out = v.checks["out"]
    assert out.ref_lo_error is not None and out.bound >= 2 * out.ref_lo_error
    assert v.hi_dtype == "float32"
    v32 = check_parity(SUITE, IMPLS[("attention", "sdpa")], REF, SQUARE, "cpu", trials=1)
    assert v32.hi_dtype == "float64"


def test_zero_output_never_passes_a_loose_bound():
    ref = torch.randn(64, dtype=torch.float64)
    loose = Tolerance(three_way=False, atol=10.0)  # atol far above the output's scale
    check = compare_tensor("out", torch.zeros(64), ref, None, loose, is_grad=False)
    # The cap is 10% of the reference's magnitude (measured on the reference cast to the judged dtype, fp32).
    assert not check.ok
    assert check.bound == pytest.approx(0.1 * float(ref.abs().max()), rel=1e-6)


def test_nan_where_reference_has_nan_passes_and_elsewhere_fails():
    ref = torch.tensor([1.0, float("nan"), float("inf")], dtype=torch.float64)
    tol = Tolerance(three_way=False, atol=1e-6)
    assert compare_tensor("out", ref.float(), ref, None, tol, False).ok
    moved = torch.tensor([float("nan"), 1.0, float("inf")])
    assert not compare_tensor("out", moved, ref, None, tol, False).ok
    sign = torch.tensor([1.0, float("nan"), float("-inf")])
    assert not compare_tensor("out", sign, ref, None, tol, False).ok


def test_missing_gradient_fails():
    check = compare_tensor("grad:q", None, torch.ones(3), None, Tolerance(), True)
    assert not check.ok and math.isinf(check.ratio)


def test_poison_fills_uninitialised_allocations():
    with PoisonedAllocations():
        f = torch.empty(8)
        i = torch.empty(4, dtype=torch.int64)
        like = torch.empty_like(f)
        new = f.new_empty((3,))
    assert f.isnan().all() and like.isnan().all() and new.isnan().all()
    assert (i == torch.iinfo(torch.int64).max).all()


def test_fp32_bound_allows_a_few_ulps_of_reordering_but_not_a_real_error():
    gen = torch.Generator().manual_seed(3)
    hi = torch.randn(4096, generator=gen, dtype=torch.float64)
    lucky_lo = hi.float().double()  # an fp32 reference that happens to round exactly: lo error 0.5 ulp
    eps = torch.finfo(torch.float32).eps * float(hi.abs().max())
    reordered = (hi + 8 * eps * torch.sign(torch.randn(4096, generator=gen, dtype=torch.float64))).float()
    assert compare_tensor("out", reordered, hi, lucky_lo, Tolerance(), False).ok
    off_by_1e4 = (hi * (1 + 1e-4)).float()
    assert not compare_tensor("out", off_by_1e4, hi, lucky_lo, Tolerance(), False).ok


def _jitter(size):
    def impl(q, k, v, *, causal, scale):
        out = attention(q, k, v, causal=causal, scale=scale)
        noise = torch.randn(out.shape, dtype=torch.float64) * size * float(out.detach().abs().max())
        return out + noise.to(out.dtype)  # fresh noise each call: two runs differ

    return impl


def test_nondeterministic_impl_may_differ_by_reordering_but_not_more():
    eps = torch.finfo(torch.float32).eps
    reordered = check_parity(SUITE, _impl(_jitter(2 * eps), deterministic=False), REF, SQUARE, "cpu", trials=1)
    assert reordered.stable, reordered.problems
    noisy = check_parity(SUITE, _impl(_jitter(1e-4), deterministic=False), REF, SQUARE, "cpu", trials=1)
    assert noisy.stable is False and "unstable: the same inputs gave different results" in noisy.problems


# The steps of check_parity, one at a time.

def test_the_reference_runs_upcast_and_fp64_leaves_mps_for_the_cpu():
    assert reference_placement(SUITE, SQUARE, "cpu", None).hi_dtype == torch.float64
    assert reference_placement(SUITE, BF16, "cpu", None).hi_dtype == torch.float32
    assert reference_placement(SUITE, SQUARE, "mps", None).device == "cpu"  # MPS has no fp64
    assert reference_placement(SUITE, BF16, "mps", None).device == "mps"
    named = reference_placement(dataclasses.replace(SUITE, hi_dtype=lambda case: torch.float16), BF16, "cpu", None)
    assert named.hi_dtype == torch.float16 and named.hi_dtype_label == "float16"  # the suite's own choice


def test_the_reference_runs_share_one_output_gradient():
    inputs = SUITE.make_inputs(BF16, "cpu", 0)
    three_way = run_reference(SUITE, REF, inputs, reference_placement(SUITE, BF16, "cpu", None), "cpu",
                              grad_seed=0, backward=True)
    assert three_way.hi_outputs["out"].dtype == torch.float32 and three_way.lo_outputs["out"].dtype == torch.bfloat16
    assert three_way.grad_outputs["out"].dtype == torch.bfloat16
    assert torch.equal(three_way.grad_outputs["out"].float(),
                       make_grad_outputs({"out": three_way.lo_outputs["out"]}, 0)["out"].float())  # one draw
    assert run_reference(SUITE, REF, inputs, reference_placement(SUITE, BF16, "cpu", None), "cpu",
                         grad_seed=0, backward=False).grad_outputs is None


def test_the_poisoned_run_names_a_mutated_input_and_leaves_the_callers_tensors_alone():
    inputs = SUITE.make_inputs(SQUARE, "cpu", 0)
    q_before = inputs.tensors["q"].clone()
    run = run_impl_poisoned(_impl(mutates_input), inputs, None)
    assert run.mutated == ["q"] and run.grads == {}
    assert torch.equal(inputs.tensors["q"], q_before)  # the impl wrote into its own copy
    assert run_impl_poisoned(_impl(unwritten_tail), inputs, None).outputs["out"][..., -1].isnan().all()


def _run(**outputs):
    return ImplRun(outputs=outputs, grads={}, metrics={}, mutated=[])


def test_a_rerun_is_the_same_bit_for_bit_or_within_reordering():
    x = torch.randn(64)
    nudged = x + torch.finfo(torch.float32).eps * x.abs().max()
    assert same_results(_run(out=x), _run(out=x.clone()), deterministic=True)
    assert not same_results(_run(out=x), _run(out=nudged), deterministic=True)
    assert not same_results(_run(out=x), _run(), deterministic=True)  # an output gone on the re-run
    assert same_results(_run(out=x), _run(out=nudged), deterministic=False)
    assert not same_results(_run(out=x), _run(out=x * 1.001), deterministic=False)


def _check(name, ok, ratio, detail=""):
    return TensorCheck(name=name, ok=ok, error=ratio, bound=1.0, ratio=ratio, mean_error=ratio, ref_lo_error=None,
                       scale=1.0, metric="max", detail=detail)


def test_the_verdict_keeps_each_tensors_worst_trial():
    verdict = ParityVerdict(ok=True)
    merge_trial(verdict, TrialChecks(measured=[_check("out", True, 0.5)], exact=[_check("ids", False, 1, "a")]))
    merge_trial(verdict, TrialChecks(measured=[_check("out", True, 0.2)], exact=[_check("ids", True, 0)]))
    assert verdict.checks["out"].ratio == 0.5 and verdict.checks["ids"].detail == "a"  # a pass never replaces
    merge_trial(verdict, TrialChecks(measured=[_check("out", False, 0.1)], problems=["output 'x' missing"]))
    assert not verdict.checks["out"].ok and verdict.problems == ["output 'x' missing"]  # a failure does
    merge_trial(verdict, TrialChecks(measured=[_check("out", True, 9.0)]))
    assert not verdict.checks["out"].ok


def test_a_few_low_precision_values_still_get_a_rounding_floor():
    """One token's router weights in bf16: for 0.6484375 the add-0.3 probe loses nothing, so before the half-ulp
    floor the bound was 0 and an impl one ulp off failed with ratio inf (seen on the MoE suite's 1-token case)."""

    ulp = 2.0 ** -8  # bf16 at magnitude [0.5, 1)
    hi = torch.tensor([0.6484375], dtype=torch.float64)
    lo = hi.to(torch.bfloat16)
    one_ulp_off = compare_tensor("g", (hi + ulp).to(torch.bfloat16), hi, lo, Tolerance(), is_grad=True)
    assert one_ulp_off.bound > 0 and one_ulp_off.ok, one_ulp_off
    planted = compare_tensor("g", (hi + 16 * ulp).to(torch.bfloat16), hi, lo, Tolerance(), is_grad=True)
    assert not planted.ok, planted  # the floor is rounding-sized, not a free pass
