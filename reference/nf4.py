"""Reference NF4 (QLoRA's 4-bit NormalFloat) in plain PyTorch, laid out exactly as bitsandbytes stores it.

Quantisation, per block of ``blocksize`` consecutive elements of the flattened weight (row-major [N, K]):
``absmax = max|w|``; ``scaled = clamp(w * (1 / absmax), -1, 1)``; the 4-bit index is the nearest NF4 code
value (ties to the lower index: bucketize on the midpoints). Two indices per byte, the *first* element in
the *high* nibble. The packed tensor is uint8 ``[(N*K + 1) // 2, 1]`` (bnb's ``Params4bit.data``).

Double quantisation (bnb ``compress_statistics=True``): ``offset = mean(absmax)``; ``absmax - offset`` is
quantised 8-bit blockwise (blocksize 256) to bnb's signed dynamic map; stored: uint8 ``qabsmax``, fp32
``absmax2`` (one per 256 blocks), the fp32 dynamic ``code2`` and the fp32 scalar ``offset``.

Dequantisation: ``w = code[index] * absmax`` computed in the dtype of ``absmax`` (fp32 as bnb stores it;
fp64 when upcast: then exact), cast to the requested dtype. Everything here follows the dtype it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# bitsandbytes' NF4 code (functional.get_4bit_type("nf4")), as fp32.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
DOUBLE_QUANT_BLOCKSIZE = 256


def nf4_code(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 values (rounded to fp32 first, as bnb stores them, then cast)."""
    return torch.tensor(NF4_CODE, dtype=torch.float32).to(device=device, dtype=dtype)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bnb's 8-bit dynamic (exponent + linear fraction) map, 256 sorted fp32 values in [-1, 1]
    (bitsandbytes.functional.create_dynamic_map, same arithmetic so the values are bit-identical)."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        extra = 0 if signed else 1
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits + extra) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


@dataclass
class NF4State:
    """What bnb keeps for one NF4 weight: packed bytes plus absmax (or its double-quantised form)."""

    packed: torch.Tensor               # uint8 [(N*K+1)//2, 1]
    absmax: torch.Tensor               # fp32 [blocks] (nested: uint8 [blocks])
    shape: tuple[int, int]
    blocksize: int
    absmax2: torch.Tensor | None = None  # nested only: fp32 [ceil(blocks / 256)]
    code2: torch.Tensor | None = None    # nested only: fp32 [256]
    offset: torch.Tensor | None = None   # nested only: fp32 scalar

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax per block, the flat values padded with zeros to whole blocks, viewed [blocks, blocksize])."""
    n = flat.numel()
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - n)).view(blocks, blocksize)
    return padded.abs().amax(dim=1), padded


LUT_STEPS = 65535


def quantize_blockwise_8bit(values: torch.Tensor, code: torch.Tensor,
                            blocksize: int = DOUBLE_QUANT_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantisation to a sorted 256-entry ``code``: (uint8, absmax), as bnb 0.50's CPU kernel.

    That kernel does not search for the nearest code value: it rounds ``v / absmax`` onto a uniform grid of
    65536 points on [-1, 1] (``int((v + 1) * 0.5 * 65535 + 0.5)``) and looks the grid point's nearest code
    index up in a table. So a value within half a grid step (1.5e-5) of a midpoint between two code values
    can get the farther one — measured: 4 of 5000 double-quantised absmax values differ from true nearest.
    """
    flat = values.reshape(-1).float()
    absmax, blocks = _blockwise_absmax(flat, blocksize)
    normed = torch.clamp(blocks / absmax[:, None], -1, 1).reshape(-1)[: flat.numel()]
    grid = torch.arange(LUT_STEPS + 1, dtype=torch.float32, device=values.device) / LUT_STEPS * 2 - 1
    table = torch.bucketize(grid, (code[:-1] + code[1:]) / 2)
    q = table[(((normed + 1) * 0.5) * LUT_STEPS + 0.5).long()].to(torch.uint8)
    return q.reshape(values.shape), absmax


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                              blocksize: int = DOUBLE_QUANT_BLOCKSIZE) -> torch.Tensor:
    """code[q] * absmax per block, in the dtype of ``absmax``."""
    vals = code.to(absmax.dtype)[q.reshape(-1).long()]
    n = vals.numel()
    scale = absmax.repeat_interleave(blocksize)[:n]
    return (vals * scale).reshape(q.shape)


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4State:
    """Quantise a 2-D weight [N, K] to NF4 exactly as ``bitsandbytes.functional.quantize_4bit`` does."""
    if weight.dim() != 2:
        raise ValueError(f"NF4 weights are 2-D [out, in], got shape {tuple(weight.shape)}")
    flat = weight.reshape(-1).float()
    n = flat.numel()
    absmax, blocks = _blockwise_absmax(flat, blocksize)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)[:n]
    code = nf4_code(torch.float32, weight.device)
    idx = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    if n % 2:
        idx = torch.cat([idx, idx.new_full((1,), 7)])  # bnb pads with 0.0, whose code index is 7
    packed = ((idx[0::2] << 4) | idx[1::2]).unsqueeze(1)
    state = NF4State(packed=packed, absmax=absmax, shape=(weight.shape[0], weight.shape[1]), blocksize=blocksize)
    if double_quant:
        offset = absmax.mean()
        code2 = dynamic_map().to(weight.device)
        qabsmax, absmax2 = quantize_blockwise_8bit(absmax - offset, code2)
        state = NF4State(packed=packed, absmax=qabsmax, shape=state.shape, blocksize=blocksize,
                         absmax2=absmax2, code2=code2, offset=offset)
    return state


def unpack_indices(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 packed bytes -> int64 code indices, high nibble first."""
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:numel].long()


def absmax_values(absmax: torch.Tensor, absmax2: torch.Tensor | None = None, code2: torch.Tensor | None = None,
                  offset: torch.Tensor | None = None) -> torch.Tensor:
    """The per-block scales: ``absmax`` itself, or ``code2[qabsmax] * absmax2 + offset`` when nested
    (in the dtype of ``absmax2``)."""
    if absmax2 is None:
        return absmax
    return dequantize_blockwise_8bit(absmax, absmax2, code2) + offset.to(absmax2.dtype)


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int], blocksize: int,
                   dtype: torch.dtype | None = None, absmax2: torch.Tensor | None = None,
                   code2: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> torch.Tensor:
    """The [N, K] weight: ``code[index] * absmax`` in the scales' dtype, then cast to ``dtype``."""
    scales = absmax_values(absmax, absmax2, code2, offset)
    n = shape[0] * shape[1]
    vals = nf4_code(scales.dtype, packed.device)[unpack_indices(packed, n)]
    w = vals * scales.repeat_interleave(blocksize)[:n]
    return w.reshape(shape).to(dtype or scales.dtype)


def dequantize_state(state: NF4State, dtype: torch.dtype | None = None) -> torch.Tensor:
    return dequantize_nf4(state.packed, state.absmax, state.shape, state.blocksize, dtype,
                          state.absmax2, state.code2, state.offset)


def nf4_linear(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, *, shape: tuple[int, int],
               blocksize: int, absmax2: torch.Tensor | None = None, code2: torch.Tensor | None = None,
               offset: torch.Tensor | None = None, lora_A: torch.Tensor | None = None,
               lora_B: torch.Tensor | None = None, scaling: float = 1.0,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T (+ bias) (+ scaling * (x A^T) B^T)`` with W the dequantised NF4 weight, in x's dtype."""
    w = dequantize_nf4(packed, absmax, shape, blocksize, x.dtype, absmax2, code2, offset)
    out = x @ w.t()
    if bias is not None:
        out = out + bias
    if lora_A is not None and lora_B is not None:
        out = out + scaling * ((x @ lora_A.t()) @ lora_B.t())
    return out
