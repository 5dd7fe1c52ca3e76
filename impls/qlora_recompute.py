"""Selective activation recomputation for the patched QLoRA loop: checkpoint decoder sub-blocks, not layers.

The reference checkpoints whole decoder layers (only each layer's input is kept; backward re-runs the whole
layer). ``patch_decoder_layers(model, blocks)`` replaces each decoder layer's forward with the same residual
structure in which the chosen sub-blocks run under ``torch.utils.checkpoint`` (non-reentrant):

- ``"mlp"``: post-attention RMSNorm + MLP (or MoE block). Kept: the residual stream entering it. Dropped:
  the norm output, the gate/up output and the SwiGLU activation (the largest saved tensors of the layer,
  measured in docs/qlora.md); backward re-runs one norm, the gate/up and down GEMMs.
- ``"attn"``: input RMSNorm + attention (q/k/v, RoPE, SDPA, o). Kept: the layer input.

The residual adds stay outside (they save nothing).
"""

from __future__ import annotations

import types
from collections.abc import Iterable

from torch.utils.checkpoint import checkpoint

BLOCKS = ("attn", "mlp")


def _selective_forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                       use_cache=False, position_embeddings=None, **kwargs):
    """Llama / Qwen3-MoE decoder-layer forward with ``self._twinbench_recompute`` sub-blocks checkpointed."""
    recompute = self._twinbench_recompute if self.training else ()

    def attn(h):
        out, _ = self.self_attn(hidden_states=self.input_layernorm(h), attention_mask=attention_mask,
                                position_ids=position_ids, cache=cache, use_cache=use_cache,
                                position_embeddings=position_embeddings, **kwargs)
        return out

    def mlp(h):
        return self.mlp(self.post_attention_layernorm(h))

    h = hidden_states
    h = h + (checkpoint(attn, h, use_reentrant=False) if "attn" in recompute else attn(h))
    return h + (checkpoint(mlp, h, use_reentrant=False) if "mlp" in recompute else mlp(h))


def patch_decoder_layers(model, blocks: Iterable[str]) -> int:
    """Install the selective forward on every decoder layer (input/post-attention norms, self_attn, mlp);
    returns how many were patched."""
    chosen = tuple(blocks)
    unknown = [b for b in chosen if b not in BLOCKS]
    if unknown:
        raise ValueError(f"unknown recompute blocks {unknown}; choose from {BLOCKS}")
    n = 0
    for module in model.modules():
        if all(hasattr(module, a) for a in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")):
            module._twinbench_recompute = chosen
            module.forward = types.MethodType(_selective_forward, module)
            n += 1
    return n
