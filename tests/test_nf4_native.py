"""The native NF4 CPU kernels (impls/kernels/nf4_native.c): bit-exact dequantisation against the reference and bnb,
GEMV forward/backward within fp32 summation-order error, the build cache, planted bugs caught through the
native path, and the inductor fallback still correct when the native kernels are off."""

from __future__ import annotations

import contextlib
import platform

import pytest
import torch
from nf4_calls import few_rows_native, native_path_calls
from twinbench.harness.core.parity import check_parity
from twinbench.harness.core.registry import IMPLS, SUITES, load_plugins
from twinbench.impls.kernels import availability, nf4_native
from twinbench.impls.kernels import nf4 as nf4_kernels
from twinbench.impls.kernels.nf4_weight import NF4Weight
from twinbench.reference.nf4 import dequantize_state, quantize_nf4

load_plugins()
SUITE = SUITES["quant_linear"]
REF = IMPLS[("quant_linear", "reference")]
FUSED = IMPLS[("quant_linear", "fused_cpu")]
GEMV_FP32, GEMM_FP16 = SUITE.cases("quick")[0], SUITE.cases("quick")[1]

native = pytest.mark.skipif(not nf4_native.status()[0], reason=f"native NF4 kernels: {nf4_native.status()[1]}")


def _isa_params():
    """Each vector layer of this machine's architecture that its CPU can run: the AVX2 build is tested on AVX-512
    machines too, forced by TWINBENCH_NF4_ISA. The NEON layer on x86: tests/test_nf4_neon.py (under qemu)."""
    have = availability.cpu_flags()
    aarch64 = platform.machine() in ("aarch64", "arm64")
    return [pytest.param(isa, marks=pytest.mark.skipif(not all(f in have for f in needs),
                                                       reason=f"this CPU cannot run the {isa} build"))
            for isa, (_, needs) in nf4_native.ISA_FLAGS.items() if (isa == "neon") == aarch64]


@pytest.fixture(params=_isa_params())
def isa(request, monkeypatch):
    monkeypatch.setenv("TWINBENCH_NF4_ISA", request.param)
    if not nf4_native.status()[0]:
        pytest.skip(f"native NF4 kernels: {nf4_native.status()[1]}")
    assert nf4_native.isa() == request.param
    return request.param


@contextlib.contextmanager
def rebuilt_kernels(tmp_path, source: str | None = None, flags: tuple[str, ...] = ()):
    """Within the block the native kernels are those built from ``source`` (a variant of nf4_native.c; None: the
    real one) with extra ``flags``, cached under ``tmp_path``; after it, the normal build again."""
    def reload() -> None:
        for cache in (nf4_native._load_for, nf4_native._load_isa):
            cache.cache_clear()

    try:
        with pytest.MonkeyPatch.context() as m:
            if source is not None:
                planted = tmp_path / "nf4_native.c"
                planted.write_text(source)
                m.setattr(nf4_native, "SOURCE", planted)
            m.setenv("TWINBENCH_CACHE_DIR", str(tmp_path))  # read by impls/kernels/native_build.py
            m.setattr(nf4_native, "FLAGS", [*nf4_native.FLAGS, *flags])
            reload()
            yield
    finally:
        reload()


def state(n: int, k: int, blocksize: int, double_quant: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    st = quantize_nf4(torch.randn(n, k, generator=gen) / k**0.5, blocksize, double_quant)
    w = NF4Weight(st.packed, st.absmax, (n, k), blocksize, st.absmax2, st.code2, st.offset)
    return st, w, st.packed.reshape(n, k // 2), w.block_scales()


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
def test_dequantize_is_bit_exact(blocksize, double_quant, isa):
    """97 rows (odd), every output dtype: identical to the reference's code * absmax, rounded by torch."""
    st, w, packed2d, scales = state(97, 512, blocksize, double_quant)
    if double_quant:  # the native absmax decode is the reference's, bit for bit (no FMA contraction)
        ref_scales = (st.code2[st.absmax.long()] * st.absmax2.repeat_interleave(256)[: st.absmax.numel()]
                      + st.offset)
        assert torch.equal(scales, ref_scales)
    ref = dequantize_state(st, torch.float32)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for stream in (False, True):  # plain or non-temporal stores: the same bits
            got = nf4_native.dequantize(packed2d, scales, dtype, stream=stream)
            assert got.dtype == dtype and torch.equal(got, ref.to(dtype)), (dtype, stream)
            into = torch.full_like(got, float("nan"))  # a reused buffer is fully overwritten
            assert torch.equal(nf4_native.dequantize(packed2d, scales, dtype, out=into, stream=stream), ref.to(dtype))
        # an out that is not 64-byte aligned cannot take streaming stores: the kernel falls back to plain ones
        skewed = torch.full((got.numel() + 1,), float("nan"), dtype=dtype)[1:].view(got.shape)
        assert skewed.data_ptr() % 64 and torch.equal(
            nf4_native.dequantize(packed2d, scales, dtype, out=skewed, stream=True), ref.to(dtype)), dtype


@native
def test_dequantize_streams_from_the_size_threshold_on(monkeypatch):
    """Outputs of nf4_native.STREAM_MIN_BYTES and more are written with non-temporal stores (the flag reaches the
    kernel), smaller ones with plain stores: the same bits either way."""
    _, _, packed2d, scales = state(64, 256, 64, False)
    flags = []
    real = nf4_native._call
    monkeypatch.setattr(nf4_native, "_call", lambda fn, *a: flags.append(a[-1]) or real(fn, *a))
    small = nf4_native.dequantize(packed2d, scales, torch.float32)
    monkeypatch.setattr(nf4_native, "STREAM_MIN_BYTES", small.numel() * 4)
    assert torch.equal(nf4_native.dequantize(packed2d, scales, torch.float32), small)
    assert torch.equal(nf4_native.dequantize(packed2d, scales, torch.bfloat16), small.bfloat16())  # half the bytes
    assert flags == [0, 1, 0]


def test_dequantize_matches_bitsandbytes(isa):
    bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed")
    w = torch.randn(64, 256) / 16
    packed, qs = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    bnb_scales = bnb_functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    ours = NF4Weight.from_bnb(packed, qs).block_scales()
    assert torch.equal(ours, bnb_scales)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        theirs = torch.ops.bitsandbytes.dequantize_4bit.default(packed, bnb_scales, 64, "nf4", [64, 256], dtype)
        assert torch.equal(nf4_native.dequantize(packed.reshape(64, 128), ours, dtype), theirs), dtype


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 11])
@pytest.mark.parametrize("k,blocksize,double_quant", [(512, 64, True), (512, 128, False), (512, 256, True),
                                                      (160, 32, False), (96, 32, True)])
def test_gemv_forward_and_backward_match_fp64(rows, k, blocksize, double_quant, isa):
    """Errors of fp32 summation order only: well under 1e-5 at K=512 (fp32 eps * sqrt(K) * |terms|). K=160 and
    96 with 32-column blocks leave columns past the last whole vector group (the kernels' scalar tail); 97
    rows leave rows past the last register block."""
    st, w, packed2d, scales = state(97, k, blocksize, double_quant, seed=rows)
    wd = dequantize_state(st, torch.float64)
    gen = torch.Generator().manual_seed(rows + 7)
    x, g = torch.randn(rows, k, generator=gen), torch.randn(rows, 97, generator=gen)
    y, dx = nf4_native.gemv(x, packed2d, scales), nf4_native.gemv_t(g, packed2d, scales)
    want_y, want_dx = x.double() @ wd.t(), g.double() @ wd
    assert y.shape == (rows, 97) and dx.shape == (rows, k)
    assert (y - want_y).abs().max() < 2e-6 * want_y.abs().max()
    assert (dx - want_dx).abs().max() < 2e-6 * want_dx.abs().max()
    x16 = x.to(torch.bfloat16)  # half inputs are upcast to fp32 (fp32 accumulation)
    assert torch.allclose(nf4_native.gemv(x16, packed2d, scales).double(), x16.double() @ wd.t(), atol=1e-5)


def _whole_call_case(n: int, k: int, blocksize: int, double_quant: bool, rows: int, rank: int, seed: int):
    """(packed2d, scales, fp64 W, x, A, B, bias, g) for the whole-call kernels."""
    st, _, packed2d, scales = state(n, k, blocksize, double_quant, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x, a, b = (torch.randn(*s, generator=gen) for s in ((rows, k), (rank, k), (n, rank)))
    bias, g = torch.randn(n, generator=gen), torch.randn(rows, n, generator=gen)
    return packed2d, scales, dequantize_state(st, torch.float64), x, a / k**0.5, b, bias, g


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """fp32 summation-order error only (the bound of test_gemv_forward_and_backward_match_fp64)."""
    return bool((got.double() - want).abs().max() <= 2e-6 * want.abs().max())


@pytest.mark.parametrize("rows,rank", [(1, 16), (3, 5), (4, 16)])
@pytest.mark.parametrize("k,blocksize,double_quant", [(512, 64, True), (160, 32, False), (96, 32, True)])
def test_whole_call_kernels_match_fp64(rows, rank, k, blocksize, double_quant, isa):
    """nf4_native.lora_gemv / lora_gemv_t (GEMV, LoRA products and bias in one native call each) against the
    fp64 composition: y = x W^T + s (x A^T) B^T + bias, dx = g W + s (g B) A, dA = s (g B)^T x, dB = g^T (s x A^T).
    97 rows (chunk and register-block tails), column tails at K = 160 / 96, rank 5 (not a whole vector), and
    gradients left out on request (dx left out: the weight is not read). Planted: the LoRA scaling or the bias
    dropped, or the stored x A^T of another input, are seen."""
    packed2d, scales, wd, x, a, b, bias, g = _whole_call_case(97, k, blocksize, double_quant, rows, rank, rows)
    s = 2.0
    xd, ad, bd, gd = x.double(), a.double(), b.double(), g.double()
    want_y = xd @ wd.t() + s * (xd @ ad.t()) @ bd.t() + bias.double()
    y, xa = nf4_native.lora_gemv(x, packed2d, scales, a, b, s, bias)
    assert _close(y, want_y) and _close(xa, xd @ ad.t())
    gb = gd @ bd
    want = (gd @ wd + s * gb @ ad, s * gb.t() @ xd, gd.t() @ (s * xd @ ad.t()))
    got = nf4_native.lora_gemv_t(g, packed2d, scales, a, b, xa, s, x)
    assert all(_close(t, w) for t, w in zip(got, want))
    for need in ((False, True, True), (True, False, False), (False, False, True)):
        part = nf4_native.lora_gemv_t(g, packed2d, scales, a, b, xa, s, x, need)
        assert all((t is None) == (not wanted) for t, wanted in zip(part, need))
        assert all(torch.equal(t, full) for t, full in zip(part, got) if t is not None)
    # planted: each of these wrong calls is told apart by the same bound
    assert not _close(nf4_native.lora_gemv(x, packed2d, scales, a, b, 1.0, bias)[0], want_y)
    assert not _close(nf4_native.lora_gemv(x, packed2d, scales, a, b, s)[0], want_y)
    wrong = nf4_native.lora_gemv_t(g, packed2d, scales, a, b, xa.flip(-1).contiguous(), s, x)
    assert _close(wrong[0], want[0]) and not _close(wrong[2], want[2])  # dB uses x A^T, dx does not
    assert not _close(nf4_native.lora_gemv_t(g, packed2d, scales, a, b, xa, 1.0, x)[0], want[0])


def test_whole_call_reads_and_writes_bf16_factors(isa):
    """bf16 A and B are read as they are and dA, dB written in bf16: bitwise the fp32 computation on the same
    values, rounded once to nearest even (ties, overflow to inf and NaN included; rank 24: a vector and a
    scalar tail on AVX-512). Planted: rounding by truncation is told apart."""
    packed2d, scales, _, x, a, b, _, g = _whole_call_case(97, 512, 64, True, 2, 24, 13)
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    y16, xa16 = nf4_native.lora_gemv(x, packed2d, scales, a16, b16, 2.0)
    y32, xa32 = nf4_native.lora_gemv(x, packed2d, scales, a16.float(), b16.float(), 2.0)
    assert torch.equal(y16, y32) and torch.equal(xa16, xa32)
    xa32[0, :2] = torch.tensor([float("nan"), 3e38])  # dB columns 0 and 1: NaN, and +-inf after the scaling
    got = nf4_native.lora_gemv_t(g, packed2d, scales, a16, b16, xa32, 2.0, x)
    want = nf4_native.lora_gemv_t(g, packed2d, scales, a16.float(), b16.float(), xa32, 2.0, x)
    assert got[1].dtype == got[2].dtype == torch.bfloat16 and got[0].dtype == torch.float32
    assert torch.equal(got[0], want[0])
    for t, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(t, w.to(torch.bfloat16), rtol=0, atol=0, equal_nan=True)
    assert got[2][:, 0].isnan().all() and got[2][:, 1].isinf().any()
    truncated = (want[2].view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)
    assert not torch.equal(got[2][:, 2:], truncated[:, 2:])


@native
@pytest.mark.parametrize("threads", [2, 3])
def test_whole_call_is_bitwise_the_same_at_any_thread_count(threads, isa, monkeypatch):
    """Forward rows go out in 32-row chunks that idle threads steal, x A^T and g B split by LoRA rank, dx summed
    by fixed row slabs (units that idle threads steal too) and reduced in a fixed order, dA by column groups, dB by rows: each element is computed in
    an order that does not depend on the team, so the results are bitwise those of one thread (97 rows: a
    partial chunk; rank 5: uneven split)."""
    packed2d, scales, _, x, a, b, bias, g = _whole_call_case(97, 512, 128, True, 3, 5, 21)

    def run():
        y, xa = nf4_native.lora_gemv(x, packed2d, scales, a, b, 2.0, bias)
        return (y, xa, *nf4_native.lora_gemv_t(g, packed2d, scales, a, b, xa, 2.0, x))

    before = torch.get_num_threads()
    one = run()  # 24 KB of weight: one thread by default
    monkeypatch.setattr(nf4_native, "BYTES_PER_THREAD", 1)
    torch.set_num_threads(threads)
    try:
        assert nf4_native.threads_for(packed2d) == threads
        for _ in range(3):  # which thread steals which chunk varies from call to call
            assert all(torch.equal(p, q) for p, q in zip(one, run()))
    finally:
        torch.set_num_threads(before)


@few_rows_native
def test_nf4_lora_linear_without_lora_or_with_bias_only(monkeypatch):
    """The few-rows API takes the whole-call kernel with rank 0 (bias only, or nothing) and its gradients stay
    right (x through the GEMV backward, bias summed in torch); an empty batch still works (composed route)."""
    from twinbench.impls.quant_linear import fused

    packed2d, _, wd, x, _, _, bias, g = _whole_call_case(97, 512, 64, True, 2, 1, 5)
    _, w, _, _ = state(97, 512, 64, True, seed=5)
    calls = native_path_calls(monkeypatch)
    for with_bias in (False, True):
        xl, bl = x.clone().requires_grad_(), bias.clone().requires_grad_()
        out = fused.nf4_lora_linear(xl, w, bias=bl if with_bias else None)
        want = x.double() @ wd.t() + (bias.double() if with_bias else 0)
        assert _close(out, want)
        dx, *db = torch.autograd.grad(out, [xl, bl] if with_bias else [xl], g)
        assert _close(dx, g.double() @ wd)
        assert not with_bias or torch.equal(db[0], g.sum(0))
    assert calls == ["lora_op", "lora_op backward"] * 2
    empty = torch.zeros(0, 512, requires_grad=True)  # an empty batch: the composed route, empty results
    out = fused.nf4_lora_linear(empty, w, torch.randn(4, 512), torch.randn(97, 4))
    assert out.shape == (0, 97) and torch.autograd.grad(out.sum(), empty)[0].shape == (0, 512)


@native
def test_trace_build_reports_every_phase(tmp_path, monkeypatch):
    """An NF4_TRACE build (benchmarks/nf4_stream.py --trace) records, per thread, the phases of the last
    whole-call kernel in order; the normal build records nothing."""
    assert nf4_native.last_trace() is None
    packed2d, scales, _, x, a, b, _, g = _whole_call_case(64, 256, 64, True, 1, 16, 8)
    monkeypatch.setattr(nf4_native, "BYTES_PER_THREAD", 1)
    before = torch.get_num_threads()
    with rebuilt_kernels(tmp_path, flags=("-DNF4_TRACE=1",)):
        try:
            torch.set_num_threads(2)

            def forward():
                return nf4_native.lora_gemv(x, packed2d, scales, a, b, 2.0)

            for call in (forward, lambda: nf4_native.lora_gemv_t(g, packed2d, scales, a, b, torch.zeros(1, 16), 2.0, x)):
                call()
                trace = nf4_native.last_trace()
                assert trace is not None and trace.shape == (8, len(nf4_native.TRACE_POINTS), 2)
                entry, joined = trace[0, 0, 0], trace[0, -1, 0]
                # forward: phase 1 on the calling thread before the fork; backward: phase 1, barrier in the region
                points = [1, 4] if call is forward else [1, 2, 3, 4]
                for thread in trace[:2]:  # in order (both clocks), within the call
                    assert bool((thread[points] > 0).all()) and bool((thread[points].diff(dim=0) >= 0).all())
                    assert entry <= thread[1, 0] and thread[4, 0] <= joined
                if call is forward:
                    assert entry <= trace[0, 2, 0] <= trace[:2, 1, 0].min()
                assert not trace[2:].any() and not nf4_native.last_trace().any()  # cleared once read
        finally:
            torch.set_num_threads(before)
    assert nf4_native.last_trace() is None


@native
def test_wrappers_refuse_bad_arguments():
    _, _, packed2d, scales = state(32, 128, 64, False)
    with pytest.raises(ValueError, match="contiguous CPU torch.float32"):
        nf4_native.gemv(torch.randn(1, 128), packed2d, scales.double())
    with pytest.raises(ValueError, match=r"x must be \[M, 128\]"):
        nf4_native.gemv(torch.randn(1, 64), packed2d, scales)
    with pytest.raises(ValueError, match=r"g must be \[M, 32\]"):
        nf4_native.gemv_t(torch.randn(2, 31), packed2d, scales)
    with pytest.raises(ValueError, match="fp32/bf16/fp16"):
        nf4_native.dequantize(packed2d, scales, torch.float64)
    with pytest.raises(ValueError, match="shape"):
        nf4_native.dequantize(packed2d, scales, torch.float32, out=torch.empty(4, 4))
    assert not nf4_native.supports(packed2d, scales.reshape(32, 2).repeat_interleave(4, 1))  # blocksize 16
    assert not nf4_native.supports(packed2d.t().contiguous().t(), scales.reshape(32, 2))  # strided bytes


@native
def test_build_is_cached_by_source_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("TWINBENCH_CACHE_DIR", str(tmp_path))  # read by impls/kernels/native_build.py
    cc = availability.c_compiler()
    first = nf4_native._build(cc)
    assert first.parent == tmp_path / "nf4_native" and first.exists()
    stamp = first.stat().st_mtime_ns
    assert nf4_native._build(cc) == first and first.stat().st_mtime_ns == stamp  # reused, not rebuilt
    monkeypatch.setattr(nf4_native, "FLAGS", [*nf4_native.FLAGS, "-DTWINBENCH_TEST_KEY"])
    assert nf4_native._build(cc) != first  # other flags: another build
    assert not [p for p in (tmp_path / "nf4_native").iterdir() if p.suffix != ".so"]  # no temp files left


# --- planted bugs through the native path: the suite's parity rule must catch each --------------------------

def _swap_nibbles(p: torch.Tensor) -> torch.Tensor:
    return ((p << 4) | (p >> 4)).contiguous()


def _fp32(s):
    """fp32 scales, whichever form the kernels were handed (the GEMV path gets double-quantised ones as stored)."""
    return s.decoded().reshape(-1) if isinstance(s, nf4_native.NestedScales) else s


def _nested_code2_shifted(s):
    """Double-quant decoded with the wrong second-level code (every q one entry off): only the kernels' own
    per-block decode sees this."""
    if not isinstance(s, nf4_native.NestedScales):
        return s * 1.01  # the GEMM path's fp32 scales: the same size of error
    return nf4_native.NestedScales(s.q, s.absmax2, s.code2.roll(1).contiguous(), s.offset)


NATIVE_BUGS = {
    "wrong-code-value": ("code", lambda c: torch.where(torch.arange(16) == 11, torch.tensor(0.35), c)),
    "nibbles-swapped": ("weight", lambda p, s: (_swap_nibbles(p), s)),
    "off-by-one-block": ("weight", lambda p, s: (p, _fp32(s).roll(1).contiguous())),
    "absmax-not-applied": ("weight", lambda p, s: (p, torch.ones_like(_fp32(s)))),
    "double-quant-code-shifted": ("weight", lambda p, s: (p, _nested_code2_shifted(s))),
}


@native
@pytest.mark.parametrize("case", [GEMV_FP32, GEMM_FP16], ids=["gemv-fp32-dq", "gemm-fp16-bias"])
@pytest.mark.parametrize("bug", sorted(NATIVE_BUGS))
def test_planted_native_bug_is_caught(bug, case, isa, monkeypatch):
    kind, corrupt = NATIVE_BUGS[bug]
    if kind == "code":
        wrong = corrupt(nf4_native.nf4_table("cpu").clone())
        monkeypatch.setattr(nf4_native, "nf4_table", lambda device: wrong)
    else:
        real = nf4_native._weight
        monkeypatch.setattr(nf4_native, "_weight",
                            lambda p, s: (lambda t: (*corrupt(t[0], t[1]), *t[2:]))(real(p, s)))
    calls = native_path_calls(monkeypatch)
    verdict = check_parity(SUITE, FUSED, REF, case, "cpu", trials=1)
    assert calls, "the native kernels did not run"
    assert not verdict.ok, f"{bug} passed: {[(n, c.error, c.bound) for n, c in verdict.checks.items()]}"


@few_rows_native
@pytest.mark.parametrize("case", [GEMV_FP32, GEMM_FP16], ids=["gemv-fp32-dq", "gemm-fp16-bias"])
def test_native_path_passes_over_seeds(case, monkeypatch):
    calls = native_path_calls(monkeypatch)
    for seed in (101, 202, 303):
        verdict = check_parity(SUITE, FUSED, REF, case, "cpu", trials=1, seed=seed)
        assert verdict.ok, (seed, verdict.problems, {n: (c.error, c.bound) for n, c in verdict.checks.items()})
        assert verdict.metrics["nf4_kernels"] == f"native-{nf4_native.isa()}"
    # the few-rows path with LoRA: the compiled op, one whole-call kernel per direction
    assert set(calls) == ({"lora_op", "lora_op backward"} if case["batch"] <= nf4_kernels.GEMV_MAX_ROWS
                          else {"dequantize"})


def test_fallback_without_native_kernels_is_correct(monkeypatch):
    """With the native kernels unavailable, fused_cpu runs the fallback path, says so, and passes."""
    monkeypatch.setattr(nf4_native, "_load", lambda: (None, "turned off by the test"))
    assert nf4_native.status() == (False, "turned off by the test")
    for case in (GEMV_FP32, GEMM_FP16):
        for seed in (101, 202):
            verdict = check_parity(SUITE, FUSED, REF, case, "cpu", trials=1, seed=seed)
            assert verdict.ok, (case.id, seed, verdict.problems)
            assert verdict.metrics["nf4_kernels"] == "fallback (turned off by the test)"


@native
def test_record_says_when_few_rows_take_the_composed_route(monkeypatch):
    """Native kernels without the compiled few-rows op (no C++ compiler, say): the few-rows case passes on the
    composed route and its record says so, with the reason (a vendor's report must not read as if the op ran)."""
    from twinbench.impls.kernels import nf4_op
    from twinbench.impls.quant_linear import fused

    monkeypatch.setattr(nf4_op, "status", lambda: (False, "no C++ compiler (the test)"))
    monkeypatch.setattr(nf4_op, "loaded", lambda: None)
    monkeypatch.setattr(fused, "_NATIVE_PATHS", {})
    calls = native_path_calls(monkeypatch)
    verdict = check_parity(SUITE, FUSED, REF, GEMV_FP32, "cpu", trials=1, seed=101)
    assert verdict.ok, verdict.problems
    assert verdict.metrics["nf4_kernels"] == f"native-{nf4_native.isa()}; few rows composed (no C++ compiler (the test))"
    assert "lora_op" not in calls and {"gemv", "gemv_t"} <= set(calls)


def test_turned_off_by_environment(monkeypatch):
    before = nf4_native.status()
    monkeypatch.setenv("TWINBENCH_NF4_NATIVE", "0")
    assert nf4_native.status() == (False, "turned off by TWINBENCH_NF4_NATIVE=0")
    monkeypatch.delenv("TWINBENCH_NF4_NATIVE")
    assert nf4_native.status() == before


@pytest.mark.parametrize("flags,wanted,want", [
    ({"avx512f", "avx512bw", "avx512vl", "avx2", "fma", "f16c"}, "", "avx512"),
    ({"avx2", "fma", "f16c"}, "", "avx2"),  # most CI machines, many AMD/Intel server parts
    ({"avx", "sse4_2"}, "", None),
    ({"avx512f", "avx512bw", "avx512vl", "avx2", "fma", "f16c"}, "avx2", "avx2"),
    ({"avx2", "fma", "f16c"}, "avx512", None),  # forced but impossible: refused, with the reason
    ({"fp", "asimd", "evtstrm"}, "", "neon"),  # aarch64 /proc/cpuinfo Features
    ({"avx2", "fma", "f16c"}, "neon", None),
])
def test_isa_is_chosen_by_cpu_flags(flags, wanted, want, monkeypatch):
    monkeypatch.setattr(nf4_native, "cpu_flags", lambda: flags)
    nf4_native._choose_isa.cache_clear()
    monkeypatch.setenv("TWINBENCH_NF4_ISA", wanted)
    try:
        got, why = nf4_native.chosen_isa()
        assert got == want and (why == "") == (want is not None), why
    finally:
        nf4_native._choose_isa.cache_clear()


def test_aarch64_features_are_read_as_cpu_flags(monkeypatch):
    """aarch64's /proc/cpuinfo lists its flags as ``Features`` (x86: ``flags``): Advanced SIMD (``asimd``) picks
    the NEON layer there; an x86 CPU's flags never do."""
    nf4_native._choose_isa.cache_clear()
    try:
        monkeypatch.setattr(availability, "cpu_info", lambda: {"processor": "0", "Features": "fp asimd evtstrm"})
        assert "asimd" in availability.cpu_flags() and nf4_native._choose_isa("") == ("neon", "")
        nf4_native._choose_isa.cache_clear()
        monkeypatch.setattr(availability, "cpu_info", lambda: {"processor": "0", "flags": "sse4_2 avx avx2 fma f16c"})
        assert nf4_native._choose_isa("") == ("avx2", "")
    finally:
        nf4_native._choose_isa.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gemm_path_matches_matmul(dtype, monkeypatch):
    """The GEMM path's oneDNN linear (where chosen) computes a @ w.t() and a @ w like torch's matmul."""
    gen = torch.Generator().manual_seed(3)
    a, w = torch.randn(37, 96, generator=gen).to(dtype), torch.randn(80, 96, generator=gen).to(dtype)
    g = torch.randn(37, 80, generator=gen).to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(nf4_kernels.gemm_nt(a, w).float(), a.float() @ w.float().t(), atol=tol, rtol=tol)
    torch.testing.assert_close(nf4_kernels.gemm_nn(g, w).float(), g.float() @ w.float(), atol=tol, rtol=tol)
    monkeypatch.setenv("TWINBENCH_NF4_GEMM", "aten")
    nf4_kernels._onednn_linear.cache_clear()
    try:
        assert nf4_kernels._onednn_linear(dtype) is None
    finally:
        monkeypatch.delenv("TWINBENCH_NF4_GEMM")
        nf4_kernels._onednn_linear.cache_clear()


def test_compiled_fallback_is_correct(monkeypatch):
    """The torch.compile'd (inductor) GEMV kernels, which serve large weights where the native ones cannot
    run, forced onto a small weight: one compile per kernel (~8 s warm, ~16 s with a cold inductor cache)."""
    monkeypatch.setattr(nf4_native, "_load", lambda: (None, "turned off by the test"))
    monkeypatch.setattr(nf4_kernels, "COMPILE_MIN_ELEMENTS", 0)
    monkeypatch.delenv("TWINBENCH_NF4_EAGER", raising=False)
    compiled, real = [], nf4_kernels._compiled
    monkeypatch.setattr(nf4_kernels, "_compiled", lambda name: compiled.append(name) or real(name))
    verdict = check_parity(SUITE, FUSED, REF, GEMV_FP32, "cpu", trials=1, seed=5)
    assert verdict.ok, (verdict.problems, {n: (c.error, c.bound) for n, c in verdict.checks.items()})
    assert {"gemv", "gemv_t"} <= set(compiled)  # the compiled kernels really ran


@native
@pytest.mark.parametrize("threads", [2, 3])
def test_thread_split_gives_identical_results(threads, isa, monkeypatch):
    """Rows (forward), fixed row slabs reduced in a fixed order (backward) and whole blocks of columns
    (dequantise) split across threads: every output element is summed in the same order, so the results are
    bitwise those of one thread (97 rows, 4 blocks of 128: uneven splits)."""
    _, _, packed2d, scales = state(97, 512, 128, True, seed=9)
    gen = torch.Generator().manual_seed(9)
    x, g = torch.randn(3, 512, generator=gen), torch.randn(3, 97, generator=gen)

    def run():
        return (nf4_native.gemv(x, packed2d, scales), nf4_native.gemv_t(g, packed2d, scales),
                nf4_native.dequantize(packed2d, scales, torch.bfloat16))

    one = run()  # 24 KB of weight: one thread by default
    before = torch.get_num_threads()
    monkeypatch.setattr(nf4_native, "BYTES_PER_THREAD", 1)
    torch.set_num_threads(threads)
    try:
        assert nf4_native.threads_for(packed2d) == threads
        for a, b in zip(one, run()):
            assert torch.equal(a, b)
    finally:
        torch.set_num_threads(before)


def _backward_differs_across_thread_counts() -> list[str]:
    """The backward's results (gemv_t's dx; lora_gemv_t's dx, dA, dB) at 2 and 3 threads against 1 thread, bitwise,
    for 1-4 rows of g on weights whose rows split unevenly into slabs and over threads (97 and 203 rows; 416
    columns at blocksize 32: a scalar tail after the vector groups; 20 rows: 2 slabs, fewer than 3 threads, which
    then split the slabs' columns): the cases that differ."""
    differ = []
    for n, k, blocksize in ((97, 512, 64), (203, 416, 32), (20, 1024, 64)):
        for rows in (1, 2, 3, 4):
            packed2d, scales, _, x, a, b, _, g = _whole_call_case(n, k, blocksize, True, rows, 5, n + rows)
            xa = torch.randn(rows, 5, generator=torch.Generator().manual_seed(rows))

            def run():
                return (nf4_native.gemv_t(g, packed2d, scales),  # noqa: B023 (called in this iteration)
                        *nf4_native.lora_gemv_t(g, packed2d, scales, a, b, xa, 2.0, x))  # noqa: B023

            before, per_thread = torch.get_num_threads(), nf4_native.BYTES_PER_THREAD
            try:
                torch.set_num_threads(1)
                one = run()
                nf4_native.BYTES_PER_THREAD = 1  # small weights too get every thread
                for threads in (2, 3):
                    torch.set_num_threads(threads)
                    assert nf4_native.threads_for(packed2d) == threads
                    if not all(torch.equal(p, q) for p, q in zip(one, run())):
                        differ.append(f"{n}x{k} bs {blocksize}, {rows} rows, {threads} threads")
            finally:
                torch.set_num_threads(before)
                nf4_native.BYTES_PER_THREAD = per_thread
    return differ


@native
def test_backward_is_bitwise_the_same_at_1_2_and_3_threads(isa, tmp_path):
    """dx = g W is summed in row slabs whose partials are added in a fixed order (nf4_native.c, gemv_t_call): the
    slabs must be set by the weight's shape, never by the thread count. Planted: one slab per thread (the natural
    way to split rows), built from a copy of the source, must be caught."""
    assert _backward_differs_across_thread_counts() == []
    source = nf4_native.SOURCE.read_text()
    real = "const slabs_t slabs = bwd_slabs(N);"
    assert source.count(real) == 1
    with rebuilt_kernels(tmp_path, source.replace(real, "const slabs_t slabs = {(N + threads - 1) / threads, threads};")):
        assert len(_backward_differs_across_thread_counts()) >= 8


@native
def test_first_touch_copy_is_the_same_weight(monkeypatch):
    """place(): each thread's share of 32-row chunks written by the thread that reads it in the GEMV (when none
    steals); same bytes, same results."""
    _, _, packed2d, scales = state(97, 256, 64, False, seed=4)
    monkeypatch.setattr(nf4_native, "BYTES_PER_THREAD", 1)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        placed = nf4_native.place(packed2d)
        assert placed.data_ptr() != packed2d.data_ptr() and torch.equal(placed, packed2d)
        x = torch.randn(2, 256)
        assert torch.equal(nf4_native.gemv(x, placed, scales), nf4_native.gemv(x, packed2d, scales))
    finally:
        torch.set_num_threads(before)


# Panels the GEMM path's tiling asks for: row bands (forward), column ranges of every row (backward), both
# cut mid-block and at the weight's edges, and one 2-D tile.
PANELS = [((0, 97), (0, 512)), ((5, 40), (0, 512)), ((0, 97), (32, 96)), ((0, 97), (448, 512)),
          ((96, 97), (0, 32)), ((13, 71), (192, 416)), ((50, 50), (0, 512))]


def _panels_match(panel_fn, packed2d, scales, dtype) -> bool:
    """Every panel in PANELS, written by panel_fn into a strided view of a NaN-filled wider buffer, equals
    the whole dequantisation's slice, and nothing outside the view is written."""
    whole = nf4_native.dequantize(packed2d, scales, dtype)
    for (r0, r1), (c0, c1) in PANELS:
        buf = torch.full((r1 - r0, 600), float("nan"), dtype=dtype)
        view = buf[:, 40:40 + c1 - c0]
        panel_fn(packed2d, scales, dtype, (r0, r1), (c0, c1), view)
        if not torch.equal(view, whole[r0:r1, c0:c1]) or not buf[:, :40].isnan().all() \
                or not buf[:, 40 + c1 - c0:].isnan().all():
            return False
    return True


@pytest.mark.parametrize("blocksize,double_quant", [(32, False), (64, True), (256, False)])
def test_dequantize_panel_is_the_whole_dequantisations_slice(blocksize, double_quant, isa):
    """dequantize_panel (rows x 32-aligned columns, strided out) is bit-identical to slicing dequantize, for
    every output dtype and both bf16 narrowings; a test-local panel off by one block (the column range read
    one block late: what an off-by-one in the scale or byte offset gives) is caught by the same check."""
    _, _, packed2d, scales = state(97, 512, blocksize, double_quant, seed=5)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for fast in (True, False):
            def panel(p, s, d, rows, cols, out, fast=fast):
                return nf4_native.dequantize_panel(p, s, d, rows, cols, out, fast_bf16=fast)
            assert _panels_match(panel, packed2d, scales, dtype), (dtype, fast)

    def one_block_late(p, s, d, rows, cols, out):
        (r0, r1), (c0, c1) = rows, cols  # columns c + bs (wrapping at the row's end)
        out.copy_(nf4_native.dequantize(p, s, d).roll(-blocksize, dims=1)[r0:r1, c0:c1])

    assert not _panels_match(one_block_late, packed2d, scales, torch.float32)
    with pytest.raises(ValueError):
        nf4_native.dequantize_panel(packed2d, scales, torch.float32, (0, 4), (16, 48), torch.empty(4, 32))
    with pytest.raises(ValueError):
        nf4_native.dequantize_panel(packed2d, scales, torch.float32, (0, 98), (0, 32), torch.empty(98, 32))


@native
def test_fast_bf16_narrowing_is_bit_identical_at_the_edges():
    """The AVX512-BF16 narrowing treats denormal inputs as zero: chunks whose scale could make a denormal
    product (tiny, zero, negative, huge, inf) must take the portable narrowing, so both give the same bits."""
    gen = torch.Generator().manual_seed(6)
    n, k, bs = 64, 256, 64
    packed2d = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    scales = torch.randn(n * k // bs, generator=gen)
    edge = torch.tensor([1e-38, -1e-38, 1e-40, 1.4e-37, 1.5e-37, 2e-37, -3e-37, 0.0, -0.0, 3e38, float("inf")])
    scales[: edge.numel()] = edge
    scales[edge.numel()::5] *= 1e-36
    scales = scales.reshape(n, k // bs)
    fast = nf4_native.dequantize_panel(packed2d, scales, torch.bfloat16, (0, n), (0, k),
                                       torch.empty(n, k, dtype=torch.bfloat16), fast_bf16=True)
    slow = nf4_native.dequantize_panel(packed2d, scales, torch.bfloat16, (0, n), (0, k),
                                       torch.empty(n, k, dtype=torch.bfloat16), fast_bf16=False)
    assert torch.equal(fast.view(torch.int16), slow.view(torch.int16))
    assert torch.equal(slow.view(torch.int16), nf4_native.dequantize(packed2d, scales, torch.bfloat16).view(torch.int16))


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_panels_equal_the_whole_weights_gemm(dtype, monkeypatch):
    """The GEMM path's panel tiling (rows forward, columns backward, a last panel cut short) computes x W^T
    and g W like one GEMM on the whole dequantised W, and nf4_mm / nf4_mm_t take it where GEMM_PANELS asks (Intel
    CPUs; not with TWINBENCH_NF4_PANELS=0)."""
    gen = torch.Generator().manual_seed(7)
    n, k, bs = 160, 320, 64
    packed2d = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    scales = torch.rand(n, k // bs, generator=gen)
    x, g = torch.randn(9, k, generator=gen).to(dtype), torch.randn(9, n, generator=gen).to(dtype)
    w = nf4_native.dequantize(packed2d, scales, dtype)
    monkeypatch.setattr(nf4_kernels._scratch, "panels", {}, raising=False)  # this test's buffers only
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}
    for panel in (32, 64, 96, 4096):
        torch.testing.assert_close(nf4_kernels.mm_panels(x, packed2d, scales, panel), x @ w.t(), **tol)
        torch.testing.assert_close(nf4_kernels.mm_t_panels(g, packed2d, scales, panel), g @ w, **tol)
    # a panel larger than the weight: the buffer is the weight's size, not the panel's
    assert nf4_kernels.panel_workspace(1, 1, dtype).numel() <= n * k
    calls = []
    monkeypatch.setattr(nf4_kernels, "mm_panels", lambda *a: calls.append("fwd") or x @ w.t())
    monkeypatch.setattr(nf4_kernels, "mm_t_panels", lambda *a: calls.append("bwd") or g @ w)
    monkeypatch.setattr(nf4_kernels, "cpu_vendor", lambda: "GenuineIntel")
    # the product's rules: bf16 panels, fp32 the whole W (streamed past the caches)
    assert (nf4_kernels._gemm_panel(packed2d, scales, dtype, k) is None) == (dtype == torch.float32)
    monkeypatch.setattr(nf4_kernels, "GEMM_PANELS", {dtype: 64 * k * dtype.itemsize})
    monkeypatch.setattr(nf4_kernels, "cpu_vendor", lambda: "AuthenticAMD")  # sizes measured on Intel only
    assert nf4_kernels._gemm_panel(packed2d, scales, dtype, k) is None
    monkeypatch.setattr(nf4_kernels, "cpu_vendor", lambda: "GenuineIntel")
    assert nf4_kernels._gemm_panel(packed2d, scales, dtype, k) == 64
    nf4_kernels.nf4_mm(x, packed2d, scales), nf4_kernels.nf4_mm_t(g, packed2d, scales)
    assert calls == ["fwd", "bwd"]
    monkeypatch.setenv("TWINBENCH_NF4_PANELS", "0")
    nf4_kernels.nf4_mm(x, packed2d, scales), nf4_kernels.nf4_mm_t(g, packed2d, scales)
    assert calls == ["fwd", "bwd"]


@few_rows_native
def test_few_rows_compute_in_fp32_and_round_once(monkeypatch):
    """The few-row path computes in fp32 (GEMV, LoRA products, bias, gradients) and rounds once to x's dtype:
    its bf16 output and gradients are bitwise the fp32 computation's on the same inputs, rounded, on both routes
    (the whole-call kernels, and torch's products around the GEMV kernels where those do not apply: rank over
    nf4_native.MAX_RANK). Planted: the old behaviour (LoRA products in bf16) is told apart."""
    from twinbench.impls.quant_linear import fused

    _, w, _, _ = state(256, 512, 64, True, seed=3)
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randn(*s, generator=gen).to(torch.bfloat16) for s in ((2, 512), (16, 512), (256, 16), (256,))]
    g = torch.randn(2, 256, generator=gen).to(torch.bfloat16)

    def run(dtype):
        leaves = [t.to(dtype).requires_grad_() for t in inputs]
        out = fused.nf4_lora_linear(leaves[0], w, leaves[1], leaves[2], 2.0, leaves[3])
        return [t.to(torch.bfloat16) for t in (out, *torch.autograd.grad(out, leaves, g.to(dtype)))]

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b))

    calls = native_path_calls(monkeypatch)
    assert same(run(torch.bfloat16), run(torch.float32))
    assert set(calls) == {"lora_op", "lora_op backward"}
    monkeypatch.setattr(nf4_native, "MAX_RANK", 8)  # rank 16: torch's LoRA products around the GEMV kernels
    calls.clear()
    want = run(torch.float32)
    assert same(run(torch.bfloat16), want)
    assert set(calls) == {"gemv", "gemv_t"}
    monkeypatch.setattr(fused, "_compute_dtype", lambda x, few_rows: x.dtype)
    assert not same(run(torch.bfloat16), want)


def _scale_decode_mismatches() -> list[str]:
    """The GEMV kernels on double-quantised scales against the same kernels on those scales decoded one by one
    (fp32), bitwise: 1 and 3 rows of x and g, 74 and 150 blocks per row (a whole 64-block chunk or two and a
    partial one; 33 rows start at many offsets within a 256-block absmax2 group, so vectors cross its edges)."""
    bad = []
    gen = torch.Generator().manual_seed(11)
    for n, blocks in ((33, 74), (17, 150)):
        k = 64 * blocks
        packed2d = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
        q = torch.randint(0, 256, (n, blocks), dtype=torch.uint8, generator=gen)
        nested = nf4_native.NestedScales(q, torch.rand(-(-q.numel() // 256), generator=gen) + 0.5,
                                         torch.linspace(-1, 1, 256) ** 3, 0.0123)
        flat = nested.decoded()
        for rows in (1, 3):
            x, g = torch.randn(rows, k, generator=gen), torch.randn(rows, n, generator=gen)
            if not torch.equal(nf4_native.gemv(x, packed2d, nested), nf4_native.gemv(x, packed2d, flat)):
                bad.append(f"forward {rows} rows, {blocks} blocks")
            if not torch.equal(nf4_native.gemv_t(g, packed2d, nested), nf4_native.gemv_t(g, packed2d, flat)):
                bad.append(f"backward {rows} rows, {blocks} blocks")
    return bad


@native
@pytest.mark.parametrize("lookup", ["default", "gather"])
def test_kernels_decode_double_quant_scales_bit_exactly(isa, lookup, tmp_path):
    """The GEMV kernels decode the double-quantised absmax a vector at a time: code2[q] by AVX512-VBMI byte
    permutes where the CPU has them, else a gather (``gather``: the build without the VBMI path, what AVX-512
    CPUs without VBMI run), then * absmax2 + offset, with per-lane absmax2 where a vector crosses a 256-block
    edge. The results must be bitwise those on the fp32 scales decoded one by one. Planted: one scale 0.1% off
    is seen."""
    with rebuilt_kernels(tmp_path, flags=("-DNF4_CODE2_VBMI=0",) if lookup == "gather" else ()):
        assert _scale_decode_mismatches() == []
        gen = torch.Generator().manual_seed(12)
        packed2d = torch.randint(0, 256, (33, 64 * 37), dtype=torch.uint8, generator=gen)
        flat = torch.rand(33, 74, generator=gen) + 0.5
        x = torch.randn(3, 64 * 74, generator=gen)
        off = flat.clone()
        off[20, 70] *= 1.001
        assert not torch.equal(nf4_native.gemv(x, packed2d, off)[:, 20], nf4_native.gemv(x, packed2d, flat)[:, 20])


@native
@pytest.mark.parametrize("bug", ["upper half from the lower tables", "no absmax2 edge", "natural input order"])
def test_planted_scale_decode_bugs_are_caught(bug, tmp_path):
    """The VBMI decode path (AVX-512 build, CPUs with VBMI) with one of its steps broken, built from a copy of the
    source, must fail the bitwise comparison above: proof that the comparison runs that path."""
    if "avx512vbmi" not in availability.cpu_flags() or nf4_native.isa() != "avx512":
        pytest.skip("the VBMI scale decode runs only in the AVX-512 build on a CPU with AVX512-VBMI")
    source = nf4_native.SOURCE.read_text()
    edits = {
        "upper half from the lower tables": ("_mm512_permutex2var_epi8(t->plane[k][2], idx, t->plane[k][3])",
                                             "_mm512_permutex2var_epi8(t->plane[k][0], idx, t->plane[k][1])"),
        "no absmax2 edge": ("if ((i & 255) + lanes > 256) /* its blocks cross", "if (0) /* its blocks cross"),
        "natural input order": ("_mm512_permutexvar_epi8(t->order, _mm512_maskz_loadu_epi8(",
                                "(_mm512_maskz_loadu_epi8("),
    }
    real, planted = edits[bug]
    assert source.count(real) == 1
    with rebuilt_kernels(tmp_path, source.replace(real, planted)):
        assert _scale_decode_mismatches() != []


@native
def test_every_call_rechecks_its_tensors():
    """The few-rows wrappers cache no verdict about their arguments (docs/quant_linear.md, "GEMV kernel": the
    per-call cost): after a good call, a tensor planted in the same place with the same shape but a layout or
    device C cannot read is refused before any pointer reaches C."""
    _, w, packed2d, _ = state(32, 128, 64, True)
    nested = nf4_native.NestedScales(w.absmax.reshape(32, 2), w.absmax2, w.code2, float(w.offset))
    assert nested.checked() is nested  # already in the kernels' form: no new object per call
    x = torch.randn(2, 128)
    want = nf4_native.gemv(x, packed2d, nested)
    strided = torch.empty(64, 32, dtype=torch.uint8).t()  # [32, 64] like packed2d, rows 1 byte apart
    strided.copy_(packed2d)
    with pytest.raises(ValueError, match="packed: need a contiguous"):
        nf4_native.gemv(x, strided, nested)
    q_strided = torch.empty(2, 32, dtype=torch.uint8).t()
    q_strided.copy_(nested.q)
    with pytest.raises(ValueError, match="absmax: need a contiguous"):
        nf4_native.gemv_t(torch.randn(1, 32), packed2d, nf4_native.NestedScales(q_strided, *astuple(nested)[1:]))
    with pytest.raises(ValueError, match="x must be on the CPU"):
        nf4_native.gemv(x.to("meta"), packed2d, nested)
    with pytest.raises(ValueError, match="g must be on the CPU"):
        nf4_native.gemv_t(torch.randn(1, 32, device="meta"), packed2d, nested)
    with pytest.raises(ValueError, match="packed must be"):
        nf4_native.gemv(x, packed2d.reshape(32, 2, 32), nested)
    fp64 = nf4_native.NestedScales(nested.q, nested.absmax2.double(), nested.code2.double(), nested.offset)
    assert torch.equal(nf4_native.gemv(x, packed2d, fp64), want)  # converted per call, as before


def astuple(scales: nf4_native.NestedScales) -> tuple:
    return scales.q, scales.absmax2, scales.code2, scales.offset


@native
def test_kernel_path_cache_follows_the_build_and_the_layout(monkeypatch):
    """The suite impl's record says which kernels ran, cached per (build, weight layout): switching the build
    through the environment or giving a layout the kernels refuse is seen at once (planted: a cache keyed on
    the shape alone would repeat the first answer)."""
    from twinbench.impls.quant_linear import fused

    _, w, _, _ = state(32, 128, 64, True)
    first = fused._kernel_path(w)
    assert first == f"native-{nf4_native.isa()}" and fused._kernel_path(w) == first
    monkeypatch.setenv("TWINBENCH_NF4_NATIVE", "0")
    assert fused._kernel_path(w) == "fallback (turned off by TWINBENCH_NF4_NATIVE=0)"
    monkeypatch.delenv("TWINBENCH_NF4_NATIVE")
    flat_blocks16 = NF4Weight(w.packed, w.block_scales().repeat_interleave(4), (32, 128), 16)
    assert fused._kernel_path(flat_blocks16).startswith("fallback (not a contiguous CPU weight")
    if all(f in availability.cpu_flags() for f in nf4_native.ISA_FLAGS["avx2"][1]):
        monkeypatch.setenv("TWINBENCH_NF4_ISA", "avx2")
        assert fused._kernel_path(w) == "native-avx2"


def test_one_thread_restores_the_thread_count():
    """The few-rows LoRA products run on one thread and torch's count comes back afterwards, also on an error."""
    from twinbench.impls.quant_linear import fused

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with fused._one_thread(True):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), fused._one_thread(True):
            raise RuntimeError
        assert torch.get_num_threads() == 2
        with fused._one_thread(False):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


_GUARD_CHILD = r"""
import ctypes, mmap, sys, torch
from twinbench.impls.kernels import nf4_native
from twinbench.reference.nf4 import quantize_nf4
from twinbench.impls.kernels.nf4_weight import NF4Weight

libc = ctypes.CDLL(None, use_errno=True)
guards = []


def guarded(t: torch.Tensor) -> torch.Tensor:  # a copy of t whose last byte sits right before an unreadable page
    size, page = t.numel() * t.element_size(), mmap.PAGESIZE
    total = (size + page - 1) // page * page + page
    buf = mmap.mmap(-1, total)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert libc.mprotect(ctypes.c_void_p(base + total - page), ctypes.c_size_t(page), 0) == 0  # PROT_NONE
    guards.append(base + total - page)
    out = torch.frombuffer(buf, dtype=t.dtype, count=t.numel(), offset=total - page - size)
    return out.copy_(t.reshape(-1)).view(t.shape)


assert nf4_native.isa() == sys.argv[1]
# 37 rows: the last register blocks of both directions are partial; 32 rows of 8 blocks: 256 blocks, one absmax2
# entry, and the last row's 8 scales end where a 16-lane vector from block 248 would reach into a second one
for n in (37, 32):
    k, bs = 512, 64
    st = quantize_nf4(torch.randn(n, k, generator=torch.Generator().manual_seed(5)) / k**0.5, bs, True)
    fp32 = NF4Weight(st.packed, st.absmax, (n, k), bs, st.absmax2, st.code2, st.offset).block_scales()
    nested = nf4_native.NestedScales(guarded(st.absmax.reshape(n, k // bs)), guarded(st.absmax2), st.code2,
                                     float(st.offset))
    packed2d = guarded(st.packed.reshape(n, k // 2))
    for scales in (fp32, nested):
        for m in (1, 2, 3, 4):
            g = torch.randn(m, n)
            nf4_native.gemv(torch.randn(m, k), packed2d, scales), nf4_native.gemv_t(g, packed2d, scales)
            nf4_native.gemv(torch.randn(m, k).bfloat16(), packed2d, scales)
print("kernels ok", flush=True)
if sys.argv[2] == "planted":
    ctypes.string_at(guards[-1], 1)  # one byte past the weight: must crash
print("guard missed", flush=True)
"""


@native
def test_kernels_read_nothing_past_the_weight(tmp_path):
    """The offset loads (nf4_native.c) read up to 3 bytes past a group, so the array's last row must not take them;
    the double-quantised scales are decoded 16 or 64 blocks at a time, so their last vector must not read past
    the absmax bytes or the absmax2 entries. In a child process (a crash must fail the test, not the run), the
    packed weight, the absmax bytes and absmax2 each end where an unreadable page begins; the forward (fp32 and
    bf16 x) and backward for 1-4 rows of x, fp32 and double-quantised scales, each vector layer, must not fault.
    Planted: reading one byte past the weight must kill the child (the guard page works)."""
    import os
    import signal
    import subprocess
    import sys

    have = availability.cpu_flags()
    for isa_name, (_, needs) in nf4_native.ISA_FLAGS.items():
        if not all(f in have for f in needs):
            continue
        env = {**os.environ, "TWINBENCH_NF4_ISA": isa_name}
        run = subprocess.run([sys.executable, "-c", _GUARD_CHILD, isa_name, "planted"], env=env,
                             capture_output=True, text=True, timeout=120)
        assert "kernels ok" in run.stdout, (isa_name, run.returncode, run.stderr[-2000:])
        assert run.returncode == -signal.SIGSEGV and "guard missed" not in run.stdout, (isa_name, run.returncode)


@native
@pytest.mark.parametrize("rows,k,blocksize", [(1, 512, 64), (4, 512, 64), (3, 96, 32)])
def test_bf16_x_is_widened_exactly(rows, k, blocksize, isa):
    """bf16 x is put into group order by dword gathers, each serving two columns (its high half widened by a
    mask, its low half by a shift): the forward on bf16 x is bitwise the forward on the same values in fp32
    (K = 96 at blocksize 32 leaves a scalar tail). Planted: the two halves of every pair swapped (x's
    adjacent columns exchanged) is seen."""
    _, _, packed2d, scales = state(37, k, blocksize, True, seed=rows)
    gen = torch.Generator().manual_seed(k + rows)
    x16 = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
    got = nf4_native.gemv(x16, packed2d, scales)
    assert torch.equal(got, nf4_native.gemv(x16.float(), packed2d, scales))
    swapped = x16.reshape(rows, k // 2, 2).flip(-1).reshape(rows, k).contiguous()
    assert not torch.equal(nf4_native.gemv(swapped, packed2d, scales), got)
