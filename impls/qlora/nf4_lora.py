"""Fused NF4 + LoRA projections for the optimized QLoRA loop (Unsloth-style ``apply_lora_qkv`` / ``_mlp``).

``nf4_lora_projections(x, layers)`` computes, for several peft ``lora.bnb.Linear4bit`` layers that read the
same input (q/k/v, or gate/up), ``[x @ W_i^T + s_i * (x @ A_i^T) @ B_i^T for i]`` as one autograd op:

- the NF4 weights are dequantised (bitsandbytes' own ``dequantize_4bit``, so the numbers are the ones the
  reference multiplies by) and concatenated: one GEMM for all base projections, one for all ``x @ A^T``;
- nothing weight-sized is saved for backward: the dequantised weights are rebuilt there (as QLoRA must,
  or the 4-bit saving is gone), and only ``x`` and the small ``x @ A^T`` are kept;
- backward gives ``dx``, ``dA_i``, ``dB_i`` with a handful of GEMMs instead of autograd's per-layer graph.

Single projections (o_proj, down_proj) go through the quantized-linear issue's
``impls.quant_linear_fused.nf4_lora_linear`` when it is importable (``use_shared_single_op``), else this op.
"""

from __future__ import annotations

from typing import Any

import torch
from twinbench.reference.autograd_once import differentiable_once
from twinbench.reference.qlora.breakdown import scope


def lora_parts(layer) -> tuple[Any, Any, torch.Tensor, torch.Tensor, float]:
    """(packed NF4 weight, quant state, A, B, scaling) of a peft LoRA layer over a bnb Linear4bit."""
    base = layer.base_layer
    name = layer.active_adapters[0]
    return (base.weight, base.weight.quant_state, layer.lora_A[name].weight, layer.lora_B[name].weight,
            float(layer.scaling[name]))


def bias_free(layer) -> bool:
    """The fused ops compute ``x W^T`` and the adapters only: a base layer with a bias keeps peft's forward."""
    return getattr(layer.base_layer, "bias", None) is None


def dequantized(weights: list[tuple[Any, Any]], dtype: torch.dtype) -> torch.Tensor:
    """The NF4 weights dequantised by bitsandbytes and stacked: [sum out, in] in ``dtype`` (bnb 0.50 has no
    CPU kernel for its ``out=`` variant, so the parts are concatenated)."""
    import bitsandbytes.functional as bnbf

    with scope("nf4"):
        parts = [bnbf.dequantize_4bit(packed, q) for packed, q in weights]
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).to(dtype)


class NF4Panels:
    """One NF4 weight [out, in] dequantised a panel at a time: ``rows(r0, r1)`` is ``W[r0:r1]``, ``cols(c0, c1)``
    is ``W[:, c0:c1]``, each bit-identical to the same slice of ``dequantized`` (the same bnb kernel on the
    slice of the packed bytes and of the block scales; the double-quantised scales are decoded once, as bnb
    does). So an op can run its GEMM panel by panel and never hold the whole fp32 weight (docs/qlora.md, the
    100M section). Panel edges must fall on quantisation blocks (multiples of ``block`` along ``in``)."""

    def __init__(self, weight: tuple[Any, Any], dtype: torch.dtype):
        import bitsandbytes.functional as bnbf

        packed, q = weight
        self.packed, self.dtype, self.block, self.quant_type = packed, dtype, q.blocksize, q.quant_type
        self.out_features, self.in_features = q.shape
        self.quant_dtype = q.dtype
        with scope("nf4"):
            absmax = q.absmax
            if q.nested:
                absmax = bnbf.dequantize_blockwise(q.absmax, q.state2) + q.offset
            self.absmax = absmax.float()

    def _dequantize(self, packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        with scope("nf4"):
            return torch.ops.bitsandbytes.dequantize_4bit.default(
                packed, absmax, self.block, self.quant_type, shape, self.quant_dtype).to(self.dtype)

    @property
    def panelable(self) -> bool:
        """Every row holds whole quantisation blocks, so any row or block-aligned column panel can be cut."""
        return self.in_features % self.block == 0

    def whole(self) -> torch.Tensor:
        return self._dequantize(self.packed, self.absmax, (self.out_features, self.in_features))

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        k, b = self.in_features, self.block
        if (r0, r1) == (0, self.out_features):
            return self.whole()
        return self._dequantize(self.packed.reshape(-1)[r0 * k // 2:r1 * k // 2].view(-1, 1),
                                self.absmax[r0 * k // b:r1 * k // b], (r1 - r0, k))

    def cols(self, c0: int, c1: int) -> torch.Tensor:
        n, k, b = self.out_features, self.in_features, self.block
        if (c0, c1) == (0, k):
            return self.whole()
        # contiguous copies: bnb's kernel reads raw pointers and ignores strides
        packed = self.packed.reshape(n, k // 2)[:, c0 // 2:c1 // 2].contiguous().view(-1, 1)
        absmax = self.absmax.view(n, k // b)[:, c0 // b:c1 // b].contiguous().view(-1)
        return self._dequantize(packed, absmax, (n, c1 - c0))


def panel_bounds(width: int, rows: int, block: int, elements: int) -> list[tuple[int, int]]:
    """[start, end) panels of ``width`` columns, each a multiple of ``block`` wide (the last may be shorter)
    and each [rows, panel] activation at most ``elements`` (at least one block): the panel size the fused
    MLP runs its row/column GEMMs at."""
    step = max(block, elements // max(rows, 1) // block * block)
    if step >= width or width % block:
        return [(0, width)]
    return [(c, min(c + step, width)) for c in range(0, width, step)]


def rms_norm_with_rstd(h: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype):
    """transformers' RMSNorm (fp32 statistics, weight applied in h's dtype), cast to the GEMM dtype; and 1/rms."""
    hf = h.float()
    rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * (hf * rstd).to(h.dtype)).to(dtype), rstd


def rms_norm_backward(grad_x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """d h of ``weight * h * rstd(h)`` (weight frozen): rstd * g - rstd^3 * h * mean(g * h), g = grad * weight."""
    g, hf = grad_x.float() * weight.float(), h.float()
    dot = (g * hf).mean(-1, keepdim=True)
    # the same products in the same order as rstd * g - rstd^3 * h * dot, two [tokens, hidden] temporaries
    # fewer (written in place)
    return g.mul_(rstd).sub_((hf * rstd.pow(3)).mul_(dot)).to(h.dtype)


class NF4LoRAProjections(torch.autograd.Function):
    """y = [x W_1^T + s_1 (x A_1^T) B_1^T, ...] concatenated on the last dim; W_i NF4, A_i/B_i trainable.

    One GEMM for all base projections and one for all ``x A_i^T`` (``x @ cat(A)^T``); each ``B_i`` then
    accumulates into its own column block of the output (``addmm_`` on a strided view, no copy). The backward
    mirrors it per block, so no block-diagonal B with 2/3 zeros is multiplied (measured: a third of the
    adapter FLOPs and two GEMMs fewer per call than a ``block_diag`` formulation).
    """

    @staticmethod
    def forward(ctx, x, weights, scalings, out_dtype, *lora):  # lora = A_1, B_1, A_2, B_2, ...
        a_list, b_list = lora[0::2], lora[1::2]
        x2 = x.reshape(-1, x.shape[-1])
        w = dequantized(weights, x.dtype)
        with scope("lora"):
            a_cat = torch.cat(a_list) if len(a_list) > 1 else a_list[0]  # [sum r, in]
            xa = x2 @ a_cat.t()  # [N, sum r]
        # GEMMs in the compute dtype, the base + adapter sum in the caller's dtype: as bnb + peft do it
        out = x2 @ w.t()  # [N, sum out]
        del w
        blocks = _blocks(a_list, b_list)
        if out_dtype == x.dtype:  # each adapter accumulates into its column block of the base output
            with scope("lora"):
                for (o, n, r, k), b, s in zip(blocks, b_list, scalings):
                    out[:, o:o + n].addmm_(xa[:, r:r + k], b.t(), alpha=s)
        else:
            lora_out = torch.cat([(xa[:, r:r + k] @ b.t()) * s for (_o, _n, r, k), b, s in zip(blocks, b_list, scalings)],
                                 dim=1)
            out = out.to(out_dtype) + lora_out.to(out_dtype)
        ctx.weights, ctx.scalings, ctx.x_shape, ctx.blocks = weights, scalings, x.shape, blocks
        # x and every adapter, not x2 and B only: differentiable_once's error node must reach each input (x2 is a
        # view made under no_grad, cut from x's graph; the As are in a_cat only)
        ctx.save_for_backward(x, xa, a_cat, *lora)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @differentiable_once("NF4LoRAProjections")
    def backward(ctx, grad_out):
        x, xa, a_cat, *lora = ctx.saved_tensors
        x2, b_list = x.reshape(-1, x.shape[-1]), lora[1::2]
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(x2.dtype)
        with scope("lora"):
            g_xa = g.new_empty((g.shape[0], xa.shape[1]))  # [N, sum r]: the gradient reaching x A^T
            grad_b = []
            for (o, n, r, k), b, s in zip(ctx.blocks, b_list, ctx.scalings):
                g_i = g[:, o:o + n]
                g_xa[:, r:r + k].addmm_(g_i, b, beta=0, alpha=s)  # beta 0: the empty buffer is never read
                grad_b.append(torch.mm(g_i.t(), xa[:, r:r + k]).mul_(s))
            grad_a = g_xa.t() @ x2  # [sum r, in]
        grads: list[torch.Tensor] = []
        for (_o, _n, r, k), gb in zip(ctx.blocks, grad_b):
            grads += [grad_a[r:r + k], gb]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ dequantized(ctx.weights, x2.dtype)).addmm_(g_xa, a_cat).view(ctx.x_shape)
        return (grad_x, None, None, None, *grads)


def _blocks(a_list, b_list) -> list[tuple[int, int, int, int]]:
    """(output column start, output width, rank column start, rank) of each projection."""
    blocks, o, r = [], 0, 0
    for a, b in zip(a_list, b_list):
        blocks.append((o, b.shape[0], r, a.shape[0]))
        o, r = o + b.shape[0], r + a.shape[0]
    return blocks


class SiluMul(torch.autograd.Function):
    """``silu(gate) * up`` keeping only its inputs for backward (autograd would also keep ``silu(gate)``)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate) * up

    @staticmethod
    @differentiable_once("SiluMul")  # aten.silu_backward has no derivative of its own
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad * up, gate), grad * torch.nn.functional.silu(gate)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return SiluMul.apply(gate, up)


def nf4_lora_projections(x: torch.Tensor, layers: list[Any]) -> list[torch.Tensor]:
    """Outputs (in ``x``'s dtype) of several LoRA-over-NF4 layers sharing the input ``x``; the GEMMs run in
    the adapters' (= bnb compute) dtype."""
    parts = [lora_parts(layer) for layer in layers]
    lora = [t for p in parts for t in (p[2], p[3])]
    out = NF4LoRAProjections.apply(x.to(parts[0][2].dtype), [(p[0], p[1]) for p in parts], [p[4] for p in parts],
                                   x.dtype, *lora)
    return list(out.split([p[3].shape[0] for p in parts], dim=-1))


def use_shared_single_op(model, layers: list[Any]) -> tuple[bool, str]:
    """Route ``layers`` (o/down projections) through ``impls.quant_linear_fused.patch_peft_model``'s forward
    (its ``nf4_lora_linear``, falling back to peft's own when a layer does not qualify). (ok, why not)."""
    try:
        from twinbench.impls.quant_linear.fused import patch_peft_model
    except Exception as exc:  # absent or broken: our op does the single projections too
        return False, f"impls.quant_linear_fused unavailable ({type(exc).__name__}: {exc})"
    patch_peft_model(model)
    for layer in layers:
        layer._twinbench_nf4_single = True
    return True, ""


def single_projection(x: torch.Tensor, layer) -> torch.Tensor:
    """One LoRA-over-NF4 projection: the layer's own forward once ``patch_peft_model`` (quantized-linear
    issue) routed it through ``nf4_lora_linear``, else our op with one group member."""
    if getattr(layer, "_twinbench_nf4_single", False):
        return layer(x)
    return nf4_lora_projections(x, [layer])[0]
