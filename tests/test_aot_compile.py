"""Every Triton kernel compiles ahead of time for real GPU targets (sm80, sm90, sm100, gfx942, gfx1201) on this
CPU: shared memory within the target's limit and no TF32/XF32 instruction in an fp32 build. The CI subset is
one fp32 build per kernel with its largest tiles; ``nox -s aot`` compiles every variant (tests/aot_variants.py)."""

from __future__ import annotations

import itertools

import pytest

pytest.importorskip("triton")

import aot_variants  # noqa: E402  (tests/ is on the path)
from twinbench.impls.kernels import aot  # noqa: E402


@pytest.fixture(scope="module")
def ci_reports() -> list[dict]:
    return aot_variants.compile_in_processes(aot.CI_TARGETS, "ci")


def test_every_kernel_is_in_the_ci_subset():
    for target, (kernels, subset) in aot_variants.in_fresh_process(aot_variants.kernel_names,
                                                                   aot.CI_TARGETS).items():
        assert subset == kernels, target
        assert {"fa_fwd", "fa_bwd_dkdv", "fa_bwd_dq", "moe_rows_gemm", "gating_topk_softmax", "nf4_gemm_fwd",
                "nf4_gemv_bwd"} <= kernels


def test_fa_pruning_follows_each_targets_limits():
    """The FA autotuner keeps per target what fits its shared memory (the AOT sweep compiles exactly these)."""
    from twinbench.impls.attention import triton_fa_kernels as fa

    counts = aot_variants.kept_counts()
    assert counts["sm90"]["fp16 D128"] == {"fwd": 27, "dkdv": 23, "dq": 27, "before": 12}
    sm90 = aot_variants.fa_limits(aot.TARGETS["sm90"])
    fwd = fa.keep_configs(fa.gpu_configs(), "fwd", 128, 2, sm90)
    assert any(c.num_stages == 3 and c.kwargs["BLOCK_M"] == 128 for c in fwd)  # the fast H100 configs stay
    assert any(c.num_stages == 3 for c in fa.keep_configs(fa.gpu_configs(), "dkdv", 128, 2, sm90))
    # fp32 head_dim 256: no dK/dV tile fits a consumer card's 99 KiB; triton_fa declines such cases there
    sm89 = aot_variants.fa_limits(aot.TARGETS["sm89"])
    assert counts["sm89"]["fp32 D256"]["dkdv"] == 0
    ok, why = fa.fits_somewhere(256, 4, sm89)
    assert not ok and "99 KiB" in why
    assert fa.fits_somewhere(256, 4, aot_variants.fa_limits(aot.TARGETS["sm80"]))[0]
    # NVIDIA fp32 (FMA dots): no tile above 8 score elements per thread (larger builds spill KBs of stack)
    fp32 = fa.keep_configs(fa.gpu_configs(), "fwd", 64, 4, sm90)
    assert fp32 and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 8 * 32 * c.num_warps for c in fp32)
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in fp32} == {(64, 32, 8), (32, 32, 4)}
    dkdv = fa.keep_configs(fa.gpu_configs(), "dkdv", 64, 4, sm90)  # dK/dV holds more per thread: 32x32 only
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in dkdv} == {(32, 32)}
    # RDNA: fp32 tiles at head_dim >= 128 spill; only the smallest stays
    rdna = fa.keep_configs(fa.gpu_configs(), "fwd", 128, 4, aot_variants.fa_limits(aot.TARGETS["gfx1201"]))
    assert rdna and {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in rdna} == {(32, 32)}
    assert len(fa.keep_configs(fa.gpu_configs(), "fwd", 128, 4, aot_variants.fa_limits(aot.TARGETS["gfx942"]))) > 3
    for name, target in aot.TARGETS.items():  # everything kept fits by its own estimate
        limits = aot_variants.fa_limits(target)
        for kernel, d, elem in itertools.product(fa.SHARED_ROWS, (64, 128, 256), (2, 4)):
            for c in fa.keep_configs(fa.gpu_configs(), kernel, d, elem, limits):
                estimate = fa.shared_estimate(kernel, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], d, elem, c.num_stages,
                                              limits.amd)
                assert estimate <= target.shared_limit, (name, kernel, d, elem, c)


def test_the_autotuner_prunes_by_the_launching_device(monkeypatch):
    from types import SimpleNamespace

    from twinbench.impls.attention import triton_fa_kernels as fa

    q = SimpleNamespace(element_size=lambda: 4, device="cuda:0")
    monkeypatch.setattr(fa, "device_limits", lambda device: aot_variants.fa_limits(aot.TARGETS["sm89"]))
    notes = []
    monkeypatch.setattr(fa, "note", notes.append)
    kept = fa._pruner("dkdv")(fa.gpu_configs(), {"Q": q}, BLOCK_D=128)
    assert kept == fa.keep_configs(fa.gpu_configs(), "dkdv", 128, 4, aot_variants.fa_limits(aot.TARGETS["sm89"]))
    assert notes and "autotuning" in notes[0]
    kept = fa._pruner("dkdv")(fa.gpu_configs(), {"Q": q}, BLOCK_D=256)  # nothing fits: the smallest, to fail loudly
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages) for c in kept] == [(32, 32, 1)]
    heartbeat = fa._autotune_heartbeat("dkdv")
    heartbeat({"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2})
    heartbeat({}, reset_only=True)  # the autotuner's reset after tuning is no progress
    assert "BLOCK_M=64 BLOCK_N=32 warps=4 stages=2" in notes[-1] and len(notes) == 3


def test_every_kernel_compiles_for_every_target_within_its_limits(ci_reports):
    assert {r["target"] for r in ci_reports} == set(aot.CI_TARGETS)
    print("\n" + aot_variants.table(ci_reports))
    failed = [f"{r['target']} {r['variant']}: {'; '.join(r['problems'])}" for r in ci_reports if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert all(r["registers"] for r in ci_reports)  # recorded for every build


def test_the_checks_catch_planted_kernels():
    reports = {(r["kernel"], r["target"]): r for r in aot_variants.compile_in_processes(["sm90", "gfx942"], "planted")}
    default = reports[("planted_default_precision", "sm90")]  # NVIDIA's default for fp32 tl.dot is tf32
    assert default["compiled"] and default["reduced_precision_instructions"] > 0 and not default["ok"], default
    for target in ("sm90", "gfx942"):
        tf32 = reports[("planted_tf32", target)]
        assert tf32["compiled"] and tf32["reduced_precision_instructions"] > 0 and not tf32["ok"], tf32
        assert reports[("planted_ieee", target)]["ok"], reports[("planted_ieee", target)]["problems"]
    big = reports[("planted_big_tile", "gfx942")]
    assert not big["ok"] and any("shared memory" in p or "compile" in p for p in big["problems"]), big
