"""MoE gating: router linear -> softmax (fp32) -> top-k (lowest index wins ties) -> optional renorm, plus the
Switch load-balancing loss and the router z-loss. Outputs: weights, ids, aux_loss, z_loss; gradients for
the hidden states and the router weight.

Special rows (docs/method.md §1): ``tie_rows`` all-zero hidden states (every expert's logit is exactly 0:
a full tie, the lowest ``top_k`` indices must win) and ``nonfinite_rows`` (a NaN, then an +Inf, in the
hidden state: the row's probabilities are NaN; ids there are undefined and not compared, the row is left out
of the losses — see reference/moe.py).
"""

from __future__ import annotations

import itertools

import torch
from twinbench.harness.core.case import DTYPE_PARAM, Case, Param, Rule, torch_dtype
from twinbench.harness.core.inputs import elem_bytes, generator, randn
from twinbench.harness.core.registry import Inputs, Suite, Tolerance, register_impl, register_suite
from twinbench.reference.moe import gating as reference_gating


def _case(tokens, hidden, experts, top_k, norm, dtype, tie_rows=2, nonfinite_rows=2) -> Case:
    return Case.of(tokens=tokens, hidden=hidden, experts=experts, top_k=top_k, norm=norm, dtype=dtype,
                   tie_rows=tie_rows, nonfinite_rows=nonfinite_rows)


QUICK = [
    _case(16, 64, 16, 4, True, "fp32"),
    _case(64, 64, 16, 4, False, "bf16"),
    _case(48, 32, 8, 2, True, "fp16", tie_rows=0),
    _case(16, 128, 64, 8, True, "fp32", tie_rows=0, nonfinite_rows=0),
]
# Seed 004: batch {1,4} x seq {128,512} tokens, hidden 2048, 64 experts (Qwen3-MoE routing: top-8, renorm);
# each also without tie rows in bf16, where the transformers router (torch.topk ties) can be compared.
SEED = [_case(b * s, 2048, 64, 8, True, dt) for b, s, dt in itertools.product((1, 4), (128, 512), ("fp16", "bf16"))]
SEED += [c.replace(tie_rows=0) for c in SEED if c["dtype"] == "bf16"]
FULL = SEED + [
    _case(4096, 2048, 128, 8, True, "bf16"),                    # Qwen3-30B-A3B-like
    _case(4096, 4096, 8, 2, True, "bf16"),                      # Mixtral-like
    _case(4096, 2048, 128, 8, True, "bf16", tie_rows=0, nonfinite_rows=0),
    _case(1, 2048, 64, 8, True, "bf16", tie_rows=0, nonfinite_rows=0),   # a single token
    _case(333, 1024, 60, 4, False, "fp32"),                     # Qwen2-MoE-like: 60 experts, no renorm
]


def make_inputs(case: Case, device, seed: int) -> Inputs:
    gen = generator(seed)
    t, h, e = case["tokens"], case["hidden"], case["experts"]
    x = torch.randn((t, h), generator=gen, dtype=torch.float32)
    ties, bad = min(case["tie_rows"], t), min(case["nonfinite_rows"], max(t - case["tie_rows"], 0))
    x[:ties] = 0.0                                       # all logits exactly 0: a full tie
    for i in range(bad):                                 # NaN, then +Inf, in one element of the row
        x[ties + i, i % h] = float("nan") if i % 2 == 0 else float("inf")
    dt = torch_dtype(case["dtype"])
    w = randn((e, h), case["dtype"], device, gen, scale=h ** -0.5)
    return Inputs(tensors={"hidden_states": x.to(dt).to(device), "router_weight": w},
                  static={"top_k": case["top_k"], "norm_topk_prob": case["norm"]},
                  grad=("hidden_states", "router_weight"),
                  meta={"tie_rows": ties, "nonfinite_rows": bad})


def _finite_rows(probs: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(probs).all(dim=-1)


def check_ids(case: Case, name: str, opt: torch.Tensor, ref_hi: torch.Tensor, inputs: Inputs) -> tuple[bool, str]:
    """Ids equal to the reference's on every finite row, the reference run at the impl's own precision.

    The reference in the test dtype decides: near-ties resolve by the logits the impl actually sees (bf16
    logits round). A row may differ only by the score-gather rule — the probabilities at the returned ids
    equal the reference's top-k values to within the logits' rounding, ids distinct — and never on an
    exact tie, which the lowest-index rule settles, slot order included (each slot's weight carries its
    own gradient, so a permutation among equal probabilities still moves gradients between experts).
    """
    x, w = inputs.tensors["hidden_states"].detach(), inputs.tensors["router_weight"].detach()
    with torch.no_grad():
        logits = torch.nn.functional.linear(x, w)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).cpu()
        ref = reference_gating(x, w, **inputs.static)["ids"].cpu()
    opt = opt.cpu().long()
    if opt.shape != ref.shape:
        return False, f"ids shape {tuple(opt.shape)} != {tuple(ref.shape)}"
    rows = _finite_rows(probs)
    if bool(((opt[rows] < 0) | (opt[rows] >= probs.shape[1])).any()):
        return False, "ids out of range on a finite row"
    differ = rows & (opt != ref).any(dim=-1)
    if not bool(differ.any()):
        return True, ""
    p, o, r = probs[differ], opt[differ], ref[differ]
    got, want = p.gather(1, o), p.gather(1, r)
    eps = torch.finfo(torch_dtype(case["dtype"])).eps
    slack = want * 4 * eps * (1 + logits[differ.to(logits.device)].abs().amax(-1, keepdim=True).float().cpu())
    distinct = (o.sort(-1).values.diff(dim=-1) != 0).all(-1)
    near = ((got - want).abs() <= slack).all(-1)
    exact_tie = ((got == want) & (o != r)).any(-1)
    excused = distinct & near & ~exact_tie
    if bool(excused.all()):
        return True, ""
    bad = differ.nonzero().flatten()[~excused][:3].tolist()
    first = bad[0]
    return False, (f"ids differ on {int((~excused).sum())} finite row(s), e.g. row {first}: "
                   f"{opt[first].tolist()} vs reference {ref[first].tolist()} (ties: lowest index wins)")


def hi_dtype(case: Case) -> torch.dtype:
    """fp64 for fp32 cases; for fp16/bf16 the reference runs in the test dtype itself (ref_hi = ref_lo).

    Routing is discrete: the router logits round to the model dtype (transformers computes them there), and
    where two experts' logits are within that rounding an upcast reference picks the other expert and moves
    the row's whole gradient (measured: one row of 60 in a bf16 case, 20x the other rows' error). The
    softmax, top-k and losses already run in fp32 inside the reference, so nothing is lost; the bound is
    then the rounding floor of the output's own dtype.
    """
    return torch.float64 if case["dtype"] == "fp32" else torch_dtype(case["dtype"])


def tolerance(case: Case, output: str) -> Tolerance:
    if output in ("aux_loss", "z_loss"):
        # Scalars from logits rounded to the test dtype; a loss may take its softmax in that dtype
        # (transformers' load_balancing_loss_func does): 2 eps of the test dtype, relative, on top.
        return Tolerance(rtol=2 * torch.finfo(torch_dtype(case["dtype"])).eps,
                         why="three-way rule; losses + 2 eps(test dtype) relative")
    if case["dtype"] != "fp32":
        # ref_hi is ref_lo in half precision (hi_dtype), so the three-way yardstick is 0 and the bound only the
        # rounding floor; but the logits and the router-weight gradient are sums (over hidden, over tokens)
        # that an impl may accumulate in another order: a few ulps at the tensor's scale are honest (the
        # Triton router's fp16 router-weight gradient behind NaN rows is 3 ulps off; a planted halved
        # gradient is off by 50%).
        return Tolerance(rtol=4 * torch.finfo(torch_dtype(case["dtype"])).eps,
                         why="three-way rule; half precision: + 4 eps(test dtype) relative for reordered sums")
    return Tolerance()


def flops(case: Case) -> dict[str, float]:
    t, h, e = case["tokens"], case["hidden"], case["experts"]
    fwd = 2.0 * t * h * e + 5.0 * t * e             # router GEMM + softmax/top-k
    return {"fwd": fwd, "bwd": 2 * 2.0 * t * h * e}


def bytes_moved(case: Case) -> dict[str, float]:
    b = elem_bytes(case["dtype"])
    t, h, e, k = case["tokens"], case["hidden"], case["experts"], case["top_k"]
    fwd = b * (t * h + e * h + t * k) + 8 * t * k
    return {"fwd": fwd, "bwd": b * 2 * (t * h + e * h) + 4 * t * e}


PARAMS = (Param("tokens", int, low=1), Param("hidden", int, low=1), Param("experts", int, low=1),
          Param("top_k", int, low=1), Param("norm", bool), DTYPE_PARAM(),
          Param("tie_rows", int, low=0), Param("nonfinite_rows", int, low=0))
RULES = (Rule(lambda c: c["top_k"] <= c["experts"], "top_k must be <= experts"),)


SUITE = register_suite(Suite(
    params=PARAMS, rules=RULES,
    name="gating",
    description="MoE top-k router: softmax fp32, lowest-index ties, renorm, aux + z loss; ids exact",
    profiles={"quick": QUICK, "seed": SEED, "full": FULL},
    make_inputs=make_inputs,
    reference="reference",
    flops=flops,
    bytes=bytes_moved,
    check_discrete=check_ids,
    hi_dtype=hi_dtype,
    tolerance=tolerance,
    trials=3,
))


@register_impl("gating", "reference", tags=("reference",))
def reference(hidden_states, router_weight, *, top_k, norm_topk_prob):
    return reference_gating(hidden_states, router_weight, top_k=top_k, norm_topk_prob=norm_topk_prob)
