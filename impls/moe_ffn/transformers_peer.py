"""Peers: transformers' Qwen3-MoE experts (v5 layout) with ``_experts_implementation`` eager / grouped_mm /
batched_mm, called functionally so the harness's leaf tensors are the expert weights."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from twinbench.harness.core.registry import register_impl


def _has_transformers(device) -> tuple[bool, str]:
    if importlib.util.find_spec("transformers") is None:
        return False, "transformers not installed (pip install 'twinbench[train]')"
    try:
        from transformers.models.qwen3_moe import modeling_qwen3_moe  # noqa: F401
    except Exception as exc:  # an older transformers without the v5 experts module
        return False, f"transformers has no Qwen3-MoE experts: {type(exc).__name__}: {exc}"
    return True, ""


@functools.lru_cache(maxsize=32)
def _experts_module(implementation: str, experts: int, hidden: int, inter: int):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts,
                            num_experts_per_tok=1, hidden_act="silu")
    config._experts_implementation = implementation
    with torch.device("meta"):  # the parameters come from the harness on every call
        return Qwen3MoeExperts(config)


def _run(implementation, hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj):
    e, two_i, h = gate_up_proj.shape
    module = _experts_module(implementation, e, h, two_i // 2)
    params = {"gate_up_proj": gate_up_proj, "down_proj": down_proj}
    return torch.func.functional_call(module, params, (hidden_states, top_k_index, top_k_weights))


def _batched_mm_bytes(case) -> float:
    """batched_mm gathers one weight copy per (token, slot): S * (2IH + HI) elements, plus their grads."""
    from twinbench.harness.core.inputs import elem_bytes

    s = case["batch"] * case["seq"] * case["top_k"]
    per_row = 3 * case["inter"] * case["hidden"]
    return 2.0 * s * per_row * elem_bytes(case["dtype"])


def _batched_mm_fits(case, device) -> tuple[bool, str]:
    limit = float(os.environ.get("TWINBENCH_BATCHED_MM_MAX_BYTES", 4 * 2**30))
    need = _batched_mm_bytes(case)
    if need > limit:
        return False, (f"batched_mm would gather ~{need / 2**30:.1f} GiB of per-token weight copies (> "
                       f"{limit / 2**30:.1f} GiB guard; it was OOM-killed at 512 tokens x 64 experts on 24 GB)")
    return True, ""


@register_impl("moe_ffn", "hf_eager", tags=("peer", "library"), available=_has_transformers)
def hf_eager(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj):
    return _run("eager", hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj)


# Not bitwise reproducible at size: the backward of its row gather ``hidden_states[perm // top_k]`` (every
# token k times) accumulates with index_put_, in parallel on the CPU above a grain size, so two identical
# calls at the bench shape can give different gradients (docs/moe.md, "Findings").
@register_impl("moe_ffn", "hf_grouped_mm", tags=("peer", "library"), available=_has_transformers,
               deterministic=False)
def hf_grouped_mm(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj):
    return _run("grouped_mm", hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj)


# Not bitwise reproducible: its weight gradients accumulate through the backward of
# ``gate_up_proj[expert_ids]`` (index_put_ with accumulate), whose order varies run to run on the CPU
# (the observed spread: docs/moe.md, "Findings").
@register_impl("moe_ffn", "hf_batched_mm", tags=("peer", "library"), available=_has_transformers,
               supports=_batched_mm_fits, deterministic=False)
def hf_batched_mm(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj):
    return _run("batched_mm", hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj)
