"""Attention: softmax(QK^T * scale) V, causal (bottom-right) or not, MHA/GQA/MQA; forward and backward."""

from __future__ import annotations

import itertools
import math

from twinbench.harness.core.case import DTYPE_PARAM, Case, Param, Rule
from twinbench.harness.core.inputs import elem_bytes, generator, randn
from twinbench.harness.core.registry import Inputs, Suite, register_impl, register_suite
from twinbench.reference.attention import attention as reference_attention


def _case(batch, heads, kv_heads, seq_q, seq_k, head_dim, causal, dtype) -> Case:
    return Case.of(batch=batch, heads=heads, kv_heads=kv_heads, seq_q=seq_q, seq_k=seq_k, head_dim=head_dim,
                   causal=causal, dtype=dtype)


QUICK = [
    _case(1, 4, 4, 128, 128, 64, False, "fp32"),
    _case(1, 4, 4, 128, 128, 64, True, "bf16"),
    _case(2, 8, 2, 96, 160, 64, True, "fp32"),   # GQA 4:1, seq_q != seq_k: bottom-right mask
    _case(1, 4, 1, 77, 77, 40, True, "fp16"),    # MQA, odd sequence and head_dim
]
# Small shapes for Triton kernels under the CPU interpreter: odd head dims (8, 40, 72, 200 -> padded), odd and
# unequal lengths (bottom-right mask, fully masked rows when seq_q > seq_k), GQA 1/2/3/4 and MQA, fp16/fp32.
INTERP = [
    _case(1, 2, 2, 77, 77, 40, True, "fp16"),
    _case(1, 2, 2, 77, 77, 72, False, "fp32"),
    _case(1, 4, 2, 33, 95, 40, True, "fp32"),
    _case(1, 4, 2, 95, 33, 72, True, "fp16"),
    _case(1, 8, 2, 33, 95, 72, False, "fp16"),
    _case(1, 8, 2, 95, 33, 40, True, "fp32"),
    _case(1, 4, 1, 77, 77, 40, True, "fp32"),
    _case(2, 3, 1, 95, 33, 72, False, "fp16"),
    _case(1, 4, 1, 1, 77, 64, True, "fp16"),     # one query row (decode)
    _case(1, 2, 2, 17, 17, 8, False, "fp32"),    # head_dim below tl.dot's minimum
    _case(1, 2, 1, 33, 40, 200, True, "fp16"),   # head_dim 200 padded to 256
]
# The seed table (bring-up runs of seed 004): batch {1,4} x seq {128, 2048} x 32 heads x head_dim 128.
SEED = [_case(b, 32, 32, s, s, 128, True, dt)
        for b, s, dt in itertools.product((1, 4), (128, 2048), ("fp16", "bf16"))]
FULL = SEED + [
    _case(b, 32, kv, s, s, d, c, dt)
    for b, kv, s, d, c, dt in itertools.product((1, 8), (32, 8), (512, 4096), (64, 128, 256), (True, False),
                                                ("bf16", "fp16"))
] + [_case(2, 32, 8, 1, 4096, 128, True, "bf16"), _case(2, 32, 8, 333, 1029, 96, True, "bf16")]


def make_inputs(case: Case, device, seed: int) -> Inputs:
    gen = generator(seed)
    b, h, kv, d = case["batch"], case["heads"], case["kv_heads"], case["head_dim"]
    q = randn((b, h, case["seq_q"], d), case["dtype"], device, gen)
    k = randn((b, kv, case["seq_k"], d), case["dtype"], device, gen)
    v = randn((b, kv, case["seq_k"], d), case["dtype"], device, gen)
    return Inputs(tensors={"q": q, "k": k, "v": v}, static={"causal": case["causal"], "scale": 1 / math.sqrt(d)},
                  grad=("q", "k", "v"))


def _visible_pairs(case: Case) -> float:
    """Query-key pairs the mask lets through (bottom-right causal)."""
    sq, sk = case["seq_q"], case["seq_k"]
    if not case["causal"]:
        return sq * sk
    return float(sum(max(0, min(sk, i + 1 + sk - sq)) for i in range(sq)))


def flops(case: Case) -> dict[str, float]:
    fwd = 4.0 * case["batch"] * case["heads"] * _visible_pairs(case) * case["head_dim"]
    return {"fwd": fwd, "bwd": 2.5 * fwd}


def bytes_moved(case: Case) -> dict[str, float]:
    e = elem_bytes(case["dtype"])
    q = case["batch"] * case["heads"] * case["seq_q"] * case["head_dim"] * e
    kv = case["batch"] * case["kv_heads"] * case["seq_k"] * case["head_dim"] * e
    return {"fwd": 2 * q + 2 * kv, "bwd": 4 * q + 4 * kv}  # fwd: q,k,v in, o out; bwd: +o,do in, dq,dk,dv out


PARAMS = (Param("batch", int, low=1), Param("heads", int, low=1), Param("kv_heads", int, low=1),
          Param("seq_q", int, low=1), Param("seq_k", int, low=1),
          Param("head_dim", int, low=1, high=512), Param("causal", bool), DTYPE_PARAM())
RULES = (Rule(lambda c: c["heads"] % c["kv_heads"] == 0, "heads must be a multiple of kv_heads"),)


SUITE = register_suite(Suite(
    params=PARAMS, rules=RULES,
    name="attention",
    description="softmax(QK^T*scale)V, bottom-right causal mask, GQA/MQA; outputs and dq/dk/dv",
    profiles={"quick": QUICK, "interp": INTERP, "seed": SEED, "full": FULL},
    make_inputs=make_inputs,
    reference="reference",
    flops=flops,
    bytes=bytes_moved,
    trials=3,
))


@register_impl("attention", "reference", tags=("reference",))
def reference(q, k, v, *, causal, scale):
    return reference_attention(q, k, v, causal=causal, scale=scale)
