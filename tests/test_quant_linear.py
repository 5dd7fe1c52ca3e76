"""quant_linear: planted wrong NF4 linears the parity rule must catch, correct impls over several seeds, and the
public nf4_lora_linear API on real bitsandbytes / peft layers (what the QLoRA loop patches in)."""

from __future__ import annotations

import pytest
import torch
from twinbench.harness.core.parity import check_parity
from twinbench.harness.core.registry import IMPLS, SUITES, Impl, load_plugins
from twinbench.reference.nf4 import nf4_code

load_plugins()
SUITE = SUITES["quant_linear"]
REF = IMPLS[("quant_linear", "reference")]
GEMV_FP32, GEMM_FP16 = SUITE.cases("quick")[0], SUITE.cases("quick")[1]


def buggy_dequant(packed, absmax, shape, blocksize, absmax2, code2, offset, bug: str) -> torch.Tensor:
    """A plausible wrong dequantiser (fp32), one bug at a time."""
    scales = absmax.float() if absmax2 is None else \
        code2[absmax.long()] * absmax2.repeat_interleave(256)[: absmax.numel()] + offset
    code = nf4_code()
    if bug == "wrong-code-value":
        code = code.clone()
        code[11] = 0.35  # bnb: 0.33791524
    p = packed.reshape(-1)
    first, second = (p & 15, p >> 4) if bug == "nibbles-swapped" else (p >> 4, p & 15)
    vals = code[torch.stack([first, second], 1).reshape(-1).long()]
    if bug == "off-by-one-block":
        scales = scales.roll(1)
    per_elem = scales.repeat_interleave(blocksize)[: vals.numel()]
    w = vals if bug == "absmax-not-applied" else vals * per_elem
    return w.reshape(shape)


def planted(bug: str) -> Impl:
    def fn(x, packed, absmax, lora_A=None, lora_B=None, bias=None, absmax2=None, code2=None, offset=None, *,
           shape, blocksize, scaling):
        w = buggy_dequant(packed, absmax, shape, blocksize, absmax2, code2, offset, bug).to(x.dtype)
        out = x @ w.t()
        if lora_A is not None:
            lora_scale = 1.0 if bug == "lora-scaling-dropped" else scaling
            out = out + lora_scale * ((x @ lora_A.t()) @ lora_B.t())
        return out + bias if bias is not None else out

    return Impl(name=f"planted-{bug}", suite="quant_linear", fn=fn)


BUGS = ["wrong-code-value", "off-by-one-block", "nibbles-swapped", "absmax-not-applied", "lora-scaling-dropped"]


@pytest.mark.parametrize("case", [GEMV_FP32, GEMM_FP16], ids=["gemv-fp32-dq", "gemm-fp16-bias"])
@pytest.mark.parametrize("bug", BUGS)
def test_planted_wrong_impl_is_caught(bug, case):
    verdict = check_parity(SUITE, planted(bug), REF, case, "cpu", trials=1)
    assert not verdict.ok, f"{bug} passed: {[(n, c.error, c.bound) for n, c in verdict.checks.items()]}"


@pytest.mark.parametrize("case", [GEMV_FP32, GEMM_FP16], ids=["gemv-fp32-dq", "gemm-fp16-bias"])
def test_planted_harness_without_bug_passes(case):
    """The planted impl with no bug passes: the catches above come from the bugs alone."""
    assert check_parity(SUITE, planted("none"), REF, case, "cpu", trials=1).ok


@pytest.mark.parametrize("impl", ["fused_cpu", "fused_cpu_keep_w", "bnb_matmul_4bit", "triton_gemv", "triton_gemm"])
def test_correct_impls_pass_over_seeds(impl):
    chosen = IMPLS[("quant_linear", impl)]
    from twinbench.harness.core import devices

    cpu = next(d for d in devices.detect() if d.backend == "cpu")
    ran = 0
    for case in (GEMV_FP32, GEMM_FP16):
        if not chosen.can_run(case, cpu)[0]:
            continue
        for seed in (101, 202):
            verdict = check_parity(SUITE, chosen, REF, case, "cpu", trials=1, seed=seed)
            assert verdict.ok, (case.id, seed, verdict.problems,
                                {n: (c.error, c.bound) for n, c in verdict.checks.items() if not c.ok})
            ran += 1
    assert ran >= 2


# --- the public API on real bitsandbytes / peft layers --------------------------------------------------------

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed")


def linear4bit(n: int, k: int, seed: int, double_quant: bool = True, bias: bool = True):
    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(torch.randn(n, k) / k**0.5, requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant, blocksize=64)
    layer.weight._quantize("cpu")
    return layer


def test_nf4_lora_linear_matches_bnb_layer_and_exact_grads():
    from twinbench.impls.quant_linear.fused import from_linear4bit, nf4_lora_linear

    layer = linear4bit(96, 256, 0)
    w, b = from_linear4bit(layer)
    a = torch.randn(8, 256, requires_grad=True)
    bb = torch.randn(96, 8, requires_grad=True)
    x = torch.randn(3, 2, 256, requires_grad=True)  # leading dims are kept
    out = nf4_lora_linear(x, layer.weight, a, bb, 0.5, b)
    expected = layer(x) + 0.5 * (x @ a.t()) @ bb.t()  # bnb's own training path + peft's LoRA formula
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, a, bb), g)
    want = torch.autograd.grad(expected, (x, a, bb), g)
    for gi, wi in zip(got, want):
        torch.testing.assert_close(gi, wi, rtol=1e-4, atol=1e-5)


def test_from_bnb_refuses_what_it_cannot_read():
    from twinbench.impls.quant_linear.fused import NF4Weight

    layer = linear4bit(32, 64, 1)
    layer.weight.quant_state.quant_type = "fp4"
    with pytest.raises(ValueError, match="NF4"):
        NF4Weight.from_bnb(layer.weight)
    with pytest.raises(ValueError, match="QuantState"):
        NF4Weight.from_bnb(torch.zeros(4, 1, dtype=torch.uint8))


def test_linear4bit_training_path_is_matmul_4bit():
    """The suite times bnb.matmul_4bit; Linear4bit (training mode) is exactly that call."""
    from twinbench.impls.quant_linear.bnb_peer import bnb_matmul_4bit

    layer = linear4bit(64, 128, 2)
    qs = layer.weight.quant_state
    x = torch.randn(5, 128, requires_grad=True)
    ours = bnb_matmul_4bit(x, layer.weight.data, qs.absmax, bias=layer.bias, absmax2=qs.state2.absmax,
                           code2=qs.state2.code, offset=qs.offset, shape=(64, 128), blocksize=64, scaling=1.0)
    assert torch.equal(layer(x), ours)


def test_patch_peft_model_same_outputs_and_grads_as_peft(monkeypatch):
    peft = pytest.importorskip("peft")
    from twinbench.impls.quant_linear import fused as quant_linear_fused
    from twinbench.impls.quant_linear.fused import patch_peft_model

    fused_calls = []
    real_forward = quant_linear_fused.peft_lora_forward
    monkeypatch.setattr(quant_linear_fused, "peft_lora_forward",
                        lambda layer, x: fused_calls.append(layer) or real_forward(layer, x))

    def model():
        net = torch.nn.Sequential()
        net.add_module("up", linear4bit(64, 128, 3))
        net.add_module("act", torch.nn.ReLU())
        net.add_module("down", linear4bit(128, 64, 4, double_quant=False, bias=False))
        net.is_loaded_in_4bit = True  # as transformers marks 4-bit models: peft then makes lora.Linear4bit
        cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["up", "down"], lora_dropout=0.0,
                              init_lora_weights=False)  # random B: the LoRA gradients are not trivially zero
        torch.manual_seed(5)
        return peft.get_peft_model(net, cfg)

    plain, fused = model(), model()
    assert patch_peft_model(fused) == 2
    x = torch.randn(4, 128)
    outs, grads = [], []
    for m in (plain, fused):
        out = m(x)
        out.square().sum().backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert len(fused_calls) == 2  # both layers really went through the fused op
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-4)
    layer = fused.base_model.model.up
    assert quant_linear_fused._peft_fusable(layer) == ""
    layer.lora_dropout["default"] = torch.nn.Dropout(0.1)
    assert "dropout" in quant_linear_fused._peft_fusable(layer)  # training with dropout: peft's own forward
