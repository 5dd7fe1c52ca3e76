"""Every Triton kernel compiles ahead of time for real GPU targets (sm80, sm90, sm100, gfx942, gfx1201) on this
CPU: shared memory within the target's limit and no TF32/XF32 instruction in an fp32 build. The CI subset is
one fp32 build per kernel with its largest tiles; ``nox -s aot`` compiles every variant (tests/aot_variants.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

import aot_variants  # noqa: E402  (tests/ is on the path)
from twinbench.impls.kernels import aot  # noqa: E402


@pytest.fixture(scope="module")
def ci_reports() -> list[dict]:
    return aot_variants.compile_in_processes(aot.CI_TARGETS, "ci")


def test_every_kernel_is_in_the_ci_subset():
    kernels, subset = aot_variants.in_fresh_process(aot_variants.kernel_names)
    assert subset == kernels
    assert {"fa_fwd", "fa_bwd_dkdv", "fa_bwd_dq", "moe_rows_gemm", "gating_topk_softmax", "nf4_gemm_fwd",
            "nf4_gemv_bwd"} <= kernels


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
