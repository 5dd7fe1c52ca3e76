"""Peer: transformers' ``Qwen3MoeTopKRouter`` (v5), called functionally on the harness's router weight, with
transformers' ``load_balancing_loss_func`` for the aux loss (z-loss: transformers has none for Qwen3-MoE,
so it is computed here the reference's way).

It selects with ``torch.topk``, whose tie-breaking is unspecified, so it cannot meet the lowest-index rule
on tie rows: those cases are skipped with that reason (tests/test_gating.py shows the harness catches it
when forced). Natural exact ties in bf16 logits make it `wrong` on the seed profile (docs/moe.md, "Findings").
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from twinbench.harness.core.registry import register_impl


def _has_transformers(device) -> tuple[bool, str]:
    if importlib.util.find_spec("transformers") is None:
        return False, "transformers not installed (pip install 'twinbench[train]')"
    try:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter  # noqa: F401
    except Exception as exc:
        return False, f"transformers has no Qwen3MoeTopKRouter: {type(exc).__name__}: {exc}"
    return True, ""


def _no_tie_rows(case, device) -> tuple[bool, str]:
    if case.get("tie_rows", 0):
        return False, ("torch.topk breaks ties arbitrarily (all-zero row -> experts 44, 41, 42, ... here): "
                       "not the lowest-index rule; judged only on cases without tie rows")
    return True, ""


@functools.lru_cache(maxsize=32)
def _router(experts: int, hidden: int, top_k: int, norm: bool):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    config = Qwen3MoeConfig(hidden_size=hidden, num_experts=experts, num_experts_per_tok=top_k,
                            norm_topk_prob=norm)
    with torch.device("meta"):
        return Qwen3MoeTopKRouter(config)


def route(hidden_states, router_weight, *, top_k, norm_topk_prob):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    e, h = router_weight.shape
    router = _router(e, h, top_k, norm_topk_prob)
    logits, weights, ids = torch.func.functional_call(router, {"weight": router_weight}, (hidden_states,))
    finite = torch.isfinite(logits).all(-1)     # the reference's rule: non-finite tokens leave the losses
    aux = load_balancing_loss_func((logits[finite],), e, top_k)
    z = torch.logsumexp(logits[finite].float(), dim=-1).square().mean()
    return {"weights": weights, "ids": ids, "aux_loss": aux, "z_loss": z}


register_impl("gating", "hf_qwen3_router", tags=("peer", "library"), available=_has_transformers,
              supports=_no_tie_rows)(route)
