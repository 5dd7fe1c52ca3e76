"""The optimized QLoRA loop: the reference model with twinbench's implementations patched in, Unsloth-style.

Same checkpoint, same NF4 base, same peft adapters (same parameter objects, so the trajectories can be
compared weight by weight); only forwards change, through public transformers hooks where they exist:

- attention: a function registered with ``AttentionInterface`` (mask from ``AttentionMaskInterface``'s
  sdpa rule) that calls ``impls.attention_sdpa`` (the fused CPU/GPU SDPA kernel), or on CUDA our Triton
  FlashAttention (``impls.attention_triton_fa``) when it is available there. The reference runs "eager".
- NF4 + LoRA projections: q/k/v and gate/up as one fused autograd op each, o/down as the single-projection
  op (``impls.qlora_nf4_lora``).
- MoE experts: a function registered with ``ExpertsInterface`` that calls the sort + per-expert-GEMM op
  with hand-written backward (``impls.moe_ffn_sorted``) when importable, else transformers' "grouped_mm".
- RMSNorm: ``torch.nn.functional.rms_norm`` (one fused kernel) instead of six elementwise ops;
- optimizer: AdamW ``fused=True`` (one kernel for all adapters) and foreach gradient clipping;
- activation memory: decoder sub-blocks rebuilt in backward (``recompute``) instead of the reference's
  whole-layer checkpointing;
- loss: cross-entropy computed only at labelled positions, in row chunks (``labelled_loss``), instead of
  fp32 logits for every position; the padding mask is dropped for right-padded rows (causal attention
  never lets a real token see the pads that follow it), so the fused causal kernel runs.
``patch_model`` returns what it patched and, for each part it could not, why.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from twinbench.harness.core.registry import register_impl
from twinbench.impls.qlora.moe_lora import patch_lora_experts
from twinbench.impls.qlora.nf4_lora import (
    bias_free,
    nf4_lora_projections,
    silu_mul,
    single_projection,
    use_shared_single_op,
)
from twinbench.impls.qlora.recompute import patch_decoder_layers
from twinbench.reference.qlora.model import training_stack_available
from twinbench.reference.qlora.train import Meters

ATTN_NAME = "twinbench"
EXPERTS_NAME = "twinbench_moe"


# ---------------------------------------------------------------- attention


def _triton_fa(device: torch.device):
    """Our Triton FlashAttention on CUDA (never on the CPU: the interpreter is far too slow for a loop)."""
    if device.type != "cuda":
        return None
    try:
        from twinbench.harness.core.devices import find
        from twinbench.impls.attention import triton_fa as fa

        ok, _ = fa.available(find(f"cuda:{device.index or 0}"))
        return fa.flash_attention if ok else None
    except Exception:
        return None


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention-function contract: q/k/v [B, H, S, D] in, ([B, S, H, D], None) out."""
    from twinbench.impls.attention.sdpa import sdpa

    if attention_mask is None:  # causal only (the sdpa mask rule returns None then)
        fa = _triton_fa(query.device)
        out = (fa(query, key, value, causal=True, scale=scaling) if fa is not None
               else sdpa(query, key, value, causal=True, scale=scaling))
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                             enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def _fused_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                             **kwargs):
    """LlamaAttention / Qwen3MoeAttention.forward with q/k/v as one fused NF4+LoRA op."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    rope = sys.modules[type(self).__module__].apply_rotary_pos_emb
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q, k, v = nf4_lora_projections(hidden_states, [self.q_proj, self.k_proj, self.v_proj])
    q, k, v = q.view(hidden_shape), k.view(hidden_shape), v.view(hidden_shape)
    if hasattr(self, "q_norm"):  # Qwen3: per-head RMSNorm before RoPE
        q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    cos, sin = position_embeddings
    q, k = rope(q, k, cos, sin)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, attention_forward)
    out, weights = attend(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
    out = out.reshape(*input_shape, -1).contiguous()
    return single_projection(out, self.o_proj).to(hidden_states.dtype), weights


def _fused_mlp_forward(self, x):
    gate, up = nf4_lora_projections(x, [self.gate_proj, self.up_proj])
    act = silu_mul(gate, up) if type(self.act_fn).__name__ in ("SiLU", "SiLUActivation") else self.act_fn(gate) * up
    return single_projection(act, self.down_proj).to(x.dtype)


def _rms_norm_forward(self, hidden_states):
    """transformers' RMSNorm (fp32 statistics, weight applied in the input dtype) as one fused kernel."""
    normed = F.rms_norm(hidden_states.float(), (hidden_states.shape[-1],), None, self.variance_epsilon)
    return self.weight * normed.to(hidden_states.dtype)


# ---------------------------------------------------------------- MoE


def experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """ExpertsInterface contract; peft's parametrization makes ``self.gate_up_proj`` = W + B A."""
    from twinbench.impls.moe_ffn.sorted_experts import sorted_experts

    return sorted_experts(hidden_states, top_k_index, top_k_weights.to(hidden_states.dtype),
                          self.gate_up_proj, self.down_proj)


def _register_experts() -> str:
    """Our sorted-experts op when importable (name registered), else transformers' grouped_mm."""
    from transformers.integrations.moe import ExpertsInterface

    try:
        import twinbench.impls.moe_ffn.sorted_experts  # noqa: F401
    except Exception as exc:
        return f"grouped_mm (transformers; impls.moe_ffn.sorted_experts unavailable: {type(exc).__name__}: {exc})"
    ExpertsInterface.register(EXPERTS_NAME, experts_forward)
    return EXPERTS_NAME


# ---------------------------------------------------------------- patching


def _is_lora_nf4(layer) -> bool:
    base = getattr(layer, "base_layer", None)
    return base is not None and getattr(getattr(base, "weight", None), "quant_state", None) is not None \
        and hasattr(layer, "lora_A") and len(getattr(layer, "active_adapters", [])) == 1 and bias_free(layer)


def patch_model(peft_model, checkpointing: bool = False, shared_single_op: bool = True,
                recompute_experts: bool = True,
                recompute: tuple[str, ...] = ("attn", "dense_mlp")) -> dict[str, Any]:
    """Patch attention, projections, norms, experts in place; return {part: what runs} and {part: why not}.

    ``checkpointing=False`` turns off the reference's per-layer activation checkpointing; ``recompute`` then
    picks the sub-blocks rebuilt in backward instead (``impls.qlora_recompute``). The default: attention as
    one op keeping its input, output and log-sum-exp (``impls.qlora_attention_op``), the dense SwiGLU MLP as
    one op keeping its input. Measured (docs/qlora.md, fp32 CPU, lockstep): 0.51-0.56x the reference's
    step time at 0.53-0.74x its live-tensor peak; keeping every activation (``()``) is no faster and holds
    0.86-1.52x.
    ``checkpointing=True`` keeps the reference's whole-layer checkpointing (slower, no less memory).
    ``recompute_experts``: the MoE experts' LoRA op keeps only its inputs and rebuilds its activations in
    backward (less step memory for a little more time: docs/qlora.md).
    """
    model = peft_model.get_base_model()
    patched: dict[str, Any] = {}
    missing: dict[str, str] = {}
    on = getattr(model, "is_activation_checkpointing", None)  # transformers 5 name; 4.x: is_gradient_...
    if not checkpointing and (on if on is not None else getattr(model, "is_gradient_checkpointing", False)):
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        patched["activation_checkpointing"] = "off (the reference checkpoints every decoder layer)"
    try:
        _register_attention()
        model.set_attn_implementation(ATTN_NAME)
        patched["attention"] = "impls.attention_sdpa (Triton FA on CUDA when available)"
    except Exception as exc:
        missing["attention"] = f"{type(exc).__name__}: {exc}"
    n_attn = n_mlp = 0
    for module in model.modules():
        if all(_is_lora_nf4(getattr(module, p, None)) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            module.forward = types.MethodType(_fused_attention_forward, module)
            n_attn += 1
        elif all(_is_lora_nf4(getattr(module, p, None)) for p in ("gate_proj", "up_proj", "down_proj")):
            module.forward = types.MethodType(_fused_mlp_forward, module)
            n_mlp += 1
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon")]
    for module in norms:
        module.forward = types.MethodType(_rms_norm_forward, module)
    if norms:
        patched["rms_norm"] = f"torch.nn.functional.rms_norm ({len(norms)} norms)"
    if n_attn or n_mlp:
        singles = [getattr(m, p) for m in model.modules() for p in ("o_proj", "down_proj")
                   if _is_lora_nf4(getattr(m, p, None))]
        single_ok, single_why = use_shared_single_op(model, singles) if shared_single_op else (False, "not asked")
        single = "impls.quant_linear_fused.nf4_lora_linear" if single_ok else "impls.qlora_nf4_lora"
        patched["nf4_lora"] = (f"impls.qlora_nf4_lora fused q/k/v ({n_attn} layers), gate/up ({n_mlp} layers); "
                               f"o/down: {single}")
        if not single_ok:
            missing["nf4_lora_single"] = single_why
    else:
        missing["nf4_lora"] = "no LoRA-over-NF4 projections found"
    if any(type(m).__name__.endswith("Experts") for m in model.modules()):
        name = _register_experts()
        model.set_experts_implementation(EXPERTS_NAME if name == EXPERTS_NAME else "grouped_mm")
        patched["moe_experts"] = "impls.moe_ffn_sorted" if name == EXPERTS_NAME else name
        n_lora, why = patch_lora_experts(model, recompute=recompute_experts)
        if n_lora:
            patched["moe_expert_lora"] = f"impls.qlora_moe_lora: W + B A never built ({n_lora} blocks)"
        if why:
            missing["moe_expert_lora"] = why
    if recompute and not checkpointing:
        n_layers = patch_decoder_layers(model, recompute)
        patched["recompute"] = (f"sub-blocks rebuilt in backward: {'+'.join(recompute)} "
                                f"({n_layers} layers; impls.qlora_recompute)")
    patched["loss"] = "labelled-positions cross-entropy (impls.qlora_patched.labelled_loss)"
    return {"patched": patched, "not_patched": missing}


# ---------------------------------------------------------------- loss


def labelled_loss(model, batch: dict[str, torch.Tensor], chunk_rows: int = 4096) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions only; logits exist one row chunk at a time."""
    causal_lm = model.get_base_model()
    mask = batch["attention_mask"]
    right_padded = bool((mask.cummin(dim=1).values == mask).all())
    hidden = causal_lm.model(input_ids=batch["input_ids"], attention_mask=None if right_padded else mask,
                             use_cache=False).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    rows, targets = hidden[:, :-1][keep], labels[keep]
    total = hidden.new_zeros((), dtype=torch.float32)

    def chunk_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(causal_lm.lm_head(h).float(), t, reduction="sum")

    for i in range(0, rows.shape[0], chunk_rows):  # checkpointed: backward rebuilds each chunk's logits
        total = total + checkpoint(chunk_loss, rows[i:i + chunk_rows], targets[i:i + chunk_rows],
                                   use_reentrant=False)
    return total / max(int(keep.sum()), 1)


# ---------------------------------------------------------------- the impl


@register_impl("qlora", "patched", tags=("ours",), available=training_stack_available, backward=False,
               deterministic=False)
def patched(*, config, device: str, meters: Meters):
    """The reference experiment with ``patch_model`` applied and ``labelled_loss`` as the loss."""
    from twinbench.reference.qlora.experiment import run_experiment

    return run_experiment(config, meters, device, prepare=patch_model, loss_fn=labelled_loss, fused_optimizer=True)
