"""The NF4 reference against bitsandbytes: identical bytes and statistics, bnb's published errors, and
planted wrong quantisers that the cross-check must catch."""

from __future__ import annotations

import pytest
import torch
from twinbench.reference import nf4

bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed")

# bitsandbytes' tests: mean |dequant(quant(w)) - w| of a 1024x1024 standard normal matrix, per blocksize.
PUBLISHED_MEAN_ERROR = {32: 0.0677, 64: 0.0728, 128: 0.0768, 256: 0.0803}
# Measured sample-to-sample spread of that mean here: ~1e-4; bnb allows mean + 7 sigma. Published values are
# rounded to 4 digits. 1e-3 is ~7 sigma plus the rounding.
STAT_TOL = 1e-3


def weight(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype)


def bnb_state(w, blocksize, double_quant):
    return bnb_functional.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")


def mismatches(state: nf4.NF4State, packed, qs) -> list[str]:
    """What differs between our state and bnb's (empty when byte-identical)."""
    bad = []
    if not torch.equal(state.packed, packed):
        bad.append(f"packed bytes ({int((state.packed != packed).sum())} differ)")
    if not torch.equal(state.absmax, qs.absmax):
        bad.append("absmax")
    if qs.nested:
        for name, ours, theirs in (("absmax2", state.absmax2, qs.state2.absmax), ("code2", state.code2,
                                   qs.state2.code), ("offset", state.offset, qs.offset)):
            if ours is None or not torch.equal(ours, theirs):
                bad.append(name)
    elif state.nested:
        bad.append("nested state where bnb has none")
    return bad


def test_code_and_dynamic_map_are_bnbs():
    assert torch.equal(nf4.nf4_code(), bnb_functional.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.dynamic_map(), bnb_functional.create_dynamic_map())


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double-quant"])
def test_bytes_and_statistics_identical_to_bnb(blocksize, double_quant):
    # 1000x300 (fp32): the last absmax block is partial; half precisions are quantised from their own values.
    for seed, shape, dtype in ((0, (384, 512), torch.float32), (1, (1000, 300), torch.float32),
                               (2, (256, 512), torch.bfloat16), (3, (256, 512), torch.float16)):
        w = weight(shape, dtype, seed)
        packed, qs = bnb_state(w, blocksize, double_quant)
        ours = nf4.quantize_nf4(w, blocksize, double_quant)
        assert mismatches(ours, packed, qs) == [], (shape, dtype)
        assert torch.equal(nf4.dequantize_state(ours, dtype), bnb_functional.dequantize_4bit(packed, qs))


def test_odd_element_count_pads_like_bnb():
    w = weight((7, 9), torch.float32, 3)  # 63 elements: bnb pads the last byte's low nibble with code(0.0)
    packed, qs = bnb_state(w, 64, False)
    ours = nf4.quantize_nf4(w, 64)
    assert mismatches(ours, packed, qs) == []  # (bnb dequantises odd shapes through torch.compile: not here)


@pytest.mark.parametrize("blocksize", sorted(PUBLISHED_MEAN_ERROR))
def test_mean_error_matches_published(blocksize):
    w = weight((1024, 1024), torch.float32, 11)
    err = float((nf4.dequantize_state(nf4.quantize_nf4(w, blocksize)) - w).abs().mean())
    assert abs(err - PUBLISHED_MEAN_ERROR[blocksize]) < STAT_TOL, err


def test_double_quant_error_small_against_plain_absmax():
    """Double quantisation perturbs the scales: error grows, but only slightly (QLoRA's claim)."""
    w = weight((1024, 1024), torch.float32, 12)
    plain = float((nf4.dequantize_state(nf4.quantize_nf4(w, 64)) - w).abs().mean())
    nested = float((nf4.dequantize_state(nf4.quantize_nf4(w, 64, True)) - w).abs().mean())
    assert plain <= nested < plain * 1.01


# --- planted wrong quantisers: each must differ from bnb's bytes or statistics -------------------------------

def _pack(idx: torch.Tensor, high_first: bool = True) -> torch.Tensor:
    a, b = (idx[0::2], idx[1::2]) if high_first else (idx[1::2], idx[0::2])
    return ((a << 4) | b).unsqueeze(1)


def planted_quantize(w: torch.Tensor, blocksize: int, bug: str) -> nf4.NF4State:
    flat = w.reshape(-1).float()
    blocks = flat.view(-1, blocksize)
    absmax = blocks.abs().amax(1)
    scale_of_block = absmax.roll(1) if bug == "off-by-one-block" else absmax
    code = nf4.nf4_code()
    if bug == "wrong-code-value":
        code = code.clone()
        code[11] = 0.35  # bnb: 0.33791524
    scaled = blocks if bug == "absmax-not-applied" else blocks / scale_of_block[:, None]
    idx = torch.bucketize(scaled.clamp(-1, 1).reshape(-1), (code[:-1] + code[1:]) / 2).to(torch.uint8)
    packed = _pack(idx, high_first=bug != "nibbles-swapped")
    return nf4.NF4State(packed=packed, absmax=absmax, shape=tuple(w.shape), blocksize=blocksize)


@pytest.mark.parametrize("bug", ["wrong-code-value", "off-by-one-block", "nibbles-swapped", "absmax-not-applied"])
def test_cross_check_catches_planted_quantizer(bug):
    w = weight((256, 512), torch.float32, 5)
    packed, qs = bnb_state(w, 64, False)
    assert mismatches(planted_quantize(w, 64, bug), packed, qs), f"planted bug {bug!r} not caught"


def test_planted_quantizer_harness_is_correct_without_a_bug():
    """The planted quantiser with no bug is bnb's: the catches above come from the bugs alone."""
    w = weight((256, 512), torch.float32, 5)
    packed, qs = bnb_state(w, 64, False)
    assert mismatches(planted_quantize(w, 64, "none"), packed, qs) == []
