"""fp8_linear and mx_linear through the real parity engine (every impl on every quick case: tests/test_registry_parity.py):
each planted bug of issue 16 (wrong variant, E8M0 ceil, nibble order, block boundary off by one,
saturation missing) and each known torchao divergence is judged wrong."""

from __future__ import annotations

import pytest
import torch
from twinbench.harness.core.case import torch_dtype
from twinbench.harness.core.devices import find
from twinbench.harness.core.parity import check_parity
from twinbench.harness.core.registry import IMPLS, SUITES, Impl, load_plugins
from twinbench.reference import mx
from twinbench.reference.lowp_formats import Format, decode, encode, unpack_nibbles

load_plugins()
FP8, MX = SUITES["fp8_linear"], SUITES["mx_linear"]
CPU = find("cpu")


def _verdict(suite, fn, case):
    planted = Impl(name="planted", suite=suite.name, fn=fn)
    return check_parity(suite, planted, IMPLS[(suite.name, suite.reference)], case, "cpu", trials=1)


def _quick(suite, **match):
    return next(c for c in suite.cases("quick") if all(c[k] == v for k, v in match.items()))


# --- planted bugs --------------------------------------------------------------------------------------------

def fnuz_read_as_ocp(x_codes, x_scale, w_codes, w_scale, *, x_format, w_format, scaling, out_dtype):
    """The OCP-vs-FNUZ mix-up: FNUZ bytes viewed as torch.float8_e4m3fn."""
    from twinbench.reference.fp8 import dequantize

    x = dequantize(x_codes, x_scale, x_format.removesuffix("fnuz"), scaling, "x")
    w = dequantize(w_codes, w_scale, w_format.removesuffix("fnuz"), scaling, "w")
    return (x @ w.t()).to(torch_dtype(out_dtype))


def test_wrong_fp8_variant_is_caught():
    v = _verdict(FP8, fnuz_read_as_ocp, _quick(FP8, op="gemm", x_format="e4m3fnuz"))
    assert not v.ok and "out" in v.reason()


def e8m0_ceil(x, *, format):  # noqa: A002
    """MX quantiser rounding the shared exponent up (ceil(log2 amax)) instead of floor."""
    q = mx.quantize(x, format)
    amax = mx._blocks(x.float(), 32).abs().amax(dim=2)
    exponent = torch.ceil(torch.log2(amax)) - mx.SPECS[mx.MxFormat(format)].emax_elem
    scales = (exponent + 127).clamp(0, 254).to(torch.uint8)
    blocks = mx._blocks(x.float(), 32) / torch.exp2(exponent).unsqueeze(-1)
    codes = encode(blocks, mx.SPECS[mx.MxFormat(format)].element, saturate=True).reshape(x.shape[0], -1)
    codes = codes[:, : x.shape[1]]
    from twinbench.reference.lowp_formats import pack_nibbles

    return {"codes": pack_nibbles(codes), "scales": scales, "global_scale": q.global_scale}


def test_e8m0_rounded_up_is_caught():
    v = _verdict(MX, e8m0_ceil, _quick(MX, op="quantize", format="mxfp4", data="normal"))
    assert not v.ok and "scales" in v.reason()


def _swap(p):
    return (p >> 4) | ((p & 0x0F) << 4)


def _nibbles_swapped(swap_x: bool):
    """An MXFP4 GEMM reading the high nibble first, in w (and in x when ``swap_x``)."""
    def fn(x_codes, x_scales, x_global, w_codes, w_scales, w_global, *, format, k, out_dtype):  # noqa: A002
        xc = _swap(x_codes) if swap_x else x_codes
        y = mx.dequantize(xc, x_scales, x_global, format, k) @ \
            mx.dequantize(_swap(w_codes), w_scales, w_global, format, k).t()
        return y.to(torch_dtype(out_dtype))
    return fn


@pytest.mark.parametrize("k,swap_x", [(256, False), (97, True)])
def test_nibble_order_swapped_is_caught(k, swap_x):
    v = _verdict(MX, _nibbles_swapped(swap_x), _quick(MX, op="gemm", format="mxfp4", k=k))
    assert not v.ok


def test_nibbles_swapped_in_both_operands_are_invisible_to_a_gemm_of_even_k():
    """x[2i] <-> x[2i+1] and w[2i] <-> w[2i+1] leave every dot product unchanged: why the suite also has an odd K
    (the padding nibble moves) and the quantiser's codes are compared bit for bit."""
    assert _verdict(MX, _nibbles_swapped(True), _quick(MX, op="gemm", format="mxfp4", k=256)).ok


def packs_high_first(x, *, format):  # noqa: A002
    q = mx.quantize(x, format)
    return {"codes": _swap(q.codes), "scales": q.scales, "global_scale": q.global_scale}


def test_a_quantiser_packing_high_first_is_caught():
    assert not _verdict(MX, packs_high_first, _quick(MX, op="quantize", format="mxfp4", data="normal")).ok


def block_off_by_one(x_codes, x_scales, x_global, w_codes, w_scales, w_global, *, format, k, out_dtype):  # noqa: A002
    """Block scales expanded over 33 elements instead of 32: every boundary but the first is shifted."""
    spec = mx.SPECS[mx.MxFormat(format)]

    def deq(codes, scales, glob):
        values = decode(unpack_nibbles(codes, k), spec.element)
        per = (decode(scales, spec.scale) * glob.double()).repeat_interleave(spec.block + 1, dim=1)[:, :k]
        return values * per

    y = deq(x_codes, x_scales, x_global) @ deq(w_codes, w_scales, w_global).t()
    return y.to(torch_dtype(out_dtype))


def test_block_boundary_off_by_one_is_caught():
    v = _verdict(MX, block_off_by_one, _quick(MX, op="gemm", format="mxfp4", k=256))
    assert not v.ok


def unsaturated_mxfp8(x, *, format):  # noqa: A002
    """MXFP8 e4m3 quantiser without saturation: a block's largest element past 448 becomes NaN."""
    q = mx.quantize(x, format)
    spec = mx.SPECS[mx.MxFormat(format)]
    blocks = mx._blocks(x.float(), spec.block) / torch.exp2(decode(q.scales, Format.E8M0).log2()).unsqueeze(-1)
    codes = encode(blocks, spec.element, saturate=False).reshape(x.shape[0], -1)[:, : x.shape[1]]
    return {"codes": codes, "scales": q.scales, "global_scale": q.global_scale}


def test_missing_saturation_is_caught():
    case = _quick(MX, op="quantize", format="mxfp8_e4m3").replace(data="normal")
    v = _verdict(MX, unsaturated_mxfp8, case)
    assert not v.ok and "codes" in v.reason()


# --- known divergences of torchao 0.18, excluded by its supports() with the reason: the traps catch them -------

@pytest.mark.parametrize("suite,impl,case", [
    ("fp8_linear", "torchao_float8", dict(op="quantize", data="tiny")),
    ("mx_linear", "torchao_quantize", dict(op="quantize", data="nonfinite")),
    ("mx_linear", "torchao_quantize", dict(op="quantize", data="tiny")),
    ("mx_linear", "torchao_quantize", dict(op="quantize", data="zero_block")),
])
def test_torchao_divergences_are_caught_by_the_traps(suite, impl, case):
    pytest.importorskip("torchao", reason="torchao (extra lowp)")
    s = SUITES[suite]
    chosen = _quick(s, **case)
    if suite == "fp8_linear":
        chosen = chosen.replace(x_format="e4m3")
    peer = IMPLS[(suite, impl)]
    assert not peer.can_run(chosen, CPU)[0]  # excluded, with its reason
    v = check_parity(s, peer, IMPLS[(suite, "reference")], chosen, "cpu", trials=1)
    assert not v.ok


# --- the quantiser's error statistics against fp64, judged by the harness (stat:* checks) -----------------------

def test_format_bounds_are_half_an_ulp_and_the_scale_rule():
    from twinbench.reference.lowp_formats import FP32_DIVISION_SLACK, rel_error_bound, ulp_error_bound

    assert rel_error_bound("e4m3") == 2.0 ** -4 + FP32_DIVISION_SLACK
    assert rel_error_bound("e5m2fnuz") == 2.0 ** -3 + FP32_DIVISION_SLACK
    assert rel_error_bound("e2m1") == 2.0 ** -2 + FP32_DIVISION_SLACK
    assert abs(ulp_error_bound("e4m3") - 0.5) < 1e-5
    assert abs(mx.saturation_bound("mxfp4") - 0.25) < 1e-6  # 1 - 6 / 2^3: E8M0 rounds the exponent down
    assert abs(mx.saturation_bound("mxfp8_e4m3") - 0.125) < 1e-6  # 1 - 448 / 2^9
    assert abs(mx.saturation_bound("nvfp4") - 2.0 ** -4) < 1e-6  # half an E4M3 ulp of the block scale


def _stats(v) -> dict:
    return {n: c for n, c in v.checks.items() if n.startswith("stat:")}


@pytest.mark.parametrize("suite,match", [(FP8, dict(op="quantize", data="normal")),
                                         (FP8, dict(op="quantize", data="tiny")),
                                         (MX, dict(op="quantize", format="mxfp4", data="normal")),
                                         (MX, dict(op="quantize", format="nvfp4", data="huge"))])
def test_the_reference_quantiser_is_within_its_formats_bounds(suite, match):
    v = _verdict(suite, IMPLS[(suite.name, "reference")].fn, _quick(suite, **match))
    stats = _stats(v)
    assert set(stats) == {"stat:rel_error", "stat:ulp_error", "stat:saturated_error"}
    assert v.ok and all(c.ok and 0 < c.bound for c in stats.values())
    assert stats["stat:ulp_error"].error > 0.4  # it is measured, not skipped: round-to-nearest comes close to 0.5


def truncating_fp8(x, *, x_format, scaling, saturate):
    """Rounds toward zero instead of to nearest (the reference's scales): up to a whole ulp off."""
    from twinbench.reference.fp8 import expand_scale, quantize

    q = quantize(x, x_format, scaling, "x", saturate=saturate)
    scaled = x.double() / expand_scale(q.scale.double(), scaling, "x", *x.shape)
    nearest = decode(q.codes, x_format)
    table = decode(torch.arange(128, dtype=torch.uint8), x_format)
    down = torch.searchsorted(table[~table.isnan()], scaled.abs(), right=True) - 1
    codes = torch.where(nearest.abs() > scaled.abs(), down.clamp(min=0).to(torch.uint8) | (q.codes & 0x80), q.codes)
    return {"codes": codes, "scale": q.scale}


def test_a_quantiser_rounding_toward_zero_fails_its_ulp_bound():
    v = _verdict(FP8, truncating_fp8, _quick(FP8, op="quantize", data="normal"))
    stats = _stats(v)
    assert not stats["stat:ulp_error"].ok and stats["stat:ulp_error"].error > 0.9
    assert not stats["stat:rel_error"].ok and "stat:ulp_error" in v.reason()


def e8m0_one_too_small(x, *, format):  # noqa: A002
    """An MX quantiser whose shared exponent is one below the rule (floor(log2 amax) - emax - 1): its codes are
    consistent with its own scales, but twice as many elements saturate, by up to 62% for E2M1."""
    spec = mx.SPECS[mx.MxFormat(format)]
    blocks = mx._blocks(x.float(), spec.block)
    amax = blocks.abs().amax(dim=2)
    exponent = mx.floor_log2(torch.where(amax > 0, amax, torch.ones_like(amax))) - spec.emax_elem - 1
    codes = encode(blocks / torch.exp2(exponent.float()).unsqueeze(-1), spec.element, saturate=True)
    codes = codes.reshape(x.shape[0], -1)[:, : x.shape[1]]
    scales = torch.where(amax == 0, 0, exponent + 127).to(torch.uint8)
    return {"codes": mx.pack_nibbles(codes) if spec.packed else codes, "scales": scales,
            "global_scale": torch.ones(())}


def test_a_scale_rounded_too_small_fails_the_saturation_bound():
    v = _verdict(MX, e8m0_one_too_small, _quick(MX, op="quantize", format="mxfp4", data="normal"))
    stats = _stats(v)
    assert not stats["stat:saturated_error"].ok and stats["stat:saturated_error"].error > 0.5
    assert stats["stat:ulp_error"].ok  # each element is rounded right for the scale it was given


def test_missing_saturation_gives_an_infinite_ulp_error():
    case = _quick(MX, op="quantize", format="mxfp8_e4m3").replace(data="normal")
    stat = _stats(_verdict(MX, unsaturated_mxfp8, case))["stat:ulp_error"]
    assert not stat.ok and stat.error == float("inf") and "inf/NaN codes" in stat.detail
