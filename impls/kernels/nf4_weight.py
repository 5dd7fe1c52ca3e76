"""The NF4 weight container: a quantised weight in bitsandbytes' storage, read in place (nothing is copied).

Shared by every NF4 kernel path (CPU native/inductor in nf4.py, Triton in impls/quant_linear/triton_nf4.py,
the fused linear's public API in impls/quant_linear/fused.py); it depends only on the code table and the
native absmax decoder, so nothing it imports imports it back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from twinbench.impls.kernels import nf4_native
from twinbench.impls.kernels.nf4_code import nf4_table

DOUBLE_QUANT_BLOCKSIZE = 256  # bnb quantises absmax in blocks of 256 (the only nested size it supports)


@dataclass
class NF4Weight:
    """An NF4 weight in bitsandbytes' storage: ``packed`` uint8 [(N*K+1)//2, 1] (high nibble first),
    ``absmax`` fp32 [blocks] — or, double-quantised, uint8 [blocks] with ``absmax2`` fp32 [ceil(blocks/256)],
    ``code2`` fp32 [256] (bnb's dynamic map) and ``offset`` (fp32 scalar tensor)."""

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int]
    blocksize: int
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    # What a kernel path derived from this weight, kept for its next call while still valid (the few-rows
    # native path's checked weight: impls/quant_linear/fused.py, _native_gemv_weight). Not part of the value.
    derived: Any = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_bnb(cls, weight: Any, quant_state: Any = None) -> NF4Weight:
        """From a ``bnb.nn.Params4bit`` (its ``.quant_state``) or ``(packed, QuantState)``."""
        qs = quant_state if quant_state is not None else getattr(weight, "quant_state", None)
        if qs is None:
            raise ValueError("no bitsandbytes QuantState: pass a quantized Params4bit or (packed, quant_state)")
        if qs.quant_type != "nf4":
            raise ValueError(f"only NF4 weights are supported, got quant_type={qs.quant_type!r}")
        if getattr(qs, "packing_format_for_cpu", False):
            raise ValueError("weight was repacked by bnb for CPU inference (eval mode); quantize it again")
        packed = weight.data if hasattr(weight, "data") else weight
        if packed.dtype != torch.uint8:
            packed = packed.view(torch.uint8)
        shape = (int(qs.shape[0]), int(qs.shape[1]))
        if qs.nested:
            if qs.state2.blocksize != DOUBLE_QUANT_BLOCKSIZE:
                raise ValueError(f"nested absmax blocksize {qs.state2.blocksize} (only 256 is supported)")
            return cls(packed, qs.absmax, shape, int(qs.blocksize), qs.state2.absmax, qs.state2.code, qs.offset)
        return cls(packed, qs.absmax, shape, int(qs.blocksize))

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    def block_scales(self) -> torch.Tensor:
        """fp32 absmax per block; nested: ``code2[q] * absmax2[block // 256] + offset`` in fp32, as bnb."""
        if not self.nested:
            return self.absmax.float()
        if self.absmax.device.type == "cpu" and self.absmax.dtype == torch.uint8 and nf4_native.status()[0]:
            return nf4_native.decode_absmax(self.absmax, self.absmax2, self.code2, float(self.offset))
        q = self.absmax.reshape(-1).long()
        outer = self.absmax2.float().repeat_interleave(DOUBLE_QUANT_BLOCKSIZE)[: q.numel()]
        return self.code2.float()[q] * outer + self.offset.float()

    def row_aligned(self) -> bool:
        """Blocks never straddle rows: the fused kernels' [N, K/blocksize] scale layout applies."""
        return self.shape[1] % self.blocksize == 0 and self.blocksize % 2 == 0

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The [N, K] weight (any shape; used where the fused layout does not apply)."""
        n = self.shape[0] * self.shape[1]
        p = self.packed.reshape(-1)
        idx = torch.stack([p >> 4, p & 15], 1).reshape(-1)[:n].long()
        code = nf4_table(str(p.device))
        w = code[idx] * self.block_scales().repeat_interleave(self.blocksize)[:n]
        return w.reshape(self.shape).to(dtype)


def as_nf4_weight(qweight_state: Any) -> NF4Weight:
    if isinstance(qweight_state, NF4Weight):
        return qweight_state
    if isinstance(qweight_state, tuple) and len(qweight_state) == 2:
        return NF4Weight.from_bnb(*qweight_state)
    return NF4Weight.from_bnb(qweight_state)
