"""The low-precision formats bit by bit (reference/lowp_formats.py, fp8.py, mx.py): every code of every format
against the published values and torch's dtypes, rounding at every boundary, MX/NVFP4 layout and statistics.
Each check runs on the reference and on a planted wrong variant, so it can fail."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from twinbench.reference import fp8, mx
from twinbench.reference.lowp_formats import (
    FP8_FORMATS,
    Format,
    decode,
    decode_table,
    encode,
    max_value,
    pack_nibbles,
    torch_dtype_of,
    unpack_nibbles,
)

ALL_CODES = torch.arange(256, dtype=torch.uint8)

# Published values (OCP OFP8 rev 1.0 table 1/2; AMD MI300 ISA §7; OCP MX v1.0 table 4), code -> value.
PUBLISHED = {
    Format.E4M3: {0x00: 0.0, 0x01: 2.0 ** -9, 0x07: 7 * 2.0 ** -9, 0x08: 2.0 ** -6, 0x38: 1.0, 0x7E: 448.0,
                  0x80: -0.0, 0xFE: -448.0, 0x7F: math.nan, 0xFF: math.nan},
    Format.E4M3FNUZ: {0x00: 0.0, 0x01: 2.0 ** -10, 0x08: 2.0 ** -7, 0x40: 1.0, 0x7F: 240.0, 0xFF: -240.0,
                      0x80: math.nan},
    Format.E5M2: {0x00: 0.0, 0x01: 2.0 ** -16, 0x04: 2.0 ** -14, 0x3C: 1.0, 0x7B: 57344.0, 0x7C: math.inf,
                  0xFC: -math.inf, 0x7D: math.nan, 0x80: -0.0},
    Format.E5M2FNUZ: {0x00: 0.0, 0x01: 2.0 ** -17, 0x40: 1.0, 0x7F: 57344.0, 0x80: math.nan, 0xFF: -57344.0},
    Format.E8M0: {0x00: 2.0 ** -127, 0x7F: 1.0, 0xFE: 2.0 ** 127, 0xFF: math.nan},
}
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where NaN, and the sign of zero too."""
    a, b = a.double(), b.double()
    return bool((((a == b) & (torch.signbit(a) == torch.signbit(b))) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("fmt", list(PUBLISHED))
def test_decode_matches_the_published_values(fmt):
    table = decode_table(fmt)
    for code, value in PUBLISHED[fmt].items():
        assert same_values(table[code:code + 1], torch.tensor([value])), (fmt, hex(code))


def test_e2m1_is_the_published_table_and_a_wrong_bias_is_caught():
    assert same_values(decode_table(Format.E2M1), torch.tensor(E2M1))
    wrong = [v * 2 for v in E2M1]  # a bias of 0 instead of 1
    assert not same_values(torch.tensor(wrong), torch.tensor(E2M1))


@pytest.mark.parametrize("fmt", [*FP8_FORMATS, Format.E8M0])
def test_every_code_decodes_as_torchs_dtype(fmt):
    theirs = ALL_CODES.view(torch_dtype_of(fmt)).double()
    assert same_values(decode(ALL_CODES, fmt), theirs)


def test_the_two_fp8_variants_differ_where_a_mixup_shows():
    """The OCP-vs-FNUZ mix-up: the same byte is worth 2x in OCP e4m3 and 0x80 is -0 vs NaN."""
    ocp, fnuz = decode(ALL_CODES, Format.E4M3), decode(ALL_CODES, Format.E4M3FNUZ)
    assert not same_values(ocp, fnuz)
    assert float(ocp[0x40]) == 2 * float(fnuz[0x40])
    assert math.isnan(float(fnuz[0x80])) and float(ocp[0x80]) == 0.0


@pytest.mark.parametrize("fmt", FP8_FORMATS)
def test_every_finite_code_encodes_back_to_itself(fmt):
    values = decode(ALL_CODES, fmt)
    finite = torch.isfinite(values)
    assert bool((encode(values[finite], fmt, saturate=False) == ALL_CODES[finite]).all())  # -0 included


def _torch_encode(x: torch.Tensor, fmt: Format, saturate: bool) -> torch.Tensor:
    """torch's cast with the saturation rule made explicit (torch saturates e4m3fn always, e5m2 never)."""
    if saturate:
        x = x.clamp(-max_value(fmt), max_value(fmt))
    return x.to(torch_dtype_of(fmt)).view(torch.uint8)


def _boundaries(fmt: Format) -> torch.Tensor:
    """Every midpoint between neighbouring values and the fp32 numbers on either side of it."""
    v = decode(ALL_CODES, fmt)
    v = torch.unique(v[torch.isfinite(v) & (v.abs() <= max_value(fmt))]).sort().values
    mids = ((v[1:] + v[:-1]) / 2).float()
    return torch.cat([mids, torch.nextafter(mids, torch.full_like(mids, math.inf)),
                      torch.nextafter(mids, torch.full_like(mids, -math.inf)), v.float()])


@pytest.mark.parametrize("fmt", FP8_FORMATS)
def test_round_to_nearest_even_at_every_boundary_as_torch(fmt):
    x = _boundaries(fmt)
    assert bool((encode(x, fmt, saturate=True) == _torch_encode(x, fmt, True)).all())


def test_a_planted_round_half_up_is_caught_at_the_ties():
    x = _boundaries(Format.E4M3)
    half_up = encode(torch.nextafter(x, torch.full_like(x, math.inf)) * (x > 0) + x * (x <= 0), Format.E4M3,
                     saturate=True)
    assert not bool((half_up == _torch_encode(x, Format.E4M3, True)).all())


@settings(max_examples=300, deadline=None)
@given(st.floats(width=32, allow_nan=False, allow_infinity=False, min_value=-60000, max_value=60000),
       st.sampled_from(FP8_FORMATS))
def test_any_fp32_encodes_as_torch(value, fmt):
    x = torch.tensor([value], dtype=torch.float32)
    assert int(encode(x, fmt, saturate=True)) == int(_torch_encode(x, fmt, True))


@pytest.mark.parametrize("fmt,over,saturated,unsaturated", [
    (Format.E4M3, 465.0, 0x7E, 0x7F), (Format.E4M3, 464.0, 0x7E, 0x7E),  # the tie rounds to 448 (even)
    (Format.E5M2, 61440.0, 0x7B, 0x7C), (Format.E4M3FNUZ, 248.0, 0x7F, 0x80), (Format.E5M2FNUZ, 1e6, 0x7F, 0x80),
    (Format.E4M3, math.inf, 0x7E, 0x7F), (Format.E5M2, math.inf, 0x7B, 0x7C),
])
def test_overflow_saturates_or_not(fmt, over, saturated, unsaturated):
    x = torch.tensor([over])
    assert int(encode(x, fmt, saturate=True)) == saturated
    assert int(encode(x, fmt, saturate=False)) == unsaturated
    assert int(encode(-x, fmt, saturate=True)) == saturated | 0x80


def test_fnuz_has_no_negative_zero_and_one_nan():
    x = torch.tensor([-0.0, -1e-9, math.nan])
    assert encode(x, Format.E4M3FNUZ, saturate=True).tolist() == [0, 0, 0x80]
    assert encode(x, Format.E4M3, saturate=True).tolist() == [0x80, 0x80, 0x7F]


def test_nibbles_are_low_first_as_torch_float4():
    codes = torch.tensor([[1, 2, 3, 4, 5]], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [[0x21, 0x43, 0x05]]  # element 2i low, the padding nibble 0
    assert bool((unpack_nibbles(packed, 5) == codes).all())
    swapped = (packed >> 4) | ((packed & 0xF) << 4)
    assert not bool((unpack_nibbles(swapped, 5) == codes).all())


def test_mx_shared_exponent_is_floor_of_log2_amax_minus_emax():
    x = torch.tensor([[3.9] + [0.1] * 31, [4.0] + [0.1] * 31, [0.0] * 32])
    q = mx.quantize(x, "mxfp4")
    # floor(log2 3.9) = 1, floor(log2 4) = 2; minus emax 2 -> 2^-1, 2^0; amax 0 -> code 0, zero codes
    assert q.scales.flatten().tolist() == [126, 127, 0]
    assert int(q.codes[2].max()) == 0
    ceil_exponent = torch.ceil(torch.log2(torch.tensor(3.9))) - 2 + 127
    assert int(ceil_exponent) != 126  # the planted ceil gives another scale


def test_nvfp4_matches_torchao_and_its_value_is_element_times_scale_times_global():
    torchao_mx = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor", reason="torchao (extra lowp)")
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    q = mx.quantize(x, "nvfp4")
    scales, codes = torchao_mx.nvfp4_quantize(x, 16, per_tensor_scale=q.global_scale)
    assert bool((codes.view(torch.uint8) == q.codes).all()) and bool((scales.view(torch.uint8) == q.scales).all())


@pytest.mark.parametrize("fmt,scaling,bound", [
    ("e4m3", "tensor", 2.0 ** -4), ("e4m3", "row", 2.0 ** -4), ("e4m3", "block", 2.0 ** -4),
    ("e5m2", "row", 2.0 ** -3), ("e4m3fnuz", "block", 2.0 ** -4),
])
def test_fp8_error_statistics_against_fp64(fmt, scaling, bound):
    """Normal-range elements: relative error <= half an ulp (2^-(m+1)); the mean is about a third of it."""
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    q = fp8.quantize(x, fmt, scaling, "x")
    rel = ((q.dequantize(torch.float64) - x).abs() / x.abs())[x.abs() > 0.05]
    assert float(rel.max()) <= bound and 0.15 * bound < float(rel.mean()) < 0.5 * bound


def test_mx_error_statistics_against_fp64():
    x = torch.randn(128, 256, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    errors = {f: float((mx.quantize(x, f).dequantize(torch.float64) - x).norm() / x.norm())
              for f in ("mxfp8_e4m3", "mxfp8_e5m2", "mxfp4", "nvfp4")}
    # measured 2026-12-05: docs/low_precision.md (MXFP4 ~0.11, NVFP4 ~0.09, MXFP8 e4m3 ~0.03, e5m2 ~0.06)
    assert errors["mxfp8_e4m3"] < errors["mxfp8_e5m2"] < errors["nvfp4"] < errors["mxfp4"] < 0.15


def test_partial_block_amax_is_over_the_elements_that_exist():
    x = torch.ones(2, 130)
    x[:, 128:] = 1000.0  # the partial last tile
    q = fp8.quantize(x, "e4m3", "block", "x")
    assert q.scale.shape == (2, 2)
    assert float(q.scale[0, 0]) == pytest.approx(1 / 448) and float(q.scale[0, 1]) == pytest.approx(1000 / 448)


def test_e8m0_codes_of_every_power_of_two_as_torch():
    from twinbench.reference.lowp_formats import e8m0_code

    exponents = torch.arange(-127, 128)
    theirs = torch.exp2(exponents.double()).float().to(torch.float8_e8m0fnu).view(torch.uint8)
    assert bool((e8m0_code(exponents) == theirs).all())
    assert not bool((e8m0_code(exponents + 1) == theirs).all())  # a bias off by one is caught


@pytest.mark.parametrize("fmt", [Format.E5M2, Format.E4M3FNUZ, Format.E5M2FNUZ])
def test_non_saturating_encode_as_torch_including_overflow(fmt):
    """torch's e5m2 and fnuz casts do not saturate: the same codes past the largest value (inf / NaN)."""
    x = torch.cat([_boundaries(fmt), torch.tensor([max_value(fmt) * 1.5, 1e30, math.inf, -math.inf])])
    x = torch.cat([x, -x])
    ours, theirs = encode(x, fmt, saturate=False), x.to(torch_dtype_of(fmt)).view(torch.uint8)
    assert bool((ours == theirs).all()), x[ours != theirs][:5]


def test_e2m1_and_nibble_order_as_torchao():
    """torch has no float4 conversion on the CPU (copy_kernel not implemented for Float4_e2m1fn_x2), so E2M1 is
    checked against torchao, whose packing is torch.float4_e2m1fn_x2's."""
    kernels = pytest.importorskip("torchao.prototype.mx_formats.kernels", reason="torchao (extra lowp)")
    codes = torch.arange(16, dtype=torch.uint8)
    assert same_values(kernels.f4_unpacked_to_f32(codes), decode_table(Format.E2M1))
    pairs = torch.randint(0, 16, (4, 64), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    assert bool((kernels.pack_uint4(pairs) == pack_nibbles(pairs)).all())
