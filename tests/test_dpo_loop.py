"""DPO loop: TRL's DPOTrainer and the same training with our fused loss start at ln 2, grow the reward
margin and follow the same loss trajectory; planted wrong losses in the loop are caught."""

import math

import pytest
import torch
from twinbench.harness.core.parity import compare_tensor
from twinbench.harness.core.registry import IMPLS, load_plugins
from twinbench.harness.run.experiment_case import judge_outcome, run_impl
from twinbench.reference.dpo_loop import run_loop
from twinbench.suites.dpo_loop import EXPERIMENT

pytest.importorskip("trl")
load_plugins()
CASE = EXPERIMENT.cases("quick")[0]
ARGS = EXPERIMENT.arguments(CASE, "cpu", 0)


@pytest.fixture(scope="module")
def runs():
    """The harness's judgement of the quick case (the fused loop poisoned, as a run does it); both loops'
    outputs kept for the assertions."""
    ref = run_impl(IMPLS[("dpo_loop", "reference")], ARGS, poisoned=False)
    ours = run_impl(IMPLS[("dpo_loop", "fused_loss")], ARGS, poisoned=True)
    verdict = judge_outcome(EXPERIMENT, CASE, ours, ref, ARGS, "cpu")
    return verdict, {"reference": ref.outputs, "fused_loss": ours.outputs}


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
    out = run_loop(_planted_trainer(_ref_ignored), **{**ARGS, "steps": 1}).outputs
    assert abs(float(out["loss_curve"][0]) - math.log(2)) > 1e-3


def test_planted_beta_twice_breaks_the_trajectory(runs):
    _, store = runs
    steps = 4
    out = run_loop(_planted_trainer(_beta_twice), **{**ARGS, "steps": steps}).outputs
    assert abs(float(out["loss_curve"][0]) - math.log(2)) < 1e-6     # invisible at step 1 ...
    ref = store["reference"]["loss_curve"][:steps]
    check = compare_tensor("loss_curve", out["loss_curve"], ref, None, EXPERIMENT.bound(CASE, "loss_curve"), False)
    assert not check.ok, check                                          # ... caught by the trajectory bound
