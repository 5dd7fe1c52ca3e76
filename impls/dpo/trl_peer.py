"""TRL 1.16's own fused LM head kernel (``trl.kernels.ChunkedLogProbFunction``, what ``DPOTrainer`` calls
through ``fused_lm_head=True``) for per-token log-probs, then DPOTrainer's loss arithmetic.

TRL 1.16 has no standalone DPO loss function (the formulas live inside ``DPOTrainer._compute_loss``), so
they are transcribed here line for line: sum over the completion, ``[chosen; rejected]`` chunks,
sigmoid / ipo (token-count normalised) / robust, mean over pairs, detached rewards. Like TRL on a device
without Triton, every position is scored and ignored labels are zeroed afterwards.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from twinbench.harness.core.registry import register_impl

VOCAB_CHUNK = 32768  # TRL's _CHUNKED_LOGPROB_CHUNK_SIZE


def _available(device) -> tuple[bool, str]:
    if importlib.util.find_spec("trl") is None:
        return False, "trl is not installed (pip install trl)"
    try:
        from trl.kernels import ChunkedLogProbFunction  # noqa: F401
    except Exception as exc:  # older TRL: no fused LM head kernel
        return False, f"trl.kernels.ChunkedLogProbFunction unavailable: {type(exc).__name__}: {exc}"
    return True, ""


def _token_logps(hidden, weight, bias, labels, ignore_index):
    from trl.kernels import ChunkedLogProbFunction

    mask = labels != ignore_index
    safe = labels.masked_fill(~mask, 0).reshape(-1)
    log_probs = ChunkedLogProbFunction.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, safe, 1.0,
                                             VOCAB_CHUNK, None, 1.0, ())[0]
    return log_probs.view(mask.shape).masked_fill(~mask, 0), mask


@register_impl("dpo", "trl_chunked", tags=("library", "peer"), available=_available)
def trl_chunked(hidden, ref_hidden, weight, bias, ref_weight, ref_bias, labels, *, beta, loss_type,
                label_smoothing, ignore_index):
    per_token, mask = _token_logps(hidden, weight, bias, labels, ignore_index)
    with torch.no_grad():
        ref_per_token, _ = _token_logps(ref_hidden, ref_weight, ref_bias, labels, ignore_index)
    chosen_logps, rejected_logps = per_token.sum(dim=1).chunk(2, dim=0)
    ref_chosen_logps, ref_rejected_logps = ref_per_token.sum(dim=1).chunk(2, dim=0)
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    delta_score = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        per_sequence_loss = -F.logsigmoid(beta * delta_score)
    elif loss_type == "ipo":
        chosen_mask, rejected_mask = mask.chunk(2, dim=0)
        chosen_avg_score = chosen_logratios / chosen_mask.sum(dim=1).clamp(min=1.0)
        rejected_avg_score = rejected_logratios / rejected_mask.sum(dim=1).clamp(min=1.0)
        per_sequence_loss = (chosen_avg_score - rejected_avg_score - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        clean_loss_term = -(1 - label_smoothing) * F.logsigmoid(beta * delta_score)
        flipped_loss_term = -label_smoothing * F.logsigmoid(-beta * delta_score)
        per_sequence_loss = (clean_loss_term - flipped_loss_term) / (1 - 2 * label_smoothing)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return {"loss": per_sequence_loss.mean(), "chosen_rewards": chosen_rewards,
            "rejected_rewards": rejected_rewards, "reward_margins": chosen_rewards - rejected_rewards,
            "chosen_logps": chosen_logps.detach(), "rejected_logps": rejected_logps.detach()}
