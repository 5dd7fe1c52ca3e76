"""Liger-Kernel's fused linear DPO (``LigerFusedLinearDPOFunction``): chunks pairs, torch.func grads in forward.

Run eagerly (``compiled=False``): its ``torch.compile`` path recompiles per shape and costs tens of seconds
on the CPU before the first call. Liger has no IPO ("needs per-sample completion-token counts").
"""

from __future__ import annotations

import importlib.util

from twinbench.harness.core.registry import register_impl


def _available(device) -> tuple[bool, str]:
    if importlib.util.find_spec("liger_kernel") is None:
        return False, "liger_kernel is not installed (pip install liger-kernel)"
    return True, ""


def _supports(case, device) -> tuple[bool, str]:
    if case.get("loss") not in ("sigmoid", "robust"):
        return False, f"Liger's DPO has no loss_type {case.get('loss')!r}"
    return True, ""


@register_impl("dpo", "liger", tags=("library", "peer"), available=_available, supports=_supports)
def liger(hidden, ref_hidden, weight, bias, ref_weight, ref_bias, labels, *, beta, loss_type, label_smoothing,
          ignore_index):
    from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOFunction

    loss, aux = LigerFusedLinearDPOFunction.apply(
        hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias, ignore_index, beta,
        False,  # compute_nll_loss
        False,  # compiled
        True,   # use_ref_model
        False,  # average_log_prob: TRL sums log-probs over the completion
        1,      # chunk_size: one pair per chunk (Liger's default)
        loss_type, label_smoothing)
    chosen_logps, rejected_logps, _, _, _, chosen_rewards, rejected_rewards = aux
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {"loss": loss, "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
            "reward_margins": chosen_rewards - rejected_rewards, "chosen_logps": chosen_logps.detach(),
            "rejected_logps": rejected_logps.detach()}
