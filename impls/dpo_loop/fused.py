"""The DPO loop with our fused loss: ``DPOTrainer`` with only the loss swapped for ``fused_linear_dpo``.

Data, collation, optimizer, schedule and logging stay TRL's; the policy and reference backbones give last
hidden states, and our fused linear DPO goes from them (and both lm_heads) to the loss without building
logits. The same metrics TRL logs for DPO (rewards, margins, accuracies, log-probs) are recorded.
"""

from __future__ import annotations

from typing import Any

from twinbench.harness.core.registry import register_impl
from twinbench.impls.dpo.fused_torch import fused_linear_dpo
from twinbench.reference.dpo_loop import run_loop, trl_available

_TRAINER = None


def fused_dpo_trainer():
    """``DPOTrainer`` subclass whose loss is our fused linear DPO (class built once; trl is optional)."""
    global _TRAINER
    if _TRAINER is not None:
        return _TRAINER
    import torch
    from trl import DPOTrainer

    class FusedDPOTrainer(DPOTrainer):
        loss_fn = staticmethod(fused_linear_dpo)  # tests plant wrong losses by overriding this

        def _compute_loss(self, model, inputs, return_outputs):
            if return_outputs or self.precompute_ref_logps or self.ld_alpha is not None \
                    or self.f_divergence_type != "reverse_kl" or len(self.loss_types) != 1:
                raise NotImplementedError("the fused loop covers plain DPO (one loss type, live reference model)")
            mode = "train" if self.model.training else "eval"
            # labels as TRL builds them: completion tokens only, shifted by one
            labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)[:, 1:]
            kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                      "use_cache": False}
            hidden = model.base_model(**kwargs).last_hidden_state[:, :-1]
            with torch.no_grad():
                ref_hidden = self.ref_model.base_model(**kwargs).last_hidden_state[:, :-1]
            head, ref_head = model.get_output_embeddings(), self.ref_model.get_output_embeddings()
            out = self.loss_fn(hidden, ref_hidden, head.weight, head.bias, ref_head.weight, ref_head.bias, labels,
                               beta=self.beta, loss_type=self.loss_types[0], label_smoothing=self.label_smoothing)
            m = self._metrics[mode]
            m["rewards/chosen"].append(out["chosen_rewards"].mean().item())
            m["rewards/rejected"].append(out["rejected_rewards"].mean().item())
            m["rewards/accuracies"].append((out["chosen_rewards"] > out["rejected_rewards"]).float().mean().item())
            m["rewards/margins"].append(out["reward_margins"].mean().item())
            m["logps/chosen"].append(out["chosen_logps"].mean().item())
            m["logps/rejected"].append(out["rejected_logps"].mean().item())
            if mode == "train":
                self._total_train_tokens += int(inputs["attention_mask"].sum())
            m["num_tokens"] = [self._total_train_tokens]
            return out["loss"]

    _TRAINER = FusedDPOTrainer
    return _TRAINER


@register_impl("dpo_loop", "fused_loss", tags=("ours",), available=trl_available, backward=False)
def fused_loss(**arguments: Any):
    """The reference loop's arguments (data, meter, settings), with the fused-loss trainer."""
    return run_loop(fused_dpo_trainer(), **arguments)
