"""SparseMoE FFN: per-token sum over its k routed SwiGLU experts, weighted by the router's weights.

Inputs follow transformers v5 (``Qwen3MoeExperts.forward(hidden_states, top_k_index, top_k_weights)``,
``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``). The routing is an *input* (ids drawn by a routing
pattern, weights from a softmax over them), so the discrete choice is the gating suite's business and this
suite compares output, input gradient, router-weight gradient and every expert-weight gradient.

Routing patterns: ``balanced`` (random logits), ``skewed`` (half the experts never chosen: empty experts),
``one_expert`` (expert 0 is every token's first choice; with top_k 1 every token goes to it).
"""

from __future__ import annotations

import itertools

import torch
from twinbench.harness.core.case import DTYPE_PARAM, Case, Param, Rule, torch_dtype
from twinbench.harness.core.inputs import elem_bytes, generator, randn
from twinbench.harness.core.registry import Inputs, Suite, register_impl, register_suite
from twinbench.reference.moe import moe_experts


def _case(batch, seq, hidden, experts, top_k, inter, dtype, routing="balanced", threads=0) -> Case:
    return Case.of(batch=batch, seq=seq, hidden=hidden, experts=experts, top_k=top_k, inter=inter,
                   routing=routing, dtype=dtype, threads=threads)


# Tiny: every impl is parity-checked on these in CI, the Triton one through the interpreter.
QUICK = [
    _case(1, 32, 32, 4, 2, 32, "fp32"),
    _case(1, 48, 64, 8, 2, 32, "bf16", routing="skewed"),      # experts 4..7 get no tokens
    _case(1, 24, 32, 4, 1, 16, "fp16", routing="one_expert"),  # every token to expert 0
    _case(1, 1, 32, 8, 2, 16, "fp32"),                         # a single token: 6 empty experts
]
# Seed 004: batch {1,4} x seq {128,512}, hidden 2048, 64 experts (Qwen3-MoE-like: top-8, inter 768).
SEED = [_case(b, s, 2048, 64, 8, 768, dt) for b, s, dt in itertools.product((1, 4), (128, 512), ("fp16", "bf16"))]
# The CPU performance benchmark (issues 4 and 18): 512 tokens, hidden 1024, 64 experts, top-8, inter 384, and a
# Qwen3-30B-A3B layer (hidden 2048, 128 experts, top-8, inter 768) at 2048 tokens; fp32 and bf16, each at one
# thread and at all of the worker's (threads=0). The matmul ceilings are measured at the case's thread count;
# the bare per-expert GEMM bound is benchmarks/moe_limits.py's (docs/moe.md, "Measured").
BENCH = [_case(1, seq, hidden, experts, 8, inter, dt, threads=t)
         for (seq, hidden, experts, inter), dt, t in itertools.product(
             ((512, 1024, 64, 384), (2048, 2048, 128, 768)), ("fp32", "bf16"), (1, 0))]
FULL = SEED + BENCH + [
    _case(1, 4096, 2048, 128, 8, 768, "bf16"),                 # Qwen3-30B-A3B-like
    _case(1, 4096, 4096, 8, 2, 14336, "bf16"),                 # Mixtral-like
    _case(1, 2048, 2048, 64, 8, 768, "bf16", routing="skewed"),
    _case(1, 2048, 2048, 64, 1, 768, "bf16", routing="one_expert"),
    _case(1, 1, 2048, 64, 8, 768, "bf16"),
]


def routing(case: Case, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(top_k_index int64 [T, k], top_k_weights fp32 [T, k]) for the case's routing pattern."""
    t, e, k = case["batch"] * case["seq"], case["experts"], case["top_k"]
    logits = torch.randn((t, e), generator=gen)
    if case["routing"] == "skewed":
        logits[:, (e + 1) // 2:] = float("-inf")
    elif case["routing"] == "one_expert":
        logits[:, 0] = logits.amax(dim=-1) + 0.5   # first choice everywhere, weights not degenerate
    elif case["routing"] != "balanced":
        raise ValueError(f"unknown routing {case['routing']!r}")
    vals, ids = torch.sort(logits, dim=-1, descending=True, stable=True)
    return ids[:, :k].contiguous(), torch.softmax(vals[:, :k].clamp_min(-30.0), dim=-1)


def make_inputs(case: Case, device, seed: int) -> Inputs:
    gen = generator(seed)
    t, h, e, i = case["batch"] * case["seq"], case["hidden"], case["experts"], case["inter"]
    ids, weights = routing(case, gen)
    dt = case["dtype"]
    tensors = {
        "hidden_states": randn((t, h), dt, device, gen),
        "top_k_index": ids.to(device),
        "top_k_weights": weights.to(torch_dtype(dt)).to(device),
        "gate_up_proj": randn((e, 2 * i, h), dt, device, gen, scale=h ** -0.5),
        "down_proj": randn((e, h, i), dt, device, gen, scale=i ** -0.5),
    }
    per_expert = torch.bincount(ids.reshape(-1), minlength=e)
    return Inputs(tensors=tensors, grad=("hidden_states", "top_k_weights", "gate_up_proj", "down_proj"),
                  meta={"tokens_per_expert": per_expert.tolist(), "empty_experts": int((per_expert == 0).sum())})


def flops(case: Case) -> dict[str, float]:
    """Per (token, slot): gate_up 2*H*2I + down 2*I*H; backward twice that (input and weight grads)."""
    s = case["batch"] * case["seq"] * case["top_k"]
    fwd = 6.0 * s * case["hidden"] * case["inter"]
    return {"fwd": fwd, "bwd": 2 * fwd}


def bytes_moved(case: Case) -> dict[str, float]:
    """Expert weights dominate: read once forward; read and their gradients written once backward."""
    b = elem_bytes(case["dtype"])
    t, h = case["batch"] * case["seq"], case["hidden"]
    weights = 3.0 * case["experts"] * case["inter"] * h
    return {"fwd": b * (weights + 2 * t * h), "bwd": b * (2 * weights + 3 * t * h)}


PARAMS = (Param("batch", int, low=1), Param("seq", int, low=1), Param("hidden", int, low=1),
          Param("experts", int, low=1), Param("top_k", int, low=1), Param("inter", int, low=1), DTYPE_PARAM(),
          Param("routing", str, choices=("balanced", "skewed", "one_expert")),
          Param("threads", int, low=0))  # CPU threads the case runs under (0: the worker's); the worker sets it
RULES = (Rule(lambda c: c["top_k"] <= c["experts"], "top_k must be <= experts"),)


SUITE = register_suite(Suite(
    params=PARAMS, rules=RULES,
    name="moe_ffn",
    description="SparseMoE SwiGLU experts (transformers v5 layout); out, dx, d(router weights), dW per expert",
    profiles={"quick": QUICK, "seed": SEED, "bench": BENCH, "full": FULL},
    make_inputs=make_inputs,
    reference="reference",
    flops=flops,
    bytes=bytes_moved,
    trials=3,
))


@register_impl("moe_ffn", "reference", tags=("reference",))
def reference(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj):
    return moe_experts(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj)
