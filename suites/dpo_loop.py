"""DPO training loop: a tiny Llama policy and its frozen copy as reference, trained on the preference set
shipped in ``suites/data/preferences.jsonl``; reference loop = TRL's ``DPOTrainer``; impls swap the loss.

Everything is offline: the model comes from a config (``reference/tiny_lm.py``), the tokenizer is trained
from text in the repo, the dataset is built in memory, ``report_to="none"``. An impl returns per-step
curves (``loss_curve``, ``margin_curve``) compared by the parity rule, plus ``metrics`` (the loss curve
as a list for the report, step time, tokens/s, peak memory).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from twinbench.harness.core.case import Case
from twinbench.harness.core.registry import Inputs, Suite, Tolerance, register_impl, register_suite

DATA = Path(__file__).resolve().parent / "data" / "preferences.jsonl"
LOSS_ATOL = 1e-4  # TRL's invariant tests: max |delta loss| 1e-4 in fp32 over 50 steps
# The tiny model trains on one CPU thread: on the shared 2-core box a [480, 64] x [64, 128] linear took
# 0.32 ms with 1 thread and 24.9 ms with 2 (OpenMP hand-offs cost more than the arithmetic at this size).
CPU_THREADS = 1


def load_preferences(path: Path = DATA) -> list[dict[str, str]]:
    """The shipped preference pairs: {"prompt", "chosen", "rejected"} (standard, non-conversational)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _case(steps, batch, lr, beta=0.1, loss="sigmoid") -> Case:
    return Case.of(model="llama", steps=steps, batch=batch, lr=lr, beta=beta, loss=loss)


QUICK = [_case(12, 4, 1e-3)]
FULL = [_case(50, 4, 1e-3), _case(50, 8, 5e-4, beta=0.5)]


def make_inputs(case: Case, device, seed: int) -> Inputs:
    static = {"device": str(device), "seed": int(seed), **{k: case[k] for k in ("steps", "batch", "lr", "beta",
                                                                                "loss")}}
    return Inputs(tensors={}, static=static, meta={"pairs": len(load_preferences())})


def _step_clock():
    """A ``TrainerCallback`` timing each optimizer step (built on call: transformers is optional)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.step_s: list[float] = []
            self._t0 = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.step_s.append(time.perf_counter() - self._t0)

    return StepClock()


def run_loop(trainer_cls: Any, *, device: str, seed: int, steps: int, batch: int, lr: float, beta: float,
             loss: str) -> dict[str, Any]:
    """Train with ``trainer_cls`` (``DPOTrainer`` or a subclass); per-step curves and self-measured metrics."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig
    from twinbench.harness.core.memory import RssSampler
    from twinbench.reference.tiny_lm import build_model, build_tokenizer

    hf_logging.set_verbosity_error()
    tok = build_tokenizer()
    policy = build_model("llama", seed=seed, tokenizer=tok)
    ref = build_model("llama", seed=seed, tokenizer=tok)
    clock = _step_clock()
    with tempfile.TemporaryDirectory(prefix="twinbench-dpo-") as out:
        args = DPOConfig(
            output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=lr,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
            logging_steps=1, save_strategy="no", report_to="none", seed=seed, data_seed=seed,
            use_cpu=device == "cpu", disable_tqdm=True, max_length=128, beta=beta, loss_type=[loss],
            dataloader_num_workers=0, bf16=False, fp16=False, gradient_checkpointing=False)
        trainer = trainer_cls(model=policy, ref_model=ref, args=args, processing_class=tok,
                              train_dataset=Dataset.from_list(load_preferences()), callbacks=[clock])
        trainer.remove_callback(PrinterCallback)  # disable_tqdm would print every log line
        threads = torch.get_num_threads()
        if device == "cpu":
            torch.set_num_threads(CPU_THREADS)
        try:
            with RssSampler(interval_s=0.005) as rss:
                start = rss.peak
                trainer.train()
        finally:
            torch.set_num_threads(threads)
        peak = rss.peak - start
    logs = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    steps_logged = sorted(logs)
    losses = [float(logs[s]["loss"]) for s in steps_logged]
    margins = [float(logs[s]["rewards/margins"]) for s in steps_logged]
    tokens = max([float(h.get("num_tokens", 0.0)) for h in trainer.state.log_history] + [0.0])  # cumulative
    step_s = clock.step_s[1:] or clock.step_s  # the first step pays one-time costs
    metrics = {
        "loss_curve": losses, "margin_curve": margins, "steps": len(losses),
        "step1_loss": losses[0] if losses else None, "step1_loss_minus_ln2": losses[0] - math.log(2) if losses else None,
        "median_step_ms": 1e3 * float(torch.tensor(step_s).median()) if step_s else None,
        "tokens_per_s": tokens / sum(clock.step_s) if clock.step_s and tokens else None,
        "peak_rss_bytes": int(max(0, peak)), "peak_method": "rss-sampler over trainer.train()",
    }
    return {"metrics": metrics, "loss_curve": torch.tensor(losses, dtype=torch.float64),
            "margin_curve": torch.tensor(margins, dtype=torch.float64)}


def tolerance(case: Case, output: str) -> Tolerance:
    if output == "loss_curve":
        return Tolerance(three_way=False, atol=LOSS_ATOL, max_rel_bound=0.0,
                         why="loss trajectory: max |delta loss| <= 1e-4 per step (TRL's fp32 invariant tests)")
    return Tolerance(three_way=False, atol=1e-4, rtol=1e-3, max_rel_bound=0.0,
                     why="reward-margin trajectory: |delta| <= 1e-4 + 1e-3 * max|margin|")


SUITE = register_suite(Suite(
    name="dpo_loop",
    description="DPO training of a tiny Llama on the shipped preference set: TRL DPOTrainer vs the same "
                "training with another loss; per-step loss and reward-margin trajectories",
    profiles={"quick": QUICK, "full": FULL},
    make_inputs=make_inputs,
    reference="reference",
    tolerance=tolerance,
    hi_dtype=lambda case: None,
    trials=1,
    three_way_reference=False,
    check_stability=False,
    timed=False,
    tags=("no-pytest-items",),
))


def trl_available(device) -> tuple[bool, str]:
    import importlib.util

    missing = [m for m in ("trl", "transformers", "datasets", "tokenizers") if importlib.util.find_spec(m) is None]
    return (False, f"missing {', '.join(missing)} (pip install -e '.[train]')") if missing else (True, "")


@register_impl("dpo_loop", "reference", tags=("reference",), available=trl_available, backward=False)
def reference(*, device, seed, steps, batch, lr, beta, loss):
    from trl import DPOTrainer

    return run_loop(DPOTrainer, device=device, seed=seed, steps=steps, batch=batch, lr=lr, beta=beta, loss=loss)
