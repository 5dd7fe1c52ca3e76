"""Low-precision number formats, bit by bit: FP8 (OCP and AMD FNUZ), FP4 E2M1 and the E8M0 scale.

Every format here is a table of 2^bits values read off its published bit layout (OCP 8-bit Floating Point
Specification (OFP8) rev 1.0; OCP Microscaling Formats (MX) v1.0 §5.3-5.4; AMD's MI300 ISA for the FNUZ
variants). ``decode`` looks codes up in that table; ``encode`` rounds to the nearest table value, ties to
the even code (round-to-nearest-even: consecutive codes are consecutive magnitudes, so an even code has an
even last mantissa bit), with the format's overflow rule, saturating or not.

| format     | bias | max     | NaN                | inf        | -0  | vendors (docs/low_precision.md)       |
|------------|------|---------|--------------------|------------|-----|---------------------------------------|
| e4m3       | 7    | 448     | S.1111.111         | none       | yes | OCP: sm89/sm90/sm100, gfx950, gfx1201 |
| e4m3fnuz   | 8    | 240     | 0x80 only          | none       | no  | AMD MI300 (gfx942)                    |
| e5m2       | 15   | 57344   | S.11111.{01,10,11} | S.11111.00 | yes | OCP                                   |
| e5m2fnuz   | 16   | 57344   | 0x80 only          | none       | no  | AMD MI300 (gfx942)                    |
| e2m1       | 1    | 6       | none               | none       | yes | OCP MX / NVFP4 elements (4 bits)      |
| e8m0       | 127  | 2^127   | 0xFF               | none       | no  | OCP MX shared scale: 2^(code-127)     |

Everything is computed in float64 on the tensor's device: every value of these formats, every midpoint
between two of them and every fp32 number is exact there, so comparisons decide rounding exactly.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

import torch


class Format(str, enum.Enum):
    """A low-precision element or scale format (the names of the data contract)."""

    E4M3 = "e4m3"          # OCP E4M3FN  (torch.float8_e4m3fn)
    E4M3FNUZ = "e4m3fnuz"  # AMD FNUZ    (torch.float8_e4m3fnuz)
    E5M2 = "e5m2"          # OCP E5M2    (torch.float8_e5m2)
    E5M2FNUZ = "e5m2fnuz"  # AMD FNUZ    (torch.float8_e5m2fnuz)
    E2M1 = "e2m1"          # FP4, 4-bit codes (torch.float4_e2m1fn_x2 packs two)
    E8M0 = "e8m0"          # MX scale    (torch.float8_e8m0fnu)


@dataclass(frozen=True)
class FloatFormat:
    """The bit layout of a sign-exponent-mantissa format and its special codes."""

    bits: int
    exp_bits: int
    man_bits: int
    bias: int
    nan_codes: frozenset[int]
    inf_code: int | None  # the +inf code (the sign bit set gives -inf); None: no infinity
    negative_zero: bool   # False (FNUZ): the sign-bit-only code is NaN, and -0 encodes as +0
    overflow_nan: int | None  # the code an overflow gives without saturation when there is no inf

    @property
    def sign_bit(self) -> int:
        return 1 << (self.bits - 1)

    @property
    def max_code(self) -> int:
        """The largest finite positive code (codes 0..max_code are the non-negative finite magnitudes, in order)."""
        return max(c for c in range(self.sign_bit) if c not in self.nan_codes and c != self.inf_code)


SPECS: dict[Format, FloatFormat] = {
    Format.E4M3: FloatFormat(8, 4, 3, 7, frozenset({0x7F, 0xFF}), None, True, 0x7F),
    Format.E4M3FNUZ: FloatFormat(8, 4, 3, 8, frozenset({0x80}), None, False, 0x80),
    Format.E5M2: FloatFormat(8, 5, 2, 15, frozenset({0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF}), 0x7C, True, None),
    Format.E5M2FNUZ: FloatFormat(8, 5, 2, 16, frozenset({0x80}), None, False, 0x80),
    Format.E2M1: FloatFormat(4, 2, 1, 1, frozenset(), None, True, None),
}
FP8_FORMATS = (Format.E4M3, Format.E4M3FNUZ, Format.E5M2, Format.E5M2FNUZ)
E8M0_NAN = 0xFF
E8M0_BIAS = 127

# torch's dtype for each format where one exists (fnuz casts work on the CPU; torch._scaled_mm refuses them there)
TORCH_DTYPES = {
    Format.E4M3: "float8_e4m3fn", Format.E4M3FNUZ: "float8_e4m3fnuz", Format.E5M2: "float8_e5m2",
    Format.E5M2FNUZ: "float8_e5m2fnuz", Format.E8M0: "float8_e8m0fnu",
}


def torch_dtype_of(fmt: Format | str) -> torch.dtype | None:
    """torch's dtype for the format (None for E2M1, which torch has only packed two per byte)."""
    name = TORCH_DTYPES.get(Format(fmt))
    return getattr(torch, name, None) if name else None


def _value_of_code(code: int, spec: FloatFormat) -> float:
    """One code's value, straight from the bit layout: (-1)^s * 2^(e - bias) * 1.m, or 2^(1 - bias) * 0.m."""
    if code in spec.nan_codes:
        return float("nan")
    sign = -1.0 if code & spec.sign_bit else 1.0
    if spec.inf_code is not None and code & ~spec.sign_bit == spec.inf_code:
        return sign * float("inf")
    exponent = (code >> spec.man_bits) & ((1 << spec.exp_bits) - 1)
    mantissa = code & ((1 << spec.man_bits) - 1)
    if exponent == 0:  # subnormal (and zero)
        return sign * mantissa / (1 << spec.man_bits) * 2.0 ** (1 - spec.bias)
    return sign * (1 + mantissa / (1 << spec.man_bits)) * 2.0 ** (exponent - spec.bias)


@functools.cache
def _table(fmt: Format) -> tuple[float, ...]:
    if fmt is Format.E8M0:
        return tuple(float("nan") if c == E8M0_NAN else 2.0 ** (c - E8M0_BIAS) for c in range(256))
    spec = SPECS[fmt]
    return tuple(_value_of_code(c, spec) for c in range(1 << spec.bits))


def decode_table(fmt: Format | str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Every code's value, float64, indexed by code (256 entries; 16 for E2M1)."""
    return torch.tensor(_table(Format(fmt)), dtype=torch.float64, device=device)


def max_value(fmt: Format | str) -> float:
    fmt = Format(fmt)
    return 2.0 ** 127 if fmt is Format.E8M0 else _table(fmt)[SPECS[fmt].max_code]


def decode(codes: torch.Tensor, fmt: Format | str) -> torch.Tensor:
    """Codes (uint8, one code per element; E2M1 unpacked) -> float64 values (``index_select``: advanced
    indexing of a small table costs 100x more CPU when torch's threads contend)."""
    return decode_table(fmt, codes.device).index_select(0, codes.reshape(-1).long()).reshape(codes.shape)


_ROUND_TO_INTEGER = 2.0 ** 52  # fp64's ulp is 1 from here: v + 2^52 - 2^52 is v rounded half to even (0 <= v < 2^52)


def encode(x: torch.Tensor, fmt: Format | str, *, saturate: bool) -> torch.Tensor:
    """x -> codes (uint8), rounded to nearest, ties to even.

    Overflow (|x| rounds past the largest finite value, or is infinite): with ``saturate`` the largest
    finite value of x's sign; without, +-inf where the format has it (e5m2), else its NaN code (e4m3:
    S.1111.111 keeps the sign; FNUZ: 0x80). E2M1 has neither, so it always saturates. NaN gives the
    format's NaN (e4m3/e5m2 0x7F, FNUZ 0x80; E2M1 has no NaN: 0, an MX block's NaN lives in its scale).
    FNUZ has no -0: negative numbers that round to zero give +0.
    """
    fmt = Format(fmt)
    spec = SPECS[fmt]
    a = x.detach().to(torch.float64).abs()
    finite_a = torch.nan_to_num(a, nan=0.0, posinf=0.0)
    # The magnitude's code, read off the value (the codes 0..max_code are the magnitudes in order): at exponent
    # e (never below the subnormals' e_min = 1 - bias) neighbours are 2^(e - man_bits) apart, so n = a / that
    # step (exact in fp64) rounded half to even is the nearest multiple, and its code is
    # (e - e_min) * 2^man_bits + n (a subnormal: e = e_min, code n; a normal: n = 2^man_bits + mantissa, and
    # rounding up into the next binade gives the next binade's first code). Even n is an even code: ties to
    # even. A code past max_code is an overflow. n <= 2^(man_bits + 1), so adding and subtracting 2^52 rounds
    # it to an integer, ties to even, in fp64's own arithmetic: torch.round and a table lookup (searchsorted)
    # give the same codes but cost 100x more CPU on small tensors when torch's threads contend
    # (docs/low_precision.md, quick profile time).
    min_exponent = 1 - spec.bias
    exponent = floor_log2(finite_a.clamp(min=2.0 ** min_exponent))
    n = finite_a / torch.exp2((exponent - spec.man_bits).to(torch.float64)) + _ROUND_TO_INTEGER - _ROUND_TO_INTEGER
    magnitude = (exponent - min_exponent) * (1 << spec.man_bits) + n.long()
    overflow = (magnitude > spec.max_code) | torch.isinf(a)
    magnitude = torch.where(overflow, torch.full_like(magnitude, spec.max_code), magnitude)  # saturated
    sign = torch.signbit(x.detach()).long() * spec.sign_bit
    if not spec.negative_zero:  # FNUZ: no -0
        sign = torch.where(magnitude == 0, torch.zeros_like(sign), sign)
    code = magnitude | sign
    if not saturate and spec.inf_code is not None:
        code = torch.where(overflow, spec.inf_code | sign, code)
    elif not saturate and spec.overflow_nan is not None:  # e4m3: S.1111.111; FNUZ: 0x80 whatever the sign
        code = torch.where(overflow, spec.overflow_nan | sign, code)
    code = torch.where(torch.isnan(a), torch.full_like(code, _nan_code(fmt)), code)
    return code.to(torch.uint8)


def _nan_code(fmt: Format) -> int:
    """The NaN an encoder writes: 0x7F (OCP, as torch writes it), 0x80 (FNUZ); E2M1 has none (0)."""
    spec = SPECS[fmt]
    if not spec.nan_codes:
        return 0
    return 0x80 if not spec.negative_zero else 0x7F


# --- E8M0 (the MX shared scale) ----------------------------------------------------------------------------

def e8m0_code(exponent: torch.Tensor) -> torch.Tensor:
    """The E8M0 code of 2^exponent (integer exponents, clamped to the format's range [-127, 127])."""
    return (exponent.long().clamp(-E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS).to(torch.uint8)


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """floor(log2(|x|)) exactly, for finite non-zero x (from the binary exponent, never from a rounded log)."""
    _, exponent = torch.frexp(x.to(torch.float64).abs())  # |x| = m * 2^exponent, m in [0.5, 1)
    return exponent.long() - 1


# --- FP4 packing (two E2M1 codes per byte) -------------------------------------------------------------------

def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] 4-bit codes -> [..., ceil(K/2)] bytes: element 2i in the low nibble, 2i+1 in the high nibble
    (torch.float4_e2m1fn_x2 / torchao / cuBLAS order); an odd K is padded with a 0 nibble."""
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, k: int) -> torch.Tensor:
    """[..., ceil(K/2)] bytes -> [..., K] 4-bit codes (uint8), low nibble first."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)[..., :k]


# --- the quantiser's expected error (docs/low_precision.md §Parity) -------------------------------------------

# The references divide x by the scale in fp32 before rounding to the element format: one more rounding of at
# most 2^-24 relative, which the bounds below allow for (2^-23: twice that, for the amax division too).
FP32_DIVISION_SLACK = 2.0 ** -23


def rel_error_bound(fmt: Format | str) -> float:
    """Round-to-nearest's largest relative error for a value in the format's normal range: half an ulp at the
    value's exponent, 2^-(mantissa_bits + 1), plus the fp32 division's rounding."""
    return 2.0 ** -(SPECS[Format(fmt)].man_bits + 1) + FP32_DIVISION_SLACK


def ulp_error_bound(fmt: Format | str) -> float:
    """The largest error in ulps of the element format at x/scale (subnormals included): half an ulp, plus the
    fp32 division's rounding counted in ulps (2^-24 * |q| / ulp(q) <= 2^(mantissa_bits - 23))."""
    return 0.5 + 2.0 ** (SPECS[Format(fmt)].man_bits - 23)


@dataclass(frozen=True)
class RoundingError:
    """How far a quantiser's values ``decode(code) * scale`` are from the exact inputs, per element class.

    ``q = x / scale`` is the exact scaled input (fp64). Elements of a group whose scale is not finite and
    positive (an inf/NaN in the group, an all-zero NVFP4 block) are left out (``judged`` counts the rest).
    Non-saturated elements: ``ulp_error`` = max |code - q| in ulps of the element format at q, and over those
    in the normal range ``rel_error`` = max |code - q| / |q| (``rel_mean`` its mean). Saturated elements
    (|q| above the format's max, which the scale rule allows by its own rounding): ``saturated_error`` = max
    |code - q| / |q|. ``nonfinite``: finite inputs in a finite group that decode to inf/NaN (a missing
    saturation)."""

    rel_error: float
    rel_mean: float
    ulp_error: float
    saturated_error: float
    saturated_fraction: float
    nonfinite: int
    judged: int


def rounding_error(x: torch.Tensor, values: torch.Tensor, scale: torch.Tensor, fmt: Format | str, *,
                   saturation_judged: torch.Tensor | None = None) -> RoundingError:
    """``x``: the exact inputs; ``values``: the decoded codes (per element, unscaled); ``scale``: each
    element's dequantisation multiplier; all the same shape, any float dtype (computed in fp64).
    ``saturation_judged``: where a saturated element's error is bounded (default everywhere; NVFP4 bounds it
    only under a normal E4M3 block scale)."""
    fmt = Format(fmt)
    spec = SPECS[fmt]
    x, values, scale = (t.detach().to(torch.float64) for t in (x, values, scale))
    judged = torch.isfinite(x) & torch.isfinite(scale) & (scale > 0)
    q = torch.where(judged, x / torch.where(judged, scale, torch.ones_like(scale)), torch.zeros_like(x))
    nonfinite = judged & ~torch.isfinite(values)
    diff = (torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0) - q).abs()
    # above the max by more than the fp32 divisions' rounding (the amax element itself lands on the max)
    saturated = judged & (q.abs() > max_value(fmt) * (1 + 2 * FP32_DIVISION_SLACK))
    inside = judged & ~saturated & ~nonfinite
    min_exponent = 1 - spec.bias
    exponent = torch.where(q != 0, floor_log2(torch.where(q != 0, q, torch.ones_like(q))),
                           torch.full_like(q, min_exponent, dtype=torch.long)).clamp(min=min_exponent)
    ulps = diff / torch.exp2((exponent - spec.man_bits).to(torch.float64))
    normal = inside & (q.abs() >= 2.0 ** min_exponent)
    rel = diff / torch.where(q != 0, q.abs(), torch.ones_like(q))
    sat_judged = saturated & (saturation_judged if saturation_judged is not None else torch.ones_like(saturated))

    def largest(values_: torch.Tensor, where: torch.Tensor) -> float:
        return float(values_[where].max()) if bool(where.any()) else 0.0

    n_normal = int(normal.sum())
    return RoundingError(
        rel_error=largest(rel, normal), rel_mean=float(rel[normal].sum()) / n_normal if n_normal else 0.0,
        ulp_error=largest(ulps, inside), saturated_error=largest(rel, sat_judged),
        saturated_fraction=int(saturated.sum()) / max(int(judged.sum()), 1), nonfinite=int(nonfinite.sum()),
        judged=int(judged.sum()))
