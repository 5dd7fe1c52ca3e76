"""Our Triton FlashAttention-2 (impls/attention_triton_fa.py) under the CPU interpreter: the interp grid passes
the three-way parity rule for out/dq/dk/dv, planted kernel bugs are caught, edge rows and LSE are right."""

import math

import pytest
import torch
from twinbench.harness.core.case import Case
from twinbench.harness.core.devices import Device
from twinbench.harness.core.parity import check_parity
from twinbench.harness.core.registry import IMPLS, SUITES, load_plugins
from twinbench.reference.attention import attention

triton = pytest.importorskip("triton")
load_plugins()

from twinbench.impls.attention import triton_fa as fa  # noqa: E402
from twinbench.impls.attention import triton_fa_kernels as kernels  # noqa: E402  (after the registry, like the worker)

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


# Each planted bug lives in the kernel itself (a constexpr the launcher passes); the suite must catch it.
CAUSAL_RECT = _case(1, 4, 2, 33, 70, 40, True, "fp32")   # bottom-right mask with seq_q != seq_k
PADDED_KEYS = _case(1, 2, 1, 20, 45, 24, False, "fp16")  # seq_k not a multiple of the key block


@pytest.mark.parametrize("where,bug,case,caught", [
    ("fwd", 1, CAUSAL_RECT, "out"),       # causal boundary one key too far, forward only
    ("bwd", 1, CAUSAL_RECT, "grad:q"),    # ... backward only: the output still passes
    ("fwd", 2, PADDED_KEYS, "out"),       # one padding key past seq_k treated as a real key
    ("bwd", 3, CAUSAL_RECT, "grad:k"),    # dK/dV not summed over the GQA group
], ids=["fwd-causal-boundary", "bwd-causal-boundary", "fwd-key-padding", "bwd-gqa-group-sum"])
def test_planted_kernel_bug_is_caught(monkeypatch, where, bug, case, caught):
    monkeypatch.setitem(kernels._PLANTED_BUG, where, bug)
    verdict = check_parity(SUITE, IMPL, REF, case, "cpu", trials=1, seed=3)
    assert not verdict.ok
    assert not verdict.checks[caught].ok, verdict.checks
    if where == "bwd":
        assert verdict.checks["out"].ok, "a backward-only bug must leave the forward output right"
    if bug == 3:
        assert verdict.checks["grad:v"].ok is False and verdict.checks["grad:q"].ok


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
    monkeypatch.setattr(fa.importlib.util, "find_spec", lambda name: None)
    ok, why = fa.available(CPU)
    assert not ok and "triton not installed" in why


def _tile_bytes(config, block_d, elem):
    return (config.kwargs["BLOCK_M"] + 2 * config.kwargs["BLOCK_N"]) * block_d * elem * config.num_stages


def test_gpu_config_pruning_fits_small_shared_memory_and_keeps_one():
    configs = kernels._gpu_configs()
    fp16 = kernels._prune(configs, {"Q": torch.zeros(1, dtype=torch.float16)}, BLOCK_D=128)
    assert 0 < len(fp16) < len(configs)
    assert all(_tile_bytes(c, 128, 2) <= 64 * 1024 for c in fp16)
    # fp32 at head_dim 256: no tile fits the estimate, so the smallest config is kept rather than none
    (only,) = kernels._prune(configs, {"Q": torch.zeros(1, dtype=torch.float32)}, BLOCK_D=256)
    assert only.kwargs == {"BLOCK_M": 32, "BLOCK_N": 32} and only.num_stages == 1
