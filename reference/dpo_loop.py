"""The DPO training loop: a tiny Llama policy and its frozen copy as reference, trained with TRL's
``DPOTrainer`` (or a subclass that swaps the loss) on preference pairs read from a file the caller names.

Everything is offline: the model comes from a config (``reference/tiny_lm.py``), the tokenizer is trained
from a text corpus the caller names, the dataset is built in memory, ``report_to="none"``. The peak-memory
meter is passed in (this module imports nothing of the harness).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from twinbench.reference.outcome import LoopOutcome

# The tiny model trains on one CPU thread: OpenMP hand-offs cost more than the arithmetic at this size
# (docs/dpo.md has the measurement).
CPU_THREADS = 1


def trl_available(device: Any = None) -> tuple[bool, str]:
    import importlib.util

    missing = [m for m in ("trl", "transformers", "datasets", "tokenizers") if importlib.util.find_spec(m) is None]
    return (False, f"missing {', '.join(missing)} (pip install -e '.[train]')") if missing else (True, "")


def load_preferences(path: str | Path) -> list[dict[str, str]]:
    """Preference pairs: {"prompt", "chosen", "rejected"} per line (standard, non-conversational)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


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


def run_loop(trainer_cls: Any, *, preferences: str | Path, tokenizer_corpus: str | Path,
             rss_meter: Callable[[], Any], device: str, seed: int, steps: int, batch: int, lr: float, beta: float,
             loss: str) -> LoopOutcome:
    """Train with ``trainer_cls`` (``DPOTrainer`` or a subclass): outputs ``loss_curve`` and ``margin_curve``
    per step, metrics as measured. ``rss_meter()``: a context manager whose ``peak`` is the process's peak
    resident set size (bytes) during the block, read once at the start as well."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig
    from twinbench.reference.tiny_lm import build_model, build_tokenizer

    hf_logging.set_verbosity_error()
    tok = build_tokenizer(tokenizer_corpus)
    policy = build_model("llama", tok, seed=seed)
    ref = build_model("llama", tok, seed=seed)
    clock = _step_clock()
    with tempfile.TemporaryDirectory(prefix="twinbench-dpo-") as out:
        args = DPOConfig(
            output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=lr,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
            logging_steps=1, save_strategy="no", report_to="none", seed=seed, data_seed=seed,
            use_cpu=device == "cpu", disable_tqdm=True, max_length=128, beta=beta, loss_type=[loss],
            dataloader_num_workers=0, bf16=False, fp16=False, gradient_checkpointing=False)
        trainer = trainer_cls(model=policy, ref_model=ref, args=args, processing_class=tok,
                              train_dataset=Dataset.from_list(load_preferences(preferences)), callbacks=[clock])
        trainer.remove_callback(PrinterCallback)  # disable_tqdm would print every log line
        threads = torch.get_num_threads()
        if device == "cpu":
            torch.set_num_threads(CPU_THREADS)
        try:
            with rss_meter() as rss:
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
    return LoopOutcome(outputs={"loss_curve": torch.tensor(losses, dtype=torch.float64),
                                "margin_curve": torch.tensor(margins, dtype=torch.float64)}, metrics=metrics)
