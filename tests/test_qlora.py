"""QLoRA experiment: the patched loop matches the reference loop, the probe is asserted (and a loop that cannot
learn fails it), and the trajectory comparison catches planted divergence. CPU, one thread per loop."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
pytest.importorskip("lm_eval")

from twinbench.harness.core.parity import compare_tensor  # noqa: E402
from twinbench.harness.core.registry import IMPLS, Impl, load_plugins  # noqa: E402
from twinbench.harness.run.experiment_case import judge_outcome, run_impl  # noqa: E402
from twinbench.impls.qlora import moe_lora as qlora_moe_lora  # noqa: E402
from twinbench.impls.qlora import nf4_lora as qlora_nf4_lora  # noqa: E402
from twinbench.impls.qlora import patched as qlora_patched  # noqa: E402
from twinbench.reference.qlora.config import LoopConfig  # noqa: E402
from twinbench.reference.qlora.experiment import run_experiment  # noqa: E402
from twinbench.reference.qlora.model import load_qlora_model, save_base_checkpoint  # noqa: E402
from twinbench.suites.qlora import DATA, EXPERIMENT  # noqa: E402

load_plugins()
REF = IMPLS[("qlora", "reference")]
PATCHED = IMPLS[("qlora", "patched")]
LLAMA, MOE = EXPERIMENT.cases("quick")


def _reference(case):
    """The case's arguments and the reference loop's outcome (the comparison baseline, unpoisoned)."""
    args = EXPERIMENT.arguments(case, "cpu", 0)
    return args, run_impl(REF, args, poisoned=False)


def _judged(impl, case, reference):
    args, baseline = reference
    return judge_outcome(EXPERIMENT, case, run_impl(impl, args, poisoned=True), baseline, args, "cpu")


@pytest.fixture(scope="module")
def llama_reference():
    return _reference(LLAMA)


def _failing(verdict) -> set[str]:
    return {n for n, c in verdict.checks.items() if not c.ok}


@pytest.fixture(scope="module")
def llama_verdict(llama_reference):
    return _judged(PATCHED, LLAMA, llama_reference)


def test_patched_llama_loop_matches_reference_and_learns(llama_verdict):
    v = llama_verdict
    assert v.ok, (v.problems, {n: (c.error, c.bound, c.detail) for n, c in v.checks.items() if not c.ok})
    assert set(v.checks) >= {"loss_curve", "loss_curve_head", "first_grads", "final_lora", "lm_eval_acc",
                             "probe_hits"}
    m = v.metrics
    assert len(m["loss_curve"]) == LLAMA["steps"] and m["loss_curve"][-1] < m["loss_curve"][0] / 3
    assert m["probe_hits"] == {"before": 0, "after": 6, "merged_16bit": 6}
    assert set(m["patched"]) >= {"attention", "nf4_lora", "loss"} and not m["not_patched"]
    assert m["trainable_parameters"] > 0 and m["median_step_s"] > 0 and m["tokens_per_s"] > 0
    assert m["lm_eval"]["acc"] >= 0.8  # the merged model answers the trained facts
    # the comparison is real: the first-step gradients agree far inside their bound
    assert v.checks["first_grads"].error < 0.01 * v.checks["first_grads"].bound


def test_reference_probe_is_judged_absolutely():
    args = EXPERIMENT.arguments(LLAMA, "cpu", 0)
    ok, _ = EXPERIMENT.judge(LLAMA, "probe_hits", torch.tensor([0, 6, 6]), torch.tensor([0, 6, 6]), args)
    assert ok
    for bad in ([1, 6, 6], [0, 5, 6], [0, 6, 0]):
        ok, why = EXPERIMENT.judge(LLAMA, "probe_hits", torch.tensor([0, 6, 6]), torch.tensor(bad), args)
        assert not ok and "reference loop probe" in why


@pytest.mark.parametrize("bug", [{"lr": 0.0}, {"freeze_adapters": True}], ids=["zero-lr", "frozen-adapters"])
def test_loop_that_cannot_learn_fails_the_probe(bug):
    args = EXPERIMENT.arguments(LLAMA, "cpu", 0)
    cfg = dataclasses.replace(args["config"], **bug)
    out = run_experiment(cfg, args["meters"], "cpu", prepare=qlora_patched.patch_model,
                         loss_fn=qlora_patched.labelled_loss, evaluate=False)
    before, after, _ = out.outputs["probe_hits"].tolist()
    assert before == 0 and after == 0
    ok, why = EXPERIMENT.judge(LLAMA, "probe_hits", out.outputs["probe_hits"], torch.tensor([0, 6, 6]), args)
    assert not ok and "after=0" in why


def test_planted_lora_scaling_error_is_caught_by_trajectory_and_gradients(llama_reference):
    def planted(*, config, device, meters):
        def prepare(model):
            info = qlora_patched.patch_model(model)
            for module in model.modules():
                if isinstance(getattr(module, "scaling", None), dict):
                    module.scaling = {k: v * 1.05 for k, v in module.scaling.items()}
            return info

        return run_experiment(config, meters, device, prepare=prepare, loss_fn=qlora_patched.labelled_loss)

    wrong = Impl(name="planted", suite="qlora", fn=planted, backward=False, deterministic=False)
    v = _judged(wrong, LLAMA, llama_reference)
    assert not v.ok
    assert {"first_grads", "loss_curve_head", "final_lora"} <= _failing(v)


def test_trajectory_comparison_catches_a_late_divergence():
    gen = torch.Generator().manual_seed(0)
    ref = 6.0 * torch.exp(-torch.arange(60, dtype=torch.float64) / 15) + 0.1 * torch.rand(60, generator=gen,
                                                                                           dtype=torch.float64)
    tol = EXPERIMENT.bound(LLAMA, "loss_curve")
    same = ref + 1e-4 * torch.randn(60, generator=gen, dtype=torch.float64)
    assert compare_tensor("loss_curve", same, ref, None, tol, False).ok
    diverged = ref.clone()
    diverged[30:] += 0.05  # the second half of training drifts
    check = compare_tensor("loss_curve", diverged, ref, None, tol, False)
    assert not check.ok and check.ratio > 1
    head_tol = EXPERIMENT.bound(LLAMA, "loss_curve_head")
    early = ref[:10].clone()
    early[4] += 5e-3
    assert not compare_tensor("loss_curve_head", early, ref[:10], None, head_tol, False).ok


def test_patched_moe_loop_matches_reference():
    v = _judged(PATCHED, MOE, _reference(MOE))
    assert v.ok, (v.problems, {n: (c.error, c.bound, c.detail) for n, c in v.checks.items() if not c.ok})
    assert v.metrics["patched"].get("moe_experts")
    assert v.metrics["probe_hits"] == {"before": 0, "after": 6, "merged_16bit": 6}


# ---------------------------------------------------------------- the fused NF4 + LoRA op alone


@pytest.fixture(scope="module")
def qlora_layers(tmp_path_factory):
    cfg = LoopConfig(DATA)
    path = tmp_path_factory.mktemp("qlora") / "base"
    save_base_checkpoint(cfg, path)
    model = load_qlora_model(path, cfg)
    attn = model.get_base_model().model.layers[0].self_attn
    return [attn.q_proj, attn.k_proj, attn.v_proj]


def _sequential(x, layers):
    return [layer(x) for layer in layers]  # peft's LoRA over bnb's Linear4bit, one by one


def _fused_with_scaling_bug(x, layers):
    outs = qlora_nf4_lora.nf4_lora_projections(x, layers)
    return [outs[0] * 1.001, *outs[1:]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fused_nf4_lora_projections_match_peft_and_planted_bugs_fail(qlora_layers, seed):
    gen = torch.Generator().manual_seed(seed)
    for layer in qlora_layers:  # B starts at zero: give it values so the adapter path is exercised
        with torch.no_grad():
            layer.lora_B["default"].weight.copy_(0.1 * torch.randn(layer.lora_B["default"].weight.shape,
                                                                   generator=gen))
    x = torch.randn(3, 5, qlora_layers[0].in_features, generator=gen)
    g = [torch.randn(3, 5, layer.out_features, generator=gen) for layer in qlora_layers]
    params = [p for layer in qlora_layers for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)]

    def run(fn):
        xi = x.clone().requires_grad_(True)
        outs = fn(xi, qlora_layers)
        grads = torch.autograd.grad(outs, [xi, *params], grad_outputs=g)
        return outs, grads

    ref_out, ref_grads = run(_sequential)
    got_out, got_grads = run(qlora_nf4_lora.nf4_lora_projections)
    for r, o in zip([*ref_out, *ref_grads], [*got_out, *got_grads]):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    bug_out, _ = run(_fused_with_scaling_bug)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(bug_out[0], ref_out[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the MoE experts' LoRA op alone


@pytest.fixture(scope="module")
def moe_experts(tmp_path_factory):
    cfg = LoopConfig(DATA, kind="qwen3_moe")
    path = tmp_path_factory.mktemp("qlora_moe") / "base"
    save_base_checkpoint(cfg, path)
    model = load_qlora_model(path, cfg)
    wrappers, experts = qlora_moe_lora._wrapper_chain(model.get_base_model().model.layers[0].mlp.experts)
    assert set(wrappers) == {"gate_up_proj", "down_proj"} and not qlora_moe_lora._why_not(wrappers, experts)
    return model.get_base_model().model.layers[0].mlp.experts, wrappers, experts


def _factors(wrappers, experts, planted: str = ""):
    out = {}
    for name, wrapper in wrappers.items():
        lhs, rhs, s = wrapper.get_delta_factors("default")
        if planted == "scaling" and name == "gate_up_proj":
            s = s * 1.001
        if planted == "neighbour_expert" and name == "down_proj":
            lhs = lhs.roll(1, dims=0)
        out[name] = (getattr(experts, name), lhs, rhs, s)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lora_experts_match_peft_and_planted_bugs_fail(moe_experts, seed):
    outer, wrappers, experts = moe_experts
    gen = torch.Generator().manual_seed(seed)
    for wrapper in wrappers.values():  # B starts at zero: give it values so the adapter path is exercised
        with torch.no_grad():
            wrapper.lora_B["default"].weight.copy_(0.1 * torch.randn(wrapper.lora_B["default"].weight.shape,
                                                                     generator=gen))
    n_tok, n_exp = 40, experts.gate_up_proj.shape[0]
    x = torch.randn(n_tok, experts.gate_up_proj.shape[2], generator=gen)
    idx = torch.stack([torch.randperm(n_exp - 1, generator=gen)[:2] for _ in range(n_tok)])  # last expert empty
    wts = torch.rand(n_tok, 2, generator=gen)
    g = torch.randn(n_tok, x.shape[1], generator=gen)
    params = [p for w in wrappers.values() for p in (w.lora_A["default"].weight, w.lora_B["default"].weight)]

    def run(fn):
        xi, wi = x.clone().requires_grad_(True), wts.clone().requires_grad_(True)
        out = fn(xi, idx, wi)
        return [out, *torch.autograd.grad(out, [xi, wi, *params], grad_outputs=g)]

    def ours(planted="", recompute=False):
        factors = _factors(wrappers, experts, planted)
        return lambda xi, i, wi: qlora_moe_lora.lora_experts(xi, i, wi, factors["gate_up_proj"], factors["down_proj"],
                                                             recompute)

    def close(a, b):  # fp32 rounding at each tensor's own scale (sums of ~100 products, other order)
        return float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())

    ref = run(outer)  # peft's parametrization (W + B A) over transformers' experts
    got = run(ours())
    names = ["out", "dx", "d_router_weights"] + [f"d_param{i}" for i in range(len(params))]
    assert all(float(r.abs().max()) > 0 for r in ref)  # nothing compared is trivially zero
    assert [n for n, r, o in zip(names, ref, got) if not close(o, r)] == []
    rebuilt = run(ours(recompute=True))  # activations rebuilt in backward: the same numbers, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(rebuilt, got))
    for planted in ("scaling", "neighbour_expert"):
        bad = run(ours(planted))
        assert [n for n, r, b in zip(names, ref, bad) if not close(b, r)], planted


@pytest.mark.parametrize("args", [["--recompute", "attn,everything"], ["--steps", "2"]])
def test_bench_user_mistakes_are_one_line_and_exit_2(args):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "twinbench", "bench", "qlora", *args], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("twinbench: error: "), proc.stderr
    assert proc.stdout == ""
