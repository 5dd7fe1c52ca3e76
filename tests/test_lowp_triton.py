"""Our Triton FP8 / MXFP4 GEMMs and the fused quantize+GEMM under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1): bit-exact decode and quantisation against the formats' tables, GEMM parity against fp64 on
small odd shapes for every format, scaling and code path, and planted wrong kernels (copies of the kernel files
with one line changed) that these checks must catch."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("triton")

from twinbench.harness.core.devices import Device, find  # noqa: E402
from twinbench.harness.core.parity import check_parity  # noqa: E402
from twinbench.harness.core.registry import IMPLS, SUITES, Impl, load_plugins  # noqa: E402
from twinbench.impls.kernels import fp8_gemm_triton as fp8  # noqa: E402
from twinbench.impls.kernels import mxfp4_gemm_triton as mx  # noqa: E402
from twinbench.reference import fp8 as ref_fp8  # noqa: E402
from twinbench.reference import lowp_formats  # noqa: E402

load_plugins()

FP8 = ("e4m3", "e4m3fnuz", "e5m2", "e5m2fnuz")
TORCH_FP8 = {"e4m3": torch.float8_e4m3fn, "e4m3fnuz": torch.float8_e4m3fnuz, "e5m2": torch.float8_e5m2,
             "e5m2fnuz": torch.float8_e5m2fnuz}  # used to draw codes; the judge is reference/lowp_formats.py
M, N, K = 33, 47, 300  # odd M/N, K neither a multiple of the 128 block nor of the tile


def fp8_values(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """float64 values of uint8 codes: the reference's tables, read off the formats' published bit layouts."""
    return lowp_formats.decode(codes, fmt)


def e8m0_values(codes: torch.Tensor) -> torch.Tensor:
    return lowp_formats.decode(codes, "e8m0")


def mxfp4_weight(packed: torch.Tensor, scales: torch.Tensor, k: int) -> torch.Tensor:
    """The contract's decode: element 2i in the low nibble, E8M0 scale per 32 along K (the reference's tables)."""
    nibbles = lowp_formats.unpack_nibbles(packed, k)
    return lowp_formats.decode(nibbles, "e2m1") * e8m0_values(scales).repeat_interleave(32, dim=1)[:, :k]


def same_bits(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    got, want = got.to(torch.float32), want.to(torch.float32)
    return (got.view(torch.int32) == want.view(torch.int32)) | (got.isnan() & want.isnan())


def fp32_sum_bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |fp32 dot - exact| for exact products summed in fp32 (K + a few roundings for the
    scales), gamma_n * sum |a_i b_i| with unit roundoff 2^-24."""
    return (a.shape[1] + 4) * 2.0 ** -24 * (a.abs() @ b.abs().t()) + 1e-30


def assert_close_to(y: torch.Tensor, xd: torch.Tensor, wd: torch.Tensor, what: str) -> None:
    ref = xd @ wd.t()
    err = (y.double() - ref).abs()
    bound = fp32_sum_bound(xd, wd)
    assert bool((err <= bound).all()), f"{what}: max error {float(err.max()):.3g}, worst ratio " \
                                       f"{float((err / bound).max()):.3g}"


def random_codes(fmt: str, rows: int, cols: int, gen: torch.Generator, spread: float = 3.0) -> torch.Tensor:
    """Finite codes from normal values (every binade in use, no NaN/inf)."""
    x = torch.randn(rows, cols, generator=gen) * spread
    return x.clamp(-fp8.FP8_LAYOUTS[fmt].max, fp8.FP8_LAYOUTS[fmt].max).to(TORCH_FP8[fmt]).view(torch.uint8)


def dequantised(codes, scale, fmt, scaling, weight):
    values = fp8_values(codes, fmt)
    s = scale.double()
    if scaling is fp8.Scaling.TENSOR:
        return values * s
    if scaling is fp8.Scaling.ROW:
        return values * s[:, None]
    rows, k = codes.shape
    s = s.repeat_interleave(fp8.BLOCK, dim=1)[:, :k]
    return values * (s.repeat_interleave(fp8.BLOCK, dim=0)[:rows] if weight else s)


def fp8_operands(x_fmt, w_fmt, scaling, seed=0, n=N):
    gen = torch.Generator().manual_seed(seed)
    xq, wq = random_codes(x_fmt, M, K, gen), random_codes(w_fmt, n, K, gen)
    sx = torch.rand(fp8.expected_scale_shape(scaling, M, K, False), generator=gen) + 0.5
    sw = torch.rand(fp8.expected_scale_shape(scaling, n, K, True), generator=gen) + 0.5
    return xq, sx, wq, sw


# --- FP8: decode and quantise, bit for bit -------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FP8)
def test_fp8_decode_is_bit_exact_for_every_code(fmt):
    codes = torch.arange(256, dtype=torch.uint8)
    got = fp8.decode(codes, fmt)
    ok = same_bits(got, fp8_values(codes, fmt))
    assert bool(ok.all()), f"{fmt}: codes {(~ok).nonzero().flatten().tolist()[:8]} decode wrong"


def grid_probes(fmt: str) -> torch.Tensor:
    """Every finite value of the format, every midpoint (the ties), one fp32 step either side of each midpoint,
    signed zeros, values past the range (saturation) and NaN."""
    values = fp8_values(torch.arange(256, dtype=torch.uint8), fmt).float()
    values = values[values.isfinite()].unique()
    mids = (values[1:] + values[:-1]) / 2
    up, down = torch.nextafter(mids, torch.tensor(torch.inf)), torch.nextafter(mids, torch.tensor(-torch.inf))
    extra = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30, torch.inf, -torch.inf, torch.nan, 500.0, -500.0,
                          60000.0, 1e5])
    return torch.cat([values, mids, up, down, extra])


@pytest.mark.parametrize("fmt", FP8)
def test_fp8_quantize_is_bit_exact_saturating_nearest_even(fmt):
    v = grid_probes(fmt)
    want = lowp_formats.encode(v, fmt, saturate=True)
    got = fp8.quantize(v, fmt)
    bad = (got != want).nonzero().flatten()
    assert not len(bad), [(float(v[i]), int(got[i]), int(want[i])) for i in bad[:8]]


# --- FP8 GEMM parity ------------------------------------------------------------------------------------------

# The suite's quick grid (tests/test_registry_parity.py) runs both paths on e4m3 with every
# scaling, e5m2 x e4m3 per row and the FNUZ pair per tensor and per block; these add the rest of format x scaling.
GEMM_GRID = [("e5m2", fp8.Scaling.TENSOR), ("e5m2", fp8.Scaling.BLOCK), ("e4m3fnuz", fp8.Scaling.ROW),
             ("e4m3fnuz", fp8.Scaling.BLOCK), ("e5m2fnuz", fp8.Scaling.TENSOR), ("e5m2fnuz", fp8.Scaling.ROW)]
GEMM_GRID = [(f, s, p) for (f, s), p in itertools.product(GEMM_GRID, fp8.Path)]


@pytest.mark.parametrize("fmt,scaling,path", GEMM_GRID, ids=lambda v: getattr(v, "value", v))
def test_fp8_gemm_matches_fp64(fmt, scaling, path):
    xq, sx, wq, sw = fp8_operands(fmt, fmt, scaling)
    y = fp8.fp8_gemm(xq, fmt, sx, wq, fmt, sw, scaling, path)
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert_close_to(y, dequantised(xq, sx, fmt, scaling, False), dequantised(wq, sw, fmt, scaling, True),
                    f"{fmt} {scaling.value} {path.value}")


def test_fp8_gemm_block_scales_change_at_the_128_boundary():
    """N = 130 crosses a 128-row weight block inside one tile; distinct scales per block make an off-by-one
    boundary visible (the planted copy below must fail here)."""
    xq, sx, wq, sw = fp8_operands("e4m3", "e4m3", fp8.Scaling.BLOCK, n=130)
    sw = torch.tensor([[1.0, 4.0, 0.5], [0.25, 16.0, 2.0]])
    y = fp8.fp8_gemm(xq, "e4m3", sx, wq, "e4m3", sw, fp8.Scaling.BLOCK, fp8.Path.DECODE)
    assert_close_to(y, dequantised(xq, sx, "e4m3", fp8.Scaling.BLOCK, False),
                    dequantised(wq, sw, "e4m3", fp8.Scaling.BLOCK, True), "block boundary")


def test_fp8_gemm_decode_path_keeps_nan_and_inf():
    """NaN and inf codes reach the output where the reference has them (the decode path; the interpreter's
    emulation of native fp8 reads the E4M3 NaN code as 480, so native NaN cases are a GPU check)."""
    xq, sx, wq, sw = fp8_operands("e5m2", "e5m2", fp8.Scaling.TENSOR)
    xq[2, 7], xq[5, 0] = 0x7F, 0x7C  # NaN, +inf
    y = fp8.fp8_gemm(xq, "e5m2", sx, wq, "e5m2", sw, fp8.Scaling.TENSOR, fp8.Path.DECODE)
    ref = dequantised(xq, sx, "e5m2", fp8.Scaling.TENSOR, False) @ dequantised(wq, sw, "e5m2", fp8.Scaling.TENSOR,
                                                                               True).t()
    assert bool(y[2].isnan().all()) and bool((y[5].isinf() == ref[5].isinf()).all())
    assert bool((torch.sign(y[5]) == torch.sign(ref[5].float())).all())


def test_fp8_gemm_refuses_wrong_scale_shapes_and_dtypes():
    xq, sx, wq, sw = fp8_operands("e4m3", "e4m3", fp8.Scaling.ROW)
    with pytest.raises(ValueError, match="shape"):
        fp8.fp8_gemm(xq, "e4m3", sx[:-1], wq, "e4m3", sw, fp8.Scaling.ROW, fp8.Path.DECODE)
    with pytest.raises(ValueError, match="uint8"):
        fp8.fp8_gemm(xq.float(), "e4m3", sx, wq, "e4m3", sw, fp8.Scaling.ROW, fp8.Path.DECODE)
    with pytest.raises(ValueError, match="unknown fp8 format"):
        fp8.fp8_gemm(xq, "e4m3fn", sx, wq, "e4m3", sw, fp8.Scaling.ROW, fp8.Path.DECODE)


# --- the fused per-row quantise + GEMM -----------------------------------------------------------------------

def rowwise_reference(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """reference/fp8.py's per-row quantiser (scale = amax / max in fp32, >= 2^-126, 1 for zero rows; codes the
    nearest even of x / scale, saturating)."""
    q = ref_fp8.quantize(x, fmt, "row", "x", saturate=True)
    return q.codes, q.scale


@pytest.mark.parametrize("fmt,path", list(itertools.product(("e4m3", "e4m3fnuz"), fp8.Path)),
                         ids=lambda v: getattr(v, "value", v))
def test_fused_rowwise_quantize_gemm_is_the_quantizer_then_the_gemm(fmt, path):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(M, K, generator=gen) * torch.logspace(-3, 3, M)[:, None]  # rows of very different scales
    x[3] = 0  # an all-zero row: scale 1, codes 0
    x[4] *= 1e-38  # a subnormal amax: the scale's 2^-126 floor
    wq = random_codes(fmt, N, K, gen)
    sw = torch.rand(N, generator=gen) + 0.5
    y, xq, sx = fp8.fp8_rowwise_quant_gemm(x, fmt, wq, fmt, sw, path, return_quantized=True)
    want_codes, want_scale = rowwise_reference(x, fmt)
    assert bool(same_bits(sx, want_scale).all()), (sx[:6], want_scale[:6])
    assert int((xq != want_codes).sum()) == 0
    assert_close_to(y, fp8_values(want_codes, fmt) * want_scale.double()[:, None],
                    fp8_values(wq, fmt) * sw.double()[:, None], f"fused {fmt} {path.value}")


# --- MXFP4 ----------------------------------------------------------------------------------------------------

def mxfp4_operands(seed=0, k=K + 1):
    """Every nibble, scales 2^-10..2^8 around 1, odd K (a padding nibble 0, a partial last scale block)."""
    gen = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (N, (k + 1) // 2), dtype=torch.uint8, generator=gen)
    if k % 2:
        packed[:, -1] &= 15
    scales = torch.randint(117, 136, (N, -(-k // 32)), dtype=torch.uint8, generator=gen)
    return packed, scales, k


def test_mxfp4_decode_is_bit_exact_for_every_nibble_and_scale():
    """x = identity reads the dequantised weight out column by column: every E2M1 code in both nibble
    positions, E8M0 codes 0 (2^-127: products are fp32 subnormals), 1, 127, 250 and 255 (NaN: its whole
    output column is NaN, 0 * NaN, in the fp64 product too)."""
    k = 64
    nibbles = torch.arange(16, dtype=torch.uint8)
    lo = nibbles.repeat(2)
    hi = nibbles.flip(0).repeat(2)
    packed = torch.stack([lo | (hi << 4), hi | (lo << 4)])  # both nibble orders of every code
    scale_codes = torch.tensor([[0, 127], [250, 1]], dtype=torch.uint8)
    packed = torch.cat([packed, packed[:1]])
    scales = torch.cat([scale_codes, torch.tensor([[255, 130]], dtype=torch.uint8)])
    y = mx.mxfp4_gemm(torch.eye(k), packed, scales, mx.MxPath.DECODE)
    want = torch.eye(k, dtype=torch.float64) @ mxfp4_weight(packed, scales, k).t()
    ok = same_bits(y, want)
    assert bool(ok.all()), f"wrong at {(~ok).nonzero().tolist()[:6]}"


@pytest.mark.parametrize("x_dtype,path", [(torch.float32, mx.MxPath.DECODE), (torch.float16, mx.MxPath.DECODE),
                                          (torch.float16, mx.MxPath.DOT_SCALED)],
                         ids=["fp32-decode", "fp16-decode", "fp16-dot_scaled"])
def test_mxfp4_gemm_matches_fp64(x_dtype, path):
    packed, scales, k = mxfp4_operands()
    x = torch.randn(M, k, generator=torch.Generator().manual_seed(5)).to(x_dtype)
    y = mx.mxfp4_gemm(x, packed, scales, path, out_dtype=torch.float32)
    assert_close_to(y, x.double(), mxfp4_weight(packed, scales, k), f"mxfp4 {x_dtype} {path.value}")


@pytest.mark.parametrize("x_fmt,path", list(itertools.product(("e4m3", "e5m2", "e2m1"), mx.MxPath)),
                         ids=lambda v: getattr(v, "value", v))
def test_mx_activations_times_mxfp4_weight_match_fp64(x_fmt, path):
    """MXFP8 (e4m3/e5m2) or MXFP4 (e2m1) activations with E8M0 scales, odd K."""
    packed, scales, k = mxfp4_operands(seed=1)
    gen = torch.Generator().manual_seed(6)
    xs = torch.randint(120, 132, (M, -(-k // 32)), dtype=torch.uint8, generator=gen)
    if x_fmt == "e2m1":
        xq = torch.randint(0, 256, (M, (k + 1) // 2), dtype=torch.uint8, generator=gen)
        xq[:, -1] &= 15  # the padding nibble
        xd = mxfp4_weight(xq, xs, k)
    else:
        xq = random_codes(x_fmt, M, k, gen)
        xd = fp8_values(xq, x_fmt) * e8m0_values(xs).repeat_interleave(32, dim=1)[:, :k]
    y = mx.mxfp4_gemm(xq, packed, scales, path, x_scales=xs, x_fmt=x_fmt, k=k)
    assert_close_to(y, xd, mxfp4_weight(packed, scales, k), f"mx {x_fmt} {path.value}")


def test_mxfp4_gemm_refuses_wrong_layouts():
    packed, scales, k = mxfp4_operands()
    x = torch.randn(M, k)
    with pytest.raises(ValueError, match="ceil"):
        mx.mxfp4_gemm(x, packed[:, :-1], scales, mx.MxPath.DECODE)
    with pytest.raises(ValueError, match="E8M0"):
        mx.mxfp4_gemm(x, packed, scales.float(), mx.MxPath.DECODE)
    with pytest.raises(ValueError, match="fp32"):
        mx.mxfp4_gemm(x, packed, scales, mx.MxPath.DOT_SCALED)


# --- planted wrong kernels ------------------------------------------------------------------------------------
# Copies of the kernel files with one line changed (the production kernels carry no switch for them).

MUTATIONS = {  # name: (kernel file module, line fragment, what the wrong copy has instead)
    "fnuz-bias-for-ocp": (fp8, "return _decode_fields(c, 4, 3, 7, 0)", "return _decode_fields(c, 4, 3, 8, 0)"),
    "block-boundary": (fp8, "swb = tl.load(sw_ptr + (rn // 128) * KB + kb",
                       "swb = tl.load(sw_ptr + ((rn + 1) // 128) * KB + kb"),
    "saturation-missing": (fp8, "return tl.clamp(v, -FMT_MAX, FMT_MAX, propagate_nan=tl.PropagateNan.ALL)",
                           "return v"),
    "nibble-order": (mx, "nibble = (byte >> ((rk % 2) * 4)[None, :]) & 15",
                     "nibble = (byte >> (((rk + 1) % 2) * 4)[None, :]) & 15"),
    "e8m0-code-0-is-zero": (mx, "bits = tl.where(c == 0, 0x00400000, c << 23)", "bits = c << 23"),
    "mx-block-boundary": (mx, "scale = tl.load(ws_ptr + rn[:, None] * stride_wsn + (rk // 32)[None, :]",
                          "scale = tl.load(ws_ptr + rn[:, None] * stride_wsn + ((rk + 1) // 32)[None, :]"),
}


def mutant(name: str, folder: Path) -> ModuleType:
    module, original, wrong = MUTATIONS[name]
    source = Path(module.__file__).read_text()
    assert source.count(original) == 1, f"{original!r} no longer names one place in {module.__name__}"
    path = folder / f"lowp_mutant_{name.replace('-', '_')}.py"
    path.write_text(source.replace(original, wrong))  # a real file: triton reads the kernels' source
    spec = importlib.util.spec_from_file_location(path.stem, path)
    copy = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = copy  # @dataclass looks its module up there while the module executes
    spec.loader.exec_module(copy)
    return copy


def caught(name: str, module: ModuleType) -> None:
    """Run the check that must catch ``name`` against ``module`` (a mutant or the production module)."""
    if name == "fnuz-bias-for-ocp":
        xq, sx, wq, sw = fp8_operands("e4m3", "e4m3", fp8.Scaling.TENSOR)
        y = module.fp8_gemm(xq, "e4m3", sx, wq, "e4m3", sw, module.Scaling.TENSOR, module.Path.DECODE)
        assert_close_to(y, dequantised(xq, sx, "e4m3", fp8.Scaling.TENSOR, False),
                        dequantised(wq, sw, "e4m3", fp8.Scaling.TENSOR, True), name)
    elif name == "block-boundary":
        xq, sx, wq, sw = fp8_operands("e4m3", "e4m3", fp8.Scaling.BLOCK, n=130)
        y = module.fp8_gemm(xq, "e4m3", sx, wq, "e4m3", sw, module.Scaling.BLOCK, module.Path.DECODE)
        assert_close_to(y, dequantised(xq, sx, "e4m3", fp8.Scaling.BLOCK, False),
                        dequantised(wq, sw, "e4m3", fp8.Scaling.BLOCK, True), name)
    elif name == "saturation-missing":
        v = torch.tensor([500.0, -1e30, 449.0, 464.0])
        assert module.quantize(v, "e4m3").tolist() == [0x7E, 0xFE, 0x7E, 0x7E]
    elif name in ("nibble-order", "mx-block-boundary"):
        packed, scales, k = mxfp4_operands()
        x = torch.randn(M, k, generator=torch.Generator().manual_seed(5))
        y = module.mxfp4_gemm(x, packed, scales, module.MxPath.DECODE)
        assert_close_to(y, x.double(), mxfp4_weight(packed, scales, k), name)
    elif name == "e8m0-code-0-is-zero":
        packed = torch.full((1, 16), 0x22, dtype=torch.uint8)  # every element 1.0
        y = module.mxfp4_gemm(torch.eye(32), packed, torch.zeros((1, 1), dtype=torch.uint8), module.MxPath.DECODE)
        assert bool((y == 2.0 ** -127).all()), y.flatten()[:4]


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_planted_kernel_bug_is_caught(name, tmp_path):
    caught(name, MUTATIONS[name][0])  # the production kernels pass the same check
    with pytest.raises(AssertionError):
        caught(name, mutant(name, tmp_path))


def test_production_kernels_carry_no_planted_switch():
    for module in (fp8, mx):
        assert "PLANTED" not in Path(module.__file__).read_text().upper()


# --- through the suites: the registered impls on every quick case they run, planted kernels caught -----------

def _parity(suite: str, impl, case):
    return check_parity(SUITES[suite], impl, IMPLS[(suite, "reference")], case, "cpu", trials=1)


# Every registered impl's parity on every quick case it runs is tests/test_registry_parity.py's (the same engine).
@pytest.mark.parametrize("suite,name,path", [
    ("fp8_linear", "triton_fp8_decode", "decode"), ("fp8_linear", "triton_fp8_native", "native"),
    ("fp8_linear", "triton_fp8_fused", "fused-native"), ("mx_linear", "triton_mxfp4_decode", "decode"),
    ("mx_linear", "triton_mxfp4_dot_scaled", "dot_scaled")])
def test_records_say_which_path_ran_and_that_the_interpreter_emulates(suite, name, path):
    impl, cpu = IMPLS[(suite, name)], find("cpu")
    case = min((c for c in SUITES[suite].cases("quick") if impl.can_run(c, cpu)[0]),
               key=lambda c: c["m"] * c["n"] * c["k"])
    inputs = SUITES[suite].make_inputs(case, "cpu", 0)
    assert impl.fn(**inputs.tensors, **inputs.static)["metrics"] == {"execution": "emulated", "path": path}


def test_native_path_is_refused_where_the_device_lacks_the_format():
    """GPU gating comes from harness/core/devices.py lowp_support (fake devices, nothing runs): FNUZ only on
    gfx942, OCP on sm89+, no native fp8 on sm80, MXFP4 dot_scaled on sm100/gfx950; the decode path everywhere."""
    def fake(arch: str) -> Device:
        if arch.startswith("gfx"):
            return Device(name="cuda:0", backend="rocm", torch_device="cuda:0", model="fake", arch=arch)
        cap = f"{arch[3:-1]}.{arch[-1]}"
        return Device(name="cuda:0", backend="cuda", torch_device="cuda:0", model="fake", arch=arch,
                      extra={"capability": cap})

    quick = SUITES["fp8_linear"].cases("quick")
    fnuz, ocp = next(c for c in quick if c["x_format"] == "e4m3fnuz"), quick[0]
    native, decode = IMPLS[("fp8_linear", "triton_fp8_native")], IMPLS[("fp8_linear", "triton_fp8_decode")]
    assert native.can_run(fnuz, fake("sm_90")) == (False, "CUDA: emulated (fnuz: ROCm gfx942 only)")
    assert native.can_run(ocp, fake("sm_90"))[0] and native.can_run(None, fake("sm_90")) == (True, "native: e4m3, e5m2")
    assert native.can_run(fnuz, fake("gfx942"))[0] and not native.can_run(ocp, fake("gfx942"))[0]
    assert native.can_run(ocp, fake("gfx1201"))[0] and native.can_run(None, fake("gfx950"))[0]
    assert native.can_run(None, fake("sm_80")) == (False, "CUDA: emulated (OCP FP8: CUDA sm89+, ROCm gfx950/gfx12)")
    assert all(decode.can_run(c, fake(a))[0] for c in (fnuz, ocp) for a in ("sm_80", "sm_90", "gfx942"))
    mxfp4 = SUITES["mx_linear"].cases("quick")[0]
    scaled = IMPLS[("mx_linear", "triton_mxfp4_dot_scaled")]
    assert scaled.can_run(mxfp4, fake("sm_100"))[0] and scaled.can_run(None, fake("sm_100")) == (True, "native: mxfp4")
    assert scaled.can_run(mxfp4, fake("gfx950"))[0]
    assert not scaled.can_run(mxfp4, fake("sm_90"))[0] and "sm100" in scaled.can_run(mxfp4, fake("sm_90"))[1]
    assert IMPLS[("mx_linear", "triton_mxfp4_decode")].can_run(mxfp4, fake("sm_90"))[0]


@pytest.mark.parametrize("name,suite", [("fnuz-bias-for-ocp", "fp8_linear"), ("nibble-order", "mx_linear")])
def test_planted_kernel_is_caught_by_the_suites_parity(name, suite, tmp_path):
    """The mutant kernel behind the registered impl's own wrapper: the suite's three-way rule fails it (and the
    same wrapper around the production kernels passes)."""
    copy = mutant(name, tmp_path)
    if suite == "fp8_linear":
        case = next(c for c in SUITES[suite].cases("quick") if c["op"] == "gemm" and c["data"] == "zero_block")
        impl = IMPLS[(suite, "triton_fp8_decode")]
        target, attr = sys.modules[impl.fn.__module__], "kernels"
    else:
        case = next(c for c in SUITES[suite].cases("quick") if c["op"] == "gemm" and c["k"] % 2)
        impl = IMPLS[(suite, "triton_mxfp4_decode")]
        target, attr = sys.modules[impl.fn.__module__], "kernels"
    assert _parity(suite, impl, case).ok
    original = getattr(target, attr)
    setattr(target, attr, copy)
    try:
        verdict = _parity(suite, Impl(name="planted", suite=suite, fn=impl.fn), case)
    finally:
        setattr(target, attr, original)
    assert not verdict.ok and "out" in verdict.reason()


# --- ahead-of-time compile coverage (tests/test_aot_compile.py compiles the CI subset for every target) ---------

def test_the_ci_compile_subset_covers_each_targets_paths():
    import aot_variants  # tests/ is on the path
    from twinbench.impls.kernels import aot

    notes = aot_variants.in_fresh_process(aot_variants.lowp_ci_notes, aot.CI_TARGETS)
    for target in aot.CI_TARGETS:
        assert {"fp8_gemm_decode", "fp8_rowwise_quant_gemm", "mxfp4_gemm_decode"} <= set(notes[target]), target
        assert "block" in notes[target]["fp8_gemm_decode"] and "e5m2 x e4m3" in notes[target]["fp8_gemm_decode"]
    assert "fp8_gemm_native" not in notes["sm80"] and "decode" in notes["sm80"]["fp8_rowwise_quant_gemm"]
    for target in ("sm90", "sm100", "gfx1201"):  # OCP fp8 tensor cores
        assert notes[target]["fp8_gemm_native"].startswith("e5m2 x e4m3 "), notes[target]
        assert notes[target]["fp8_rowwise_quant_gemm"].endswith("e4m3 native"), notes[target]
    assert notes["gfx942"]["fp8_gemm_native"].startswith("e5m2fnuz x e4m3fnuz"), notes["gfx942"]  # MI300: FNUZ
    assert notes["gfx942"]["fp8_rowwise_quant_gemm"].endswith("e4m3fnuz native")
    assert [t for t in aot.CI_TARGETS if "mxfp4_gemm_dot_scaled" in notes[t]] == ["sm100"]
    assert notes["sm100"]["mxfp4_gemm_dot_scaled"] == "x u8 kind=5"  # MXFP4 x MXFP4, as mx_linear launches it
