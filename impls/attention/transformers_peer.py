"""transformers' attention functions (`eager`, `sdpa`) called the way its Llama layer calls them."""

from __future__ import annotations

import importlib.util

import torch
from twinbench.harness.core.registry import register_impl


def _has_transformers(device) -> tuple[bool, str]:
    if importlib.util.find_spec("transformers") is None:
        return False, "transformers not installed (pip install 'twinbench[train]')"
    return True, ""


class _LayerStub(torch.nn.Module):
    """The attributes transformers' attention functions read from the calling attention layer."""

    def __init__(self, groups: int, causal: bool):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = causal
        self.training = True


def _additive_mask(q, k, causal):
    if not causal:
        return None
    sq, sk = q.shape[2], k.shape[2]
    i = torch.arange(sq, device=q.device)[:, None]
    j = torch.arange(sk, device=q.device)[None, :]
    mask = torch.zeros(sq, sk, dtype=q.dtype, device=q.device)
    return mask.masked_fill(j > i + (sk - sq), torch.finfo(q.dtype).min)[None, None]


@register_impl("attention", "hf_eager", tags=("peer", "library"), available=_has_transformers)
def hf_eager(q, k, v, *, causal, scale):
    from transformers.models.llama.modeling_llama import eager_attention_forward

    layer = _LayerStub(q.shape[1] // k.shape[1], causal)
    out, _ = eager_attention_forward(layer, q, k, v, _additive_mask(q, k, causal), scaling=scale)
    return out.transpose(1, 2)


@register_impl("attention", "hf_sdpa", tags=("peer", "library"), available=_has_transformers)
def hf_sdpa(q, k, v, *, causal, scale):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = _LayerStub(q.shape[1] // k.shape[1], causal)
    # Like the model: no mask when square-causal (is_causal path), an explicit mask otherwise.
    mask = None if (not causal or q.shape[2] == k.shape[2]) else (_additive_mask(q, k, causal) == 0)
    out, _ = sdpa_attention_forward(layer, q, k, v, mask, scaling=scale, is_causal=causal)
    return out.transpose(1, 2)
