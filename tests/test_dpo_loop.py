"""DPO loop: TRL's DPOTrainer and the same training with our fused loss start at ln 2, grow the reward
margin and follow the same loss trajectory; planted wrong losses in the loop are caught."""

import math

import pytest
import torch
from twinbench.harness.core.parity import check_parity, compare_tensor
from twinbench.harness.core.registry import IMPLS, Impl, load_plugins

pytest.importorskip("trl")
load_plugins()
SUITE = __import__("twinbench.suites.dpo_loop", fromlist=["SUITE"]).SUITE
CASE = SUITE.cases("quick")[0]


def _cached(impl: Impl, store: dict) -> Impl:
    def fn(**kw):
        store[impl.name] = impl.fn(**kw)
        return store[impl.name]

    return Impl(name=impl.name, suite=impl.suite, fn=fn, backward=False)


@pytest.fixture(scope="module")
def runs():
    """One harness parity check of the quick case; both loops' full results kept for the assertions."""
    store: dict = {}
    verdict = check_parity(SUITE, _cached(IMPLS[("dpo_loop", "fused_loss")], store),
                           _cached(IMPLS[("dpo_loop", "reference")], store), CASE, "cpu")
    return verdict, store


def test_trajectories_agree(runs):
    verdict, store = runs
    assert verdict.ok, (verdict.problems, verdict.checks)
    ref, ours = store["reference"]["loss_curve"], store["fused_loss"]["loss_curve"]
    assert ref.shape == ours.shape == (CASE["steps"],)
    assert float((ref - ours).abs().max()) <= 1e-4


@pytest.mark.parametrize("name", ["reference", "fused_loss"])
def test_step1_loss_is_ln2_and_margins_grow(runs, name):
    _, store = runs
    loss, margins = store[name]["loss_curve"], store[name]["margin_curve"]
    assert abs(float(loss[0]) - math.log(2)) < 1e-6, float(loss[0])     # policy == reference at step 1
    assert abs(float(margins[0])) < 1e-6
    assert float(margins[-4:].mean()) > float(margins[1:5].mean()) + 0.1   # the preference is being learnt
    assert float(loss[-4:].mean()) < math.log(2) - 0.05


def test_metrics_recorded(runs):
    verdict, _ = runs
    m = verdict.metrics
    assert len(m["loss_curve"]) == CASE["steps"] and m["median_step_ms"] > 0 and m["tokens_per_s"] > 0
    assert m["peak_rss_bytes"] >= 0 and abs(m["step1_loss_minus_ln2"]) < 1e-6


def _planted_trainer(mutate):
    """FusedDPOTrainer whose fused-loss inputs are altered by ``mutate`` (a planted bug in the loop)."""
    from twinbench.impls.dpo.fused_torch import fused_linear_dpo
    from twinbench.impls.dpo_loop.fused import fused_dpo_trainer

    def wrong_loss(*args, **kw):
        args, kw = mutate(list(args), dict(kw))
        return fused_linear_dpo(*args, **kw)

    class Planted(fused_dpo_trainer()):
        loss_fn = staticmethod(wrong_loss)

    return Planted


def _ref_ignored(args, kw):
    args[1] = torch.zeros_like(args[1])       # reference hidden states dropped: ref log-probs of a blank model
    return args, kw


def _beta_twice(args, kw):
    kw["beta"] = kw["beta"] * kw["beta"]     # beta applied twice
    return args, kw


def test_planted_reference_ignored_breaks_step1_ln2():
    from twinbench.suites.dpo_loop import run_loop

    out = run_loop(_planted_trainer(_ref_ignored), device="cpu", seed=0, steps=1, batch=CASE["batch"],
                   lr=CASE["lr"], beta=CASE["beta"], loss=CASE["loss"])
    assert abs(float(out["loss_curve"][0]) - math.log(2)) > 1e-3


def test_planted_beta_twice_breaks_the_trajectory(runs):
    from twinbench.suites.dpo_loop import run_loop

    _, store = runs
    steps = 4
    out = run_loop(_planted_trainer(_beta_twice), device="cpu", seed=0, steps=steps, batch=CASE["batch"],
                   lr=CASE["lr"], beta=CASE["beta"], loss=CASE["loss"])
    assert abs(float(out["loss_curve"][0]) - math.log(2)) < 1e-6     # invisible at step 1 ...
    ref = store["reference"]["loss_curve"][:steps]
    check = compare_tensor("loss_curve", out["loss_curve"], ref, None, SUITE.tolerance(CASE, "loss_curve"), False)
    assert not check.ok, check                                          # ... caught by the trajectory bound
