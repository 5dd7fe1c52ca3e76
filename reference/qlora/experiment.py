"""The whole QLoRA experiment as the suite judges it: checkpoint -> NF4+LoRA model (``prepare`` may patch it)
-> probe, train, probe -> merge to 16 bit, save, reload, probe -> lm-eval; the outputs another loop is
compared on and the loop's own measurements."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from twinbench.reference.outcome import LoopOutcome
from twinbench.reference.qlora.config import HEAD_STEPS, LoopConfig
from twinbench.reference.qlora.evaluate import lm_eval_scores
from twinbench.reference.qlora.model import (
    hf_loss,
    load_qlora_model,
    merge_to_16bit_and_reload,
    save_base_checkpoint,
)
from twinbench.reference.qlora.probe import probe
from twinbench.reference.qlora.train import Meters, train


def run_experiment(cfg: LoopConfig, meters: Meters, device: str = "cpu", workdir: str | Path | None = None,
                   prepare: Callable[[Any], dict[str, Any]] | None = None, loss_fn=hf_loss,
                   evaluate: bool = True, fused_optimizer: bool = False) -> LoopOutcome:
    """One loop, end to end. Outputs: ``loss_curve``, ``loss_curve_head``, ``first_grads``, ``final_lora``,
    ``probe_hits`` (before, after, merged; -1 where not run), ``lm_eval_acc``; ``prepare``'s report (what it
    patched) goes into the metrics."""
    previous_threads = torch.get_num_threads()
    if cfg.cpu_threads and not str(device).startswith("cuda"):
        torch.set_num_threads(cfg.cpu_threads)
    threads_used = torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            tok = save_base_checkpoint(cfg, Path(tmp) / "base")
            model = load_qlora_model(Path(tmp) / "base", cfg, device)
            patches = prepare(model) if prepare is not None else {}
            result = train(model, tok, cfg, meters, device, loss_fn, fused_optimizer)
            merged = merge_to_16bit_and_reload(model, tok, cfg, tmp, Path(tmp) / "base", device) if evaluate else None
            probe_merged = probe(merged, tok, cfg, device) if merged is not None else None
            scores = lm_eval_scores(merged, tok, cfg.data.lm_eval_task, device) if merged is not None else {}
    finally:
        torch.set_num_threads(previous_threads)
    probes = {"before": result.probe_before, "after": result.probe_after, "merged_16bit": probe_merged}
    seconds = sum(result.step_times_s)
    metrics = {
        "loss_curve": [float(x) for x in result.loss_curve],
        "median_step_s": result.median_step_s,
        "tokens_per_s": sum(result.tokens_per_step) / seconds if seconds else None,
        "peak_memory_bytes": result.peak_memory_bytes,
        "peak_tensor_bytes": result.peak_tensor_bytes,
        "trainable_parameters": result.trainable_parameters,
        "probe_hits": {k: sum(p.hits) for k, p in probes.items() if p is not None},
        "probe_responses": {k: [p.greedy, *p.samples] for k, p in probes.items() if p is not None},
        "lm_eval": scores,
        "cpu_threads": threads_used,
        **patches,
    }
    hits = [sum(p.hits) if p is not None else -1 for p in probes.values()]
    outputs = {
        "loss_curve": torch.tensor(result.loss_curve, dtype=torch.float64),
        "loss_curve_head": torch.tensor(result.loss_curve[:HEAD_STEPS], dtype=torch.float64),
        "first_grads": result.first_grads,
        "final_lora": result.final_lora,
        "probe_hits": torch.tensor(hits, dtype=torch.int64),  # before, after, merged: judged absolutely
        "lm_eval_acc": torch.tensor([lm_eval_acc(scores)], dtype=torch.float64),
    }
    return LoopOutcome(outputs=outputs, metrics=metrics)


def lm_eval_acc(scores: dict[str, float]) -> float:
    return scores.get("acc", float("nan"))
