"""DPO training loop as an experiment: a tiny Llama policy and its frozen copy as reference, trained on the
preference set shipped in ``suites/data/preferences.jsonl``; reference loop = TRL's ``DPOTrainer``
(``reference/dpo_loop.py``); impls swap the loss.

An impl returns per-step curves (``loss_curve``, ``margin_curve``) compared with the reference loop's under
fixed bounds, plus its own metrics (the loss curve as a list for the report, step time, tokens/s, peak RSS).
"""

from __future__ import annotations

from typing import Any

from twinbench.harness.core.case import Case, Param
from twinbench.harness.core.experiment import Experiment, register_experiment
from twinbench.harness.core.memory import RssSampler
from twinbench.harness.core.registry import Tolerance, register_impl
from twinbench.reference.dpo_loop import load_preferences, run_loop, trl_available
from twinbench.suites.training_data import PREFERENCES, TOKENIZER_CORPUS

LOSS_ATOL = 1e-4  # TRL's invariant tests: max |delta loss| 1e-4 in fp32 over 50 steps


def _case(steps, batch, lr, beta=0.1, loss="sigmoid") -> Case:
    return Case.of(model="llama", steps=steps, batch=batch, lr=lr, beta=beta, loss=loss)


QUICK = [_case(12, 4, 1e-3)]
FULL = [_case(50, 4, 1e-3), _case(50, 8, 5e-4, beta=0.5)]


def rss_meter() -> RssSampler:
    return RssSampler(interval_s=0.005)


def arguments(case: Case, device: str, seed: int) -> dict[str, Any]:
    """``run_loop``'s keyword arguments for ``case``: data paths, the RSS meter, the training settings."""
    return {"preferences": PREFERENCES, "tokenizer_corpus": TOKENIZER_CORPUS, "rss_meter": rss_meter,
            "device": str(device), "seed": int(seed), **{k: case[k] for k in ("steps", "batch", "lr", "beta", "loss")}}


def bound(case: Case, output: str) -> Tolerance:
    if output == "loss_curve":
        return Tolerance(three_way=False, atol=LOSS_ATOL, max_rel_bound=0.0,
                         why="loss trajectory: max |delta loss| <= 1e-4 per step (TRL's fp32 invariant tests)")
    return Tolerance(three_way=False, atol=1e-4, rtol=1e-3, max_rel_bound=0.0,
                     why="reward-margin trajectory: |delta| <= 1e-4 + 1e-3 * max|margin|")


PARAMS = (Param("model", str, choices=("llama",)), Param("steps", int, low=1), Param("batch", int, low=1),
          Param("lr", float, low=0.0), Param("beta", float, low=1e-6),
          Param("loss", str))  # a TRL loss_type name

EXPERIMENT = register_experiment(Experiment(
    name="dpo_loop",
    description="DPO training of a tiny Llama on the shipped preference set: TRL DPOTrainer vs the same "
                "training with another loss; per-step loss and reward-margin trajectories",
    profiles={"quick": QUICK, "full": FULL},
    arguments=arguments,
    bound=bound,
    meta=lambda case: {"pairs": len(load_preferences(PREFERENCES))},
    params=PARAMS,
))


@register_impl("dpo_loop", "reference", tags=("reference",), available=trl_available, backward=False)
def reference(**arguments: Any):
    from trl import DPOTrainer

    return run_loop(DPOTrainer, **arguments)
