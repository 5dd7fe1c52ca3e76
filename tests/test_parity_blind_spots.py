"""The parity engine's blind spots: each planted wrong impl is caught on every quick case where it is wrong.

Each planted impl here was missed by the engine before (on some or all cases); the tests run it on every case
of a suite's quick profile where it computes something wrong and assert a 'wrong' verdict (not a crash).
"""

import importlib.metadata
import math
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from twinbench.harness.core import parity, registry
from twinbench.harness.core.errors import UsageError
from twinbench.harness.core.memory import TensorPeak
from twinbench.harness.core.parity import PoisonedAllocations, check_parity, compare_tensor
from twinbench.harness.core.registry import (
    IMPLS,
    Impl,
    Tolerance,
    load_plugin_file,
    load_plugins,
    register_impl,
)
from twinbench.reference.moe import gating, moe_experts

load_plugins()
MOE = __import__("twinbench.suites.moe_ffn", fromlist=["SUITE"]).SUITE
GATING = __import__("twinbench.suites.gating", fromlist=["SUITE"]).SUITE
DPO = __import__("twinbench.suites.dpo", fromlist=["SUITE"]).SUITE
MOE_QUICK, GATING_QUICK = MOE.cases("quick"), GATING.cases("quick")


def _impl(suite, fn, **kw):
    return Impl(name="planted", suite=suite, fn=fn, **kw)


def _verdict(suite, fn, case, trials=1, **kw):
    return check_parity(suite, _impl(suite.name, fn, **kw), IMPLS[(suite.name, suite.reference)], case, "cpu",
                        trials=trials)


# 12: an output of the wrong shape is 'wrong' with the shapes in the reason, never a crash.

def one_token_short(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj):
    return moe_experts(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj)[:-1]


@pytest.mark.parametrize("case", MOE_QUICK, ids=lambda c: c.id)
def test_wrong_output_shape_is_wrong_not_crashed(case):
    v = _verdict(MOE, one_token_short, case)  # before: the backward's grad_output shape error escaped
    assert not v.ok
    rows = case["batch"] * case["seq"]
    assert f"shape ({rows - 1}, {case['hidden']}) != reference ({rows}, {case['hidden']})" in v.reason()
    assert "missing" in v.checks["grad:hidden_states"].detail  # nothing to seed its backward with


# 16: every allocation is poisoned, forward and backward, however it is made.

class _UnwrittenEmptyExperts(torch.autograd.Function):
    """Identity on the expert weights whose backward writes only the experts that got tokens: a gradient
    buffer from torch.empty_like inside a custom backward, never written for an empty expert."""

    @staticmethod
    def forward(ctx, weight, used):
        ctx.used = used
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, g):
        out = torch.empty_like(g)
        out[ctx.used] = g[ctx.used]
        return out, None


def empty_expert_grad_unwritten(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj):
    used = torch.bincount(top_k_index.reshape(-1), minlength=gate_up_proj.shape[0]) > 0
    gate_up = _UnwrittenEmptyExperts.apply(gate_up_proj, used)
    return moe_experts(hidden_states, top_k_index, top_k_weights, gate_up, down_proj)


def aten_empty_tail_unwritten(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj):
    """The allocation an extension makes (``at::empty``, ``torch.ops.aten.empty``), last row never written."""
    good = moe_experts(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj)
    out = torch.ops.aten.empty.memory_format(list(good.shape), dtype=good.dtype)
    out[:-1] = good[:-1]
    return out + 0 * good


def _has_empty_expert(case):
    return bool(MOE.make_inputs(case, "cpu", 0).meta["empty_experts"])


@pytest.mark.parametrize("case", [c for c in MOE_QUICK if _has_empty_expert(c)], ids=lambda c: c.id)
def test_unwritten_gradient_in_a_custom_backward_is_poisoned(case):
    v = _verdict(MOE, empty_expert_grad_unwritten, case)
    assert not v.checks["grad:gate_up_proj"].ok and "NaN/Inf placement" in v.checks["grad:gate_up_proj"].detail
    assert v.checks["out"].ok  # the forward is right: only the unwritten gradient is caught


def test_every_quick_moe_case_has_an_empty_expert_but_the_first():
    assert [_has_empty_expert(c) for c in MOE_QUICK] == [False, True, True, True]


@pytest.mark.parametrize("case", MOE_QUICK, ids=lambda c: c.id)
def test_aten_empty_from_an_extension_is_poisoned(case):
    v = _verdict(MOE, aten_empty_tail_unwritten, case)
    assert not v.checks["out"].ok and v.checks["out"].misplaced_nonfinite == case["hidden"]


def test_poison_covers_every_way_to_allocate_forward_and_backward():
    seen = {}

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            seen["backward"] = torch.empty_like(g).clone()
            return g * 2

    x = torch.randn(4, requires_grad=True)
    with PoisonedAllocations():
        made = [torch.empty(3), torch.empty_like(x), x.new_empty(2), torch.empty_strided((2,), (1,)),
                torch.ops.aten.empty.memory_format([3]), torch.ops.aten.empty_strided.default([2], [1])]
        ints = torch.ops.aten.empty.memory_format([3], dtype=torch.int32)
        torch.autograd.grad(Probe.apply(x).sum(), x)
    assert all(bool(t.isnan().all()) for t in made)
    assert bool((ints == torch.iinfo(torch.int32).max).all())
    assert bool(seen["backward"].isnan().all())


# 17: a result cached from the previous call is seen with one trial.

def stale_after_first_call():
    cache = {}

    def fn(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj):
        if "out" not in cache:  # keyed on nothing: every later call returns the first call's result
            cache["out"] = moe_experts(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj).detach()
        return cache["out"].clone()

    return fn


@pytest.mark.parametrize("case", MOE_QUICK, ids=lambda c: c.id)
def test_a_stale_cached_output_is_caught_with_one_trial(case):
    v = _verdict(MOE, stale_after_first_call(), case, trials=1, backward=False)
    assert not v.checks["out"].ok  # before: the same-input re-run returned the cached (right) result


# 18: gradients behind a NaN row are compared on the same inputs with the non-finite values set to 0.

class _HalfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g):
        return g * 0.5


def router_weight_grad_halved(hidden_states, router_weight, *, top_k, norm_topk_prob):
    return gating(hidden_states, _HalfGrad.apply(router_weight), top_k=top_k, norm_topk_prob=norm_topk_prob)


@pytest.mark.parametrize("case", GATING_QUICK, ids=lambda c: c.id)
def test_a_wrong_gradient_behind_a_nan_row_is_caught(case):
    v = _verdict(GATING, router_weight_grad_halved, case)
    check = v.checks["grad:router_weight"]
    assert not check.ok, check
    if case["nonfinite_rows"]:  # the reference's gradient is all NaN there: the finite twin caught it
        assert "set to 0" in check.detail


def test_nan_placement_is_still_checked_on_the_original_inputs():
    def nan_gradient_everywhere(hidden_states, router_weight, *, top_k, norm_topk_prob):
        out = gating(hidden_states, router_weight, top_k=top_k, norm_topk_prob=norm_topk_prob)
        return {**out, "weights": out["weights"] + 0 * router_weight.sum() * float("nan")}

    v = _verdict(GATING, nan_gradient_everywhere, GATING_QUICK[0])
    assert not v.checks["weights"].ok and v.checks["weights"].misplaced_nonfinite > 0


# 19: every output's dtype is the reference's in the test dtype.

def returns_float64(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj):
    return moe_experts(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj).double()


@pytest.mark.parametrize("case", MOE_QUICK, ids=lambda c: c.id)
def test_an_upcast_output_is_wrong(case):
    v = _verdict(MOE, returns_float64, case)  # numerically it is the reference: before, it passed
    assert not v.checks["out"].ok and f"dtype float64 != reference's {case['dtype']}".replace(
        "fp32", "float32").replace("bf16", "bfloat16").replace("fp16", "float16") in v.checks["out"].detail


def test_a_suite_may_declare_an_output_dtype_that_differs():
    import dataclasses

    lenient = dataclasses.replace(MOE, output_dtype=lambda case, name: torch.float64)
    v = check_parity(lenient, _impl("moe_ffn", returns_float64), IMPLS[("moe_ffn", "reference")], MOE_QUICK[0],
                     "cpu", trials=1)
    assert v.ok, v.reason()


# 20: a registered name is never silently replaced; each impl records its origin.

def test_replacing_a_registered_impl_is_a_usage_error_naming_both_sources(tmp_path):
    plugin = tmp_path / "hostile.py"
    plugin.write_text("from twinbench.harness.core.registry import register_impl\n\n"
                      "@register_impl('moe_ffn', 'reference', tags=('reference',))\n"
                      "def reference(**kw):\n    return None\n")
    before = IMPLS[("moe_ffn", "reference")]
    with pytest.raises(UsageError) as err:
        load_plugin_file(plugin)
    msg = str(err.value)
    assert "\n" not in msg and "twinbench.suites.moe_ffn.reference" in msg and "hostile.py" in msg
    assert IMPLS[("moe_ffn", "reference")] is before


def test_replace_true_replaces_and_the_same_function_again_is_no_replacement():
    def first(x):
        return x

    def second(x):
        return x

    try:
        register_impl("blind_spots_scratch", "a")(first)
        register_impl("blind_spots_scratch", "a")(first)  # a module imported twice
        with pytest.raises(UsageError):
            register_impl("blind_spots_scratch", "a")(second)
        register_impl("blind_spots_scratch", "a", replace=True)(second)
        assert IMPLS[("blind_spots_scratch", "a")].fn is second
    finally:
        IMPLS.pop(("blind_spots_scratch", "a"), None)


def test_every_impl_knows_where_it_came_from():
    origin = IMPLS[("moe_ffn", "reference")].origin
    assert origin.module == "twinbench.suites.moe_ffn" and origin.file.endswith("suites/moe_ffn.py")
    assert set(origin.to_json()) == {"module", "file", "package", "version"}
    assert (origin.package, origin.version) == ("twinbench", importlib.metadata.version("twinbench"))


def test_an_impl_of_a_plugin_file_or_an_uninstalled_module_has_no_distribution(tmp_path):
    plugin = tmp_path / "vendor.py"
    plugin.write_text("from twinbench.harness.core.registry import register_impl\n\n"
                      "@register_impl('blind_spots_scratch', 'vendor')\n"
                      "def vendor(**kw):\n    return None\n")
    try:
        load_plugin_file(plugin)
        origin = IMPLS[("blind_spots_scratch", "vendor")].origin
        assert origin.file == str(plugin.resolve()) and (origin.package, origin.version) == (None, None)
    finally:
        IMPLS.pop(("blind_spots_scratch", "vendor"), None)
    # a module installed under another distribution name is found by the full scan (PyYAML provides yaml)
    assert registry._distribution_of("yaml")[0] == "PyYAML"
    assert registry._distribution_of("no_such_module_anywhere") == (None, None)


def test_registering_the_built_in_impls_does_not_load_dynamo():
    """Every harness worker registers the built-in impls at start: importing torch._dynamo there (a module-level
    ``torch.compiler.disable``, as impls/quant_linear/fused.py had until 2026-12-06) cost 2.4 s per process."""
    code = ("import sys; from twinbench.harness.core import registry; registry.load_plugins(); "
            "print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# 21: DPO bf16 rewards are bounded by the log-prob sums they come from.

BF16_DPO = DPO.cases("quick")[1]


def test_bf16_rewards_near_zero_no_longer_fail_the_reference():
    # seeds where the old 10%-of-|reward| cap failed the reference against itself upcast
    ref = IMPLS[("dpo", "reference")]
    for seed in OLD_DPO_FAILING_SEEDS:
        v = check_parity(DPO, ref, ref, BF16_DPO, "cpu", trials=1, seed=seed, backward=False)
        assert v.ok, (seed, v.reason())
        assert max(v.checks[n].ratio for n in ("chosen_rewards", "rejected_rewards", "reward_margins")) < 0.25


def zero_rewards(**kw):
    out = dict(IMPLS[("dpo", "reference")].fn(**kw))
    for n in ("chosen_rewards", "rejected_rewards", "reward_margins"):
        out[n] = torch.zeros_like(out[n])
    return out


def test_bf16_rewards_are_still_checked():
    v = _verdict(DPO, zero_rewards, BF16_DPO, trials=2, backward=False)
    assert not v.checks["reward_margins"].ok


# 22: the message names the failure: a NaN placement with zero error does not read "err 0 > bound".

def test_a_nan_placement_failure_says_so():
    ref = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    check = compare_tensor("out", torch.tensor([1.0, float("nan"), 3.0]), ref, None,
                           Tolerance(three_way=False, atol=1e-3), False)
    assert not check.ok and check.error == 0
    assert check.describe().startswith("out: NaN/Inf placement: 1 element(s)") and "err" not in check.describe()
    worse = compare_tensor("out", torch.tensor([1.5, float("nan"), 3.0]), ref, None,
                           Tolerance(three_way=False, atol=1e-3), False)
    assert worse.describe().startswith("out: err 0.5 > bound 0.001; NaN/Inf placement")


# 23: chunked comparison: the extra memory is a few chunks, not float64 copies of the whole tensor.

def _peak_of_compare(n, monkeypatch, chunk):
    monkeypatch.setattr(parity, "CHUNK_ELEMENTS", chunk)
    gen = torch.Generator().manual_seed(0)
    hi = torch.randn(n, 16, generator=gen)
    opt = (hi + 1e-3 * torch.randn(n, 16, generator=gen)).to(torch.bfloat16)
    lo = hi.to(torch.bfloat16)
    hi[3, 0] = float("nan")
    opt[3, 0] = float("nan")
    peak = TensorPeak()
    with peak:
        check = compare_tensor("grad:x", opt, hi, lo, Tolerance(), True)
    return peak.peak, check


def test_compare_tensor_peak_memory_is_a_few_chunks(monkeypatch):
    chunk = 1 << 14
    n = 1 << 16  # 2^20 elements: a float64 copy is 8 MiB, a chunk's is 128 KiB
    peak, check = _peak_of_compare(n, monkeypatch, chunk)
    assert check.ok and check.misplaced_nonfinite == 0
    assert peak <= 12 * chunk * 8, peak
    whole, same = _peak_of_compare(n, monkeypatch, 1 << 30)  # the old way: the whole tensor at once
    assert whole > 12 * chunk * 8 and same.error == check.error and same.bound == check.bound


def test_chunked_compare_equals_the_whole_tensor_compare(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    hi = torch.randn(37, 5, 3, generator=gen, dtype=torch.float64)
    opt = (hi * (1 + 1e-5)).float()
    lo = hi.float()
    hi[1, 2, 0] = opt[1, 2, 0] = float("inf")
    whole = compare_tensor("out", opt, hi, lo, Tolerance(), False)
    monkeypatch.setattr(parity, "CHUNK_ELEMENTS", 4)  # blocks smaller than a row of the inner dims
    chunked = compare_tensor("out", opt, hi, lo, Tolerance(), False)
    for field in ("ok", "bound", "scale", "ref_lo_error", "misplaced_nonfinite"):
        assert getattr(chunked, field) == pytest.approx(getattr(whole, field)), field
    assert chunked.error == pytest.approx(whole.error) and chunked.mean_error == pytest.approx(whole.mean_error)


# Truth on accelerators 2: float64 parity arithmetic never runs on the device (MPS has none).

class FakeDevice(TorchDispatchMode):
    """Meta tensors stand in for a device tensor: a copy to the CPU gives seeded numbers, reading a scalar
    gives 0; every op that makes a float64 tensor off the CPU is recorded."""

    def __init__(self):
        super().__init__()
        self.float64_on_device = []
        self.gen = torch.Generator().manual_seed(0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if func is torch.ops.aten._to_copy.default and src is not None and src.is_meta and \
                str(kwargs.get("device", "meta")) == "cpu":
            dtype = kwargs.get("dtype") or src.dtype
            return torch.randn(src.shape, generator=self.gen).to(dtype)
        if func is torch.ops.aten._local_scalar_dense.default and src is not None and src.is_meta:
            return 0
        out = func(*args, **kwargs)
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.device.type != "cpu":
                self.float64_on_device.append(str(func))
        return out


def _on_fake_device(n=40):
    return (torch.empty(n, 3, device="meta", dtype=torch.float16), torch.empty(n, 3, device="meta"),
            torch.empty(n, 3, device="meta", dtype=torch.float16))


def test_parity_arithmetic_makes_no_float64_on_the_device(monkeypatch):
    monkeypatch.setattr(parity, "CHUNK_ELEMENTS", 16)
    opt, hi, lo = _on_fake_device()
    with FakeDevice() as spy:
        check = compare_tensor("out", opt, hi, lo, Tolerance(), False)
        parity.reorder_allowance(opt)
        parity._close_enough_twice(opt, opt)
        parity._bitwise_equal(opt, opt)
    assert not math.isnan(check.error)
    assert spy.float64_on_device == []


def test_the_fake_device_spy_sees_float64_made_on_the_device(monkeypatch):
    # the old comparison converted on the tensor's own device: the spy must catch that
    monkeypatch.setattr(parity, "_host", lambda t, dtype=None: t.detach().to(torch.float64))
    opt, hi, lo = _on_fake_device()
    with FakeDevice() as spy:
        try:
            compare_tensor("out", opt, hi, lo, Tolerance(), False)
        except Exception:
            pass  # meta arithmetic may give up later; the float64 copy on the device came first
    assert spy.float64_on_device


OLD_DPO_FAILING_SEEDS = (18, 82)  # found over seeds 0-99 with the old rule
