"""Quantized linear: ``x W^T (+ bias) + scaling * (x A^T) B^T`` with W an NF4 weight (QLoRA's base layer).

Inputs carry the weight exactly as bitsandbytes stores it (packed uint8 bytes, absmax or its double-quantised
state), made by the reference quantiser (tests/test_nf4.py proves it byte-identical to bnb's). Gradients are
checked for x and the LoRA factors; the base weight is frozen.

Tolerance: the three-way rule against the reference that dequantises in fp64 (fp32 cases) or fp32 (half
cases) and multiplies. Given the 4-bit codes and absmax, the dequantised weight is exact (a product of two
fp32 numbers is exact in fp64), so the matmul alone is judged, like any GEMM; the low-precision reference
(dequantised to the compute dtype, as bnb does) sets the rounding budget. The quantiser itself is judged
separately, by bnb's bytes and published error statistics (tests/test_nf4.py).
"""

from __future__ import annotations

import itertools
import math

from twinbench.harness.core.case import DTYPE_PARAM, Case, Param
from twinbench.harness.core.inputs import elem_bytes, generator, randn
from twinbench.harness.core.registry import Inputs, Suite, Tolerance, register_impl, register_suite
from twinbench.reference.nf4 import nf4_linear, quantize_nf4


def _case(out, inp, batch, rank, blocksize, double_quant, dtype, bias=False, threads=0) -> Case:
    return Case.of(out=out, inp=inp, batch=batch, rank=rank, blocksize=blocksize, double_quant=double_quant,
                   dtype=dtype, bias=bias, threads=threads)


# Small weights (< 2^20 elements) run our CPU kernels eagerly; the 1024x1024 cases are compiled (inductor),
# once per kernel, and timed. The 128x256 cases are the ones the Triton interpreter runs.
QUICK = [
    _case(128, 256, 1, 16, 64, True, "fp32"),            # GEMV + LoRA, double quant
    _case(128, 256, 24, 8, 128, False, "fp16", True),    # GEMM + LoRA, bias
    _case(256, 512, 1, 16, 64, True, "bf16"),
    _case(256, 512, 32, 0, 256, False, "fp32", True),    # no LoRA
    _case(1024, 1024, 1, 16, 64, True, "fp32"),          # CPU-scaled projection: fused GEMV
    _case(1024, 1024, 128, 16, 64, True, "bf16"),        # dequantise + GEMM
]
# The physical-limit benchmark (docs/quant_linear.md, "Benchmark"): LoRA r16, double quant, fp32 and bf16, each at
# one thread and at all of the worker's (threads=0). Batch 1 at 4096x4096 and 4096x14336 (out x in): GEMVs,
# judged against the read-bandwidth floor (derived *_pct_read_bw, ceilings measured at the same thread
# count); batch 512 at 4096x4096: judged against the bare GEMMs on already-dequantised weights (impl
# bare_gemm, timed in the same rounds).
BENCH = [_case(n, k, 1, 16, 64, True, dt, threads=t)
         for (n, k), dt, t in itertools.product(((4096, 4096), (4096, 14336)), ("fp32", "bf16"), (1, 0))] + [
    _case(4096, 4096, 512, 16, 64, True, dt, threads=t) for dt, t in itertools.product(("fp32", "bf16"), (1, 0))]
# Llama-like projections (hidden 4096, GQA kv 1024, MLP 14336), blocksizes and double quant on/off.
LLAMA = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
FULL = list(dict.fromkeys(BENCH + [
    _case(n, k, b, 16, 64, True, dt)
    for (n, k), b, dt in itertools.product(LLAMA[1:], (1, 512), ("bf16", "fp16", "fp32"))
] + [
    _case(4096, 4096, b, 16, bs, dq, "bf16")
    for b, bs, dq in itertools.product((1, 512), (64, 128, 256), (False, True)) if (bs, dq) != (64, True)
]))  # without the bench cases' repeats


def quantized_weight(case: Case, seed: int) -> dict:
    """The NF4 state of a seeded normal weight (scaled 1/sqrt(in), so outputs are O(1))."""
    gen = generator(seed + 104729)
    w = randn((case["out"], case["inp"]), "fp32", "cpu", gen, scale=1 / math.sqrt(case["inp"]))
    st = quantize_nf4(w, case["blocksize"], case["double_quant"])
    tensors = {"packed": st.packed, "absmax": st.absmax}
    if st.nested:
        tensors.update(absmax2=st.absmax2, code2=st.code2, offset=st.offset)
    return tensors


def make_inputs(case: Case, device, seed: int) -> Inputs:
    gen = generator(seed)
    n, k, r = case["out"], case["inp"], case["rank"]
    tensors = {"x": randn((case["batch"], k), case["dtype"], device, gen)}
    tensors.update({name: t.to(device) for name, t in quantized_weight(case, seed).items()})
    grad = ("x",)
    if r:
        tensors["lora_A"] = randn((r, k), case["dtype"], device, gen, scale=1 / math.sqrt(k))
        tensors["lora_B"] = randn((n, r), case["dtype"], device, gen, scale=1 / math.sqrt(r))  # not peft's 0 init
        grad = ("x", "lora_A", "lora_B")
    if case["bias"]:
        tensors["bias"] = randn((n,), case["dtype"], device, gen)
    return Inputs(tensors=tensors, static={"shape": (n, k), "blocksize": case["blocksize"],
                                           "scaling": 2.0 if r else 1.0}, grad=grad)


def flops(case: Case) -> dict[str, float]:
    m, n, k, r = case["batch"], case["out"], case["inp"], case["rank"]
    lora = 2.0 * m * r * (k + n)
    return {"fwd": 2.0 * m * n * k + lora, "bwd": 2.0 * m * n * k + 2 * lora}  # bwd: dX, dA, dB


def bytes_moved(case: Case) -> dict[str, float]:
    """The floor: the 4-bit weight and its absmax *as stored* read once per direction (double quant: one byte
    per block plus an fp32 per 256 blocks; else fp32 per block), plus activations in and out."""
    m, n, k, r = case["batch"], case["out"], case["inp"], case["rank"]
    e = elem_bytes(case["dtype"])
    blocks = n * k / case["blocksize"]
    weight = n * k / 2 + (blocks * (1 + 4 / 256) if case["double_quant"] else 4 * blocks)
    lora = (r * (k + n)) * e
    return {"fwd": weight + lora + m * (k + n) * e, "bwd": weight + 2 * lora + m * (k + n) * e}


def tolerance(case: Case, output: str) -> Tolerance:
    return Tolerance(why="three-way rule vs the dequantised reference (dequantised weight exact given the "
                         "codes: the matmul is judged); k=2 outputs, k=3 gradients")


PARAMS = (Param("out", int, low=1), Param("inp", int, low=1), Param("batch", int, low=1), Param("rank", int, low=0),
          Param("blocksize", int, choices=(32, 64, 128, 256, 512, 1024, 2048, 4096)),
          Param("double_quant", bool), DTYPE_PARAM(), Param("bias", bool),
          Param("threads", int, low=0))  # CPU threads the case runs under (0: the worker's); the worker sets it
RULES = ()


SUITE = register_suite(Suite(
    params=PARAMS, rules=RULES,
    name="quant_linear",
    description="NF4 linear (bnb storage, double quant) + LoRA: x W^T + s (x A^T) B^T; out, dx, dA, dB",
    profiles={"quick": QUICK, "bench": BENCH, "full": FULL},
    make_inputs=make_inputs,
    reference="reference",
    flops=flops,
    bytes=bytes_moved,
    tolerance=tolerance,
    trials=3,
))


@register_impl("quant_linear", "reference", tags=("reference",))
def reference(x, packed, absmax, lora_A=None, lora_B=None, bias=None, absmax2=None, code2=None, offset=None, *,
              shape, blocksize, scaling):
    return nf4_linear(x, packed, absmax, shape=shape, blocksize=blocksize, absmax2=absmax2, code2=code2,
                      offset=offset, lora_A=lora_A, lora_B=lora_B, scaling=scaling, bias=bias)
