"""Our Triton FlashAttention-2 (impls/attention/triton_fa.py) under the CPU interpreter: the interp grid passes
the three-way parity rule for out/dq/dk/dv, wrong copies of the kernels are caught, edge rows and LSE are right."""

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from twinbench.harness.core import registry
from twinbench.harness.core.case import Case
from twinbench.harness.core.devices import Device
from twinbench.harness.core.parity import check_parity
from twinbench.harness.core.registry import IMPLS, SUITES, load_plugins, register_impl
from twinbench.reference.attention import attention

triton = pytest.importorskip("triton")
load_plugins()

from twinbench.impls.attention import triton_fa as fa  # noqa: E402
from twinbench.impls.attention import triton_fa_kernels as kernels  # noqa: E402
from twinbench.impls.kernels import availability  # noqa: E402

SUITE = SUITES["attention"]
IMPL = IMPLS[("attention", "triton_fa")]
REF = IMPLS[("attention", "reference")]
CPU = Device(name="cpu", backend="cpu", torch_device="cpu", model="test")


def _case(batch, heads, kv_heads, seq_q, seq_k, head_dim, causal, dtype) -> Case:
    return Case.of(batch=batch, heads=heads, kv_heads=kv_heads, seq_q=seq_q, seq_k=seq_k, head_dim=head_dim,
                   causal=causal, dtype=dtype)


INTERP = SUITE.cases("interp")


@pytest.mark.parametrize("index,case", list(enumerate(INTERP)), ids=[c.id for c in INTERP])
def test_interp_grid_passes_three_way_parity(index, case):
    # One trial per case (a different seed each); the grid's breadth gives the many draws, the test below
    # gives one case many seeds. The harness adds the poison, mutation and bitwise-stability checks.
    verdict = check_parity(SUITE, IMPL, REF, case, "cpu", trials=1, seed=1000 + 17 * index)
    failing = {n: f"{c.error:.3g} > {c.bound:.3g} {c.detail}" for n, c in verdict.checks.items() if not c.ok}
    assert verdict.ok, f"problems={verdict.problems} failing={failing}"
    assert set(verdict.checks) == {"out", "grad:q", "grad:k", "grad:v"}
    assert verdict.stable is True
    assert all(0 < c.ratio <= 1 for c in verdict.checks.values())


def test_passes_over_several_seeds():
    case = _case(1, 2, 1, 33, 95, 40, True, "fp32")
    verdict = check_parity(SUITE, IMPL, REF, case, "cpu", trials=5, seed=7)
    assert verdict.ok, verdict.checks
    assert verdict.trials == 5 and verdict.backward_checked


# Planted bugs: wrong copies of the kernels, built here from the kernel file's source with one line changed
# (the production kernels carry no switch for them), registered as plugin impls under a test name.
KERNEL_SOURCE = Path(kernels.__file__).read_text()
MUTATIONS = {  # name: (line fragment in the kernel source, what the wrong copy has instead)
    "causal-boundary": ("return SEQ_K - SEQ_Q", "return SEQ_K - SEQ_Q + 1"),  # every causal bound one key too far
    "key-padding": ("(offs_n[None, :] < SEQ_K)", "(offs_n[None, :] < SEQ_K + 1)"),  # a padding key is real
    "gqa-group-sum": ("for g in range(0, GROUP):", "for g in range(0, 1):"),  # dK/dV from one query head
}
CAUSAL_RECT = _case(1, 4, 2, 33, 70, 40, True, "fp32")   # bottom-right mask with seq_q != seq_k
PADDED_KEYS = _case(1, 2, 1, 20, 45, 24, False, "fp16")  # seq_k not a multiple of the key block


def mutant_kernels(mutation: str, wrong_pass: str, folder: Path) -> ModuleType:
    """A module like triton_fa_kernels whose ``wrong_pass`` ("fwd" or "bwd") runs the mutated kernels; the
    other pass is the production one, so a one-sided bug is seen by its own checks only."""
    original, wrong = MUTATIONS[mutation]
    assert KERNEL_SOURCE.count(original) == 1, f"{original!r} no longer names one place in the kernels"
    path = folder / f"triton_fa_mutant_{mutation.replace('-', '_')}.py"
    path.write_text(KERNEL_SOURCE.replace(original, wrong))  # a real file: triton reads the kernels' source
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # @dataclass looks its module up there while the module executes
    spec.loader.exec_module(module)
    if wrong_pass == "fwd":
        module.backward = kernels.backward
    else:
        module.forward = kernels.forward
    return module


def register_mutant(monkeypatch, name: str, mutant: ModuleType):
    """Register ``mutant`` as an attention impl like triton_fa (same availability, support and tags), in a
    copy of the registry that the test's end restores."""
    monkeypatch.setattr(registry, "IMPLS", dict(registry.IMPLS))

    def wrong_fa(q, k, v, *, causal, scale):
        return fa.flash_attention(q, k, v, causal=causal, scale=scale, kernels=mutant)

    register_impl("attention", name, available=IMPL.available, supports=IMPL.supports, tags=IMPL.tags,
                  deterministic=IMPL.deterministic)(wrong_fa)
    return registry.IMPLS[("attention", name)]


@pytest.mark.parametrize("wrong_pass,mutation,case,caught", [
    ("fwd", "causal-boundary", CAUSAL_RECT, "out"),     # causal boundary one key too far, forward only
    ("bwd", "causal-boundary", CAUSAL_RECT, "grad:q"),  # ... backward only: the output still passes
    ("fwd", "key-padding", PADDED_KEYS, "out"),         # one padding key past seq_k treated as a real key
    ("bwd", "gqa-group-sum", CAUSAL_RECT, "grad:k"),    # dK/dV not summed over the GQA group
], ids=["fwd-causal-boundary", "bwd-causal-boundary", "fwd-key-padding", "bwd-gqa-group-sum"])
def test_planted_kernel_bug_is_caught(monkeypatch, tmp_path, wrong_pass, mutation, case, caught):
    impl = register_mutant(monkeypatch, f"triton_fa-mutant-{wrong_pass}-{mutation}",
                           mutant_kernels(mutation, wrong_pass, tmp_path))
    verdict = check_parity(SUITE, impl, REF, case, "cpu", trials=1, seed=3)
    assert not verdict.ok
    assert not verdict.checks[caught].ok, verdict.checks
    if wrong_pass == "bwd":
        assert verdict.checks["out"].ok, "a backward-only bug must leave the forward output right"
    if mutation == "gqa-group-sum":
        assert verdict.checks["grad:v"].ok is False and verdict.checks["grad:q"].ok


def test_unmutated_copy_passes(monkeypatch, tmp_path):
    """The copy machinery alone (source file, module load, registration) changes nothing: the catches above
    come from the one changed line."""
    monkeypatch.setitem(MUTATIONS, "none", ("return SEQ_K - SEQ_Q", "return SEQ_K - SEQ_Q"))
    impl = register_mutant(monkeypatch, "triton_fa-copy", mutant_kernels("none", "fwd", tmp_path))
    assert check_parity(SUITE, impl, REF, CAUSAL_RECT, "cpu", trials=1, seed=3).ok


def test_production_kernels_carry_no_planted_switch():
    assert "BUG" not in KERNEL_SOURCE and "PLANTED" not in KERNEL_SOURCE.upper()


def test_fully_masked_rows_are_zero_and_lse_matches_logsumexp():
    # seq_q > seq_k with the bottom-right causal mask: the first seq_q - seq_k rows see no key at all.
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 50, 24, generator=gen)
    k = torch.randn(1, 2, 20, 24, generator=gen)
    v = torch.randn(1, 2, 20, 24, generator=gen)
    scale = 0.3
    o, lse2 = kernels.forward(q, k, v, True, scale)
    assert torch.equal(o[:, :, :30], torch.zeros_like(o[:, :, :30]))
    assert torch.isinf(lse2[:, :, :30]).all() and (lse2[:, :, :30] > 0).all()
    kk = k.double().repeat_interleave(2, dim=1)
    scores = (q.double() @ kk.transpose(-2, -1)) * scale
    i = torch.arange(50)[:, None]
    j = torch.arange(20)[None, :]
    want = torch.logsumexp(scores.masked_fill(j > i - 30, float("-inf")), dim=-1)
    torch.testing.assert_close(kernels.natural_lse(lse2[:, :, 30:]).double(), want[:, :, 30:],
                               rtol=1e-5, atol=1e-5)
    ref = attention(q.double(), k.double(), v.double(), causal=True, scale=scale)
    torch.testing.assert_close(o.double(), ref, rtol=1e-5, atol=1e-5)

    qg = q.clone().requires_grad_()
    fa.flash_attention(qg, k, v, causal=True, scale=scale).sum().backward()
    assert torch.equal(qg.grad[:, :, :30], torch.zeros_like(qg.grad[:, :, :30]))


def test_non_contiguous_inputs_and_default_scale():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 19, 2, 16, generator=gen).transpose(1, 2)  # [B, S, H, D] -> [B, H, S, D] view
    k = torch.randn(1, 23, 1, 16, generator=gen).transpose(1, 2)
    v = torch.randn(1, 23, 1, 16, generator=gen).transpose(1, 2)
    got = fa.flash_attention(q, k, v, causal=False)
    want = attention(q.double(), k.double(), v.double(), causal=False, scale=1 / math.sqrt(16))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args,message", [
    (((1, 3, 8, 16), (1, 2, 8, 16)), "not a multiple"),
    (((1, 2, 8, 300), (1, 2, 8, 300)), "head_dim 300"),
    (((1, 2, 8, 16), (1, 2, 8, 32)), "do not fit"),
])
def test_bad_shapes_raise(args, message):
    q, k = (torch.zeros(s) for s in args)
    with pytest.raises(ValueError, match=message):
        fa.flash_attention(q, k, k.clone())


def test_supports_says_why_on_cpu():
    ok, why = IMPL.can_run(_case(1, 4, 4, 64, 64, 64, True, "bf16"), CPU)
    assert not ok and "bf16" in why
    ok, why = IMPL.can_run(_case(1, 4, 4, 64, 64, 512, True, "fp16"), CPU)
    assert not ok and "head_dim 512" in why
    ok, why = IMPL.can_run(_case(1, 32, 32, 2048, 2048, 128, True, "fp16"), CPU)
    assert not ok and "--profile interp" in why
    assert all(IMPL.can_run(c, CPU)[0] for c in INTERP)
    assert "interpreter-on-cpu" in IMPL.tags and IMPL.timing_excluded(CPU)


def test_available_says_why_not(monkeypatch):
    mps = Device(name="mps", backend="mps", torch_device="mps", model="test")
    ok, why = fa.available(mps)
    assert not ok and "mps" in why
    monkeypatch.delenv("TRITON_INTERPRET")
    ok, why = fa.available(CPU)
    assert not ok and "TRITON_INTERPRET=1" in why
    monkeypatch.setattr(availability, "installed", lambda module: False)
    ok, why = fa.available(CPU)
    assert not ok and "triton not installed" in why


def test_gpu_config_pruning_fits_the_device_limit():
    configs = kernels.gpu_configs()
    small = kernels.TileLimits(kernels.FALLBACK_SHARED_BYTES)
    fp16 = kernels.keep_configs(configs, "dkdv", 128, 2, small)
    assert 0 < len(fp16) < len(configs)
    assert all(kernels.shared_estimate("dkdv", c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], 128, 2, c.num_stages)
               <= small.shared_bytes for c in fp16)
    assert len(kernels.keep_configs(configs, "fwd", 128, 2, kernels.TileLimits(227 * 1024))) == len(configs)
    assert kernels.keep_configs(configs, "dkdv", 256, 4, small) == []  # the autotuner hook then keeps the smallest


def test_supports_declines_a_case_no_tile_fits(monkeypatch):
    gpu = Device(name="cuda:0", backend="cuda", torch_device="cuda:0", model="consumer card")
    monkeypatch.setattr(kernels, "device_limits", lambda device: kernels.TileLimits(99 * 1024))
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    case = _case(1, 2, 2, 64, 64, 256, False, "fp32")
    ok, why = fa.supports(case, gpu)
    assert not ok and "99 KiB" in why
    assert fa.supports(_case(1, 2, 2, 64, 64, 256, False, "fp16"), gpu) == (True, "")


# --- the reference's query blocks (reference/attention.py) -------------------------------------------------

def _unblocked_reference(q, k, v, causal, scale):
    """The reference as it was before query blocks (one score matrix for all rows)."""
    hq, hkv, sq, sk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if causal:
        i, j = torch.arange(sq)[:, None], torch.arange(sk)[None, :]
        scores = scores.masked_fill(j > i + (sk - sq), float("-inf"))
    return torch.matmul(torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0), v)


REFERENCE_SHAPES = [((2, 4, 2, 37, 53, 16), True), ((1, 3, 1, 64, 29, 8), True), ((2, 2, 2, 41, 41, 24), False)]


def _leaves(shape, dtype):
    b, hq, hkv, sq, sk, d = shape
    gen = torch.Generator().manual_seed(0)
    leaves = [torch.randn(b, h, s, d, generator=gen).to(dtype).requires_grad_()
              for h, s in ((hq, sq), (hkv, sk), (hkv, sk))]
    return leaves, torch.randn(b, hq, sq, d, generator=gen).to(dtype)


def _forward_backward(fn, leaves, grad):
    for t in leaves:
        t.grad = None
    out = fn(*leaves)
    out.backward(grad)
    return [out.detach(), *(t.grad for t in leaves)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape,causal", REFERENCE_SHAPES)
def test_reference_within_one_block_is_bitwise_the_unblocked_one(dtype, shape, causal):
    leaves, grad = _leaves(shape, dtype)
    scale = shape[-1] ** -0.5
    now = _forward_backward(lambda q, k, v: attention(q, k, v, causal=causal, scale=scale), leaves, grad)
    before = _forward_backward(lambda q, k, v: _unblocked_reference(q, k, v, causal, scale), leaves, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), now, before):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape,causal", REFERENCE_SHAPES)
def test_reference_in_query_blocks_is_the_same_math(dtype, shape, causal):
    """Blocks of 7 rows against one block: the same math up to summation order. dk/dv sum over query rows,
    which the blocks split; and the CPU's BLAS may pick another kernel by row count (here: fp32 with 64
    rows, fp64 everywhere), so bits may differ by a few ulps, never more."""
    leaves, grad = _leaves(shape, dtype)
    b, hq, _, _, sk, _ = shape
    results = [_forward_backward(lambda q, k, v, bb=bb: attention(q, k, v, causal=causal, block_bytes=bb), leaves, grad)
               for bb in (2**40, 7 * b * hq * sk * leaves[0].element_size())]
    for name, whole, blocked in zip(("out", "dq", "dk", "dv"), *results):
        ulps = 8 * torch.finfo(dtype).eps * float(whole.abs().max())
        assert float((whole - blocked).abs().max()) <= ulps, name
    planted = results[1][0].clone()
    planted[:, :, -7:] = 0  # a lost block is far beyond the bound (so the comparison can fail)
    assert float((results[0][0] - planted).abs().max()) > 8 * torch.finfo(dtype).eps * float(results[0][0].abs().max())


def test_reference_blocks_bound_the_score_rows(monkeypatch):
    """No op output holds more query rows of scores than one block, forward or backward."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from twinbench.reference import attention as reference

    b, hq, sq, sk, d = 1, 2, 64, 48, 8
    block_bytes = 16 * b * hq * sk * 4
    q, k, v = (torch.randn(b, hq, s, d, requires_grad=True) for s in (sq, sk, sk))
    assert reference.query_block_rows(q, sk, block_bytes) == 16
    widest = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[-1] == sk:
                    widest.append(t.shape[2])
            return out

    with Watch():
        out = reference.attention(q, k, v, causal=True, block_bytes=block_bytes)
        out.sum().backward()
    assert widest and max(widest) <= 16, max(widest)
    with Watch():  # planted: one block for everything holds all 64 rows (so the watch can fail)
        widest.clear()
        reference.attention(q, k, v, causal=True, block_bytes=2**40).sum().backward()
    assert max(widest) == sq
    assert reference.query_block_rows(torch.empty(8, 32, 4096, 128), 4096) * 8 * 32 * 4096 * 4 \
        <= reference.SCORE_BLOCK_BYTES
