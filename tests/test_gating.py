"""Gating: planted wrong routers must be caught, the right ones pass over several seeds."""

import pytest
import torch
import torch.nn.functional as F
from twinbench.harness.core.case import Case
from twinbench.harness.core.parity import check_parity
from twinbench.harness.core.registry import IMPLS, Impl, load_plugins
from twinbench.reference.moe import gating, router_losses

load_plugins()
SUITE = __import__("twinbench.suites.gating", fromlist=["SUITE"]).SUITE
REF = IMPLS[("gating", "reference")]
from twinbench.impls.gating.fused_torch import lowest_index_topk  # noqa: E402

TIES = Case.of(tokens=24, hidden=32, experts=16, top_k=4, norm=True, dtype="fp32", tie_rows=3, nonfinite_rows=2)
PLAIN = TIES.replace(tie_rows=0, nonfinite_rows=0)
BF16 = TIES.replace(dtype="bf16", norm=False)


def _impl(fn, name="planted"):
    return Impl(name=name, suite="gating", fn=fn)


def _route(hidden_states, router_weight, top_k, ids_fn, renorm=True):
    """The reference pipeline with the selection swapped out, for planting bugs."""
    logits = F.linear(hidden_states, router_weight)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
    ids = ids_fn(probs)
    w = probs.gather(-1, ids)
    if renorm:
        w = w / w.sum(-1, keepdim=True)
    aux, z = router_losses(logits, probs, ids, router_weight.shape[0])
    return {"weights": w.to(hidden_states.dtype), "ids": ids, "aux_loss": aux, "z_loss": z}


def highest_index_wins(hidden_states, router_weight, *, top_k, norm_topk_prob):
    flip = lambda p: p.shape[-1] - 1 - torch.sort(p.flip(-1), dim=-1, descending=True, stable=True).indices[:, :top_k]  # noqa: E731
    return _route(hidden_states, router_weight, top_k, flip, norm_topk_prob)


def renorm_skipped(hidden_states, router_weight, *, top_k, norm_topk_prob):
    return gating(hidden_states, router_weight, top_k=top_k, norm_topk_prob=False)


def last_expert_dropped(hidden_states, router_weight, *, top_k, norm_topk_prob):
    def ids(p):
        p = p.clone()
        p[:, -1] = -1.0   # expert E-1 can never be chosen
        return torch.sort(p, dim=-1, descending=True, stable=True).indices[:, :top_k]
    return _route(hidden_states, router_weight, top_k, ids, norm_topk_prob)


def missing_routing_weight(hidden_states, router_weight, *, top_k, norm_topk_prob):
    out = gating(hidden_states, router_weight, top_k=top_k, norm_topk_prob=norm_topk_prob)
    keep = torch.ones(top_k, dtype=out["weights"].dtype)
    keep[-1] = 0.0    # the k-th expert's weight is lost
    return {**out, "weights": out["weights"] * keep}


def aux_from_top1_only(hidden_states, router_weight, *, top_k, norm_topk_prob):
    out = gating(hidden_states, router_weight, top_k=top_k, norm_topk_prob=norm_topk_prob)
    logits = F.linear(hidden_states, router_weight)
    probs = torch.softmax(logits, -1, dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
    aux, _ = router_losses(logits, probs, out["ids"][:, :1], router_weight.shape[0])
    return {**out, "aux_loss": aux}


def nan_rows_kept_in_losses(hidden_states, router_weight, *, top_k, norm_topk_prob):
    out = gating(hidden_states, router_weight, top_k=top_k, norm_topk_prob=norm_topk_prob)
    logits = F.linear(hidden_states, router_weight).float()
    return {**out, "z_loss": torch.logsumexp(logits, -1).square().mean()}


PLANTED = [
    ("ties broken by highest index", highest_index_wins, TIES),
    ("ties broken by highest index (bf16)", highest_index_wins, BF16),
    ("renormalisation skipped", renorm_skipped, PLAIN),
    ("an expert dropped", last_expert_dropped, PLAIN),
    ("a routing weight missing", missing_routing_weight, PLAIN),
    ("aux loss counts top-1 only", aux_from_top1_only, PLAIN),
    ("NaN rows kept in the z-loss", nan_rows_kept_in_losses, TIES),
]


@pytest.mark.parametrize("label,fn,case", PLANTED, ids=[p[0] for p in PLANTED])
def test_planted_router_bug_is_caught(label, fn, case):
    verdict = check_parity(SUITE, _impl(fn), REF, case, "cpu", trials=2)
    assert not verdict.ok, f"{label} passed: {verdict.checks}"


def test_tie_failure_names_the_rows():
    v = check_parity(SUITE, _impl(highest_index_wins), REF, TIES, "cpu", trials=1)
    assert not v.checks["ids"].ok and "lowest index wins" in v.checks["ids"].detail
    assert v.checks["weights"].ok   # a full tie: equal weights, so only the id check can see it


@pytest.mark.parametrize("case", [TIES, BF16, PLAIN.replace(dtype="fp16", experts=64, top_k=8)], ids=lambda c: c.id)
def test_fused_torch_passes_over_seeds(case):
    v = check_parity(SUITE, IMPLS[("gating", "fused_torch")], REF, case, "cpu", trials=6, seed=40)
    assert v.ok, (v.problems, {n: c for n, c in v.checks.items() if not c.ok})
    assert v.stable and set(v.checks) == {"ids", "weights", "aux_loss", "z_loss", "grad:hidden_states",
                                          "grad:router_weight"}


def test_hf_router_is_caught_on_tie_rows_when_forced():
    """transformers' router uses torch.topk, whose tie order is unspecified: the id check sees it."""
    hf = IMPLS[("gating", "hf_qwen3_router")]
    ok, why = hf.can_run(TIES, None)
    if "not installed" in why:
        pytest.skip(why)
    assert not ok and "ties" in why
    v = check_parity(SUITE, _impl(hf.fn), REF, TIES.replace(experts=64, top_k=8), "cpu", trials=1)
    assert not v.checks["ids"].ok


def test_lowest_index_topk_matches_a_stable_sort():
    gen = torch.Generator().manual_seed(3)
    coarse = torch.randint(0, 4, (200, 37), generator=gen).float() / 4   # many exact ties
    for p in (coarse, torch.rand(200, 37, generator=gen), torch.full((3, 37), float("nan"))):
        want = torch.sort(p, dim=-1, descending=True, stable=True).indices[:, :5]
        assert torch.equal(lowest_index_topk(p, 5), want)


def test_reference_rules_on_special_rows():
    inputs = SUITE.make_inputs(TIES, "cpu", 0)
    out = gating(**inputs.tensors, **inputs.static)
    assert torch.equal(out["ids"][:3], torch.arange(4).expand(3, 4))         # full tie: lowest indices
    assert torch.allclose(out["weights"][:3], torch.full((3, 4), 0.25))
    assert out["weights"][3:5].isnan().all() and out["weights"][5:].isfinite().all()
    assert out["aux_loss"].isfinite() and out["z_loss"].isfinite()           # NaN rows left out of the losses
    assert inputs.meta == {"tie_rows": 3, "nonfinite_rows": 2}
