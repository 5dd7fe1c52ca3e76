"""Reference DPO over an lm_head: full logits -> log-probs -> TRL 1.16 DPO loss, rewards and margins.

Plain PyTorch, dtype-following (the logits are computed in the inputs' dtype, so the harness can run it
upcast; as in TRL and Liger, log-probs of bf16/fp16 logits are taken in fp32). Semantics follow ``trl.trainer.dpo_trainer.DPOTrainer._compute_loss`` (TRL 1.16):

- a sequence's log-prob is the **sum** of its per-token log-probs over labels != ``ignore_index``;
- the batch is ``[chosen; rejected]`` on dim 0 (pair ``i`` is rows ``i`` and ``i + pairs``);
- ``delta = (pi_c - ref_c) - (pi_r - ref_r)``;
  ``sigmoid``: ``-logsigmoid(beta * delta)``;
  ``robust`` (TRL's label-smoothing form, Robust DPO):
  ``(-(1 - ls) * logsigmoid(beta * delta) + ls * logsigmoid(-beta * delta)) / (1 - 2 * ls)``;
  ``ipo``: each log-ratio divided by its completion-token count, ``(delta_avg - 1 / (2 * beta)) ** 2``;
  the loss is the mean over pairs. (TRL 1.16's ``sigmoid`` ignores ``label_smoothing``.)
- rewards are ``beta * (pi - ref)``, detached; margins = chosen rewards - rejected rewards.
- the reference model is frozen: its log-probs carry no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "robust")


def sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                   ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each sequence's labels and its token count. hidden [S, T, H], labels [S, T]."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    # TRL and Liger take log-probs of bf16/fp16 logits in fp32; fp32/fp64 inputs stay in their own dtype.
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels))  # any valid index; masked out below
    per_token = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, per_token, torch.zeros_like(per_token)).sum(-1), mask.sum(-1)


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair DPO losses (TRL 1.16 formulas) from sequence log-probs; the caller takes the mean."""
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    if loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo needs the completion-token counts")
        avg = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        return (avg - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown loss_type {loss_type!r} (one of {', '.join(LOSS_TYPES)})")


def linear_dpo(hidden: torch.Tensor, ref_hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               ref_weight: torch.Tensor, ref_bias: torch.Tensor | None, labels: torch.Tensor, *,
               beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
               ignore_index: int = -100) -> dict[str, torch.Tensor]:
    """DPO on last hidden states [2P, T, H] of policy and reference (chosen rows first), labels [2P, T]."""
    pairs = hidden.shape[0] // 2
    logps, tokens = sequence_logps(hidden, weight, bias, labels, ignore_index)
    with torch.no_grad():
        ref_logps, _ = sequence_logps(ref_hidden, ref_weight, ref_bias, labels, ignore_index)
    chosen, rejected = logps[:pairs], logps[pairs:]
    ref_chosen, ref_rejected = ref_logps[:pairs], ref_logps[pairs:]
    losses = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type,
                      label_smoothing=label_smoothing, chosen_tokens=tokens[:pairs].to(logps.dtype),
                      rejected_tokens=tokens[pairs:].to(logps.dtype))
    chosen_rewards = beta * (chosen - ref_chosen).detach()
    rejected_rewards = beta * (rejected - ref_rejected).detach()
    return {"loss": losses.mean(), "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
            "reward_margins": chosen_rewards - rejected_rewards, "chosen_logps": chosen.detach(),
            "rejected_logps": rejected.detach()}
