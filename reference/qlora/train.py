"""The one training-step loop of every QLoRA loop (reference, patched, the bench): ``Trainer.step()`` is one
optimizer step (AdamW over the LoRA weights, ``grad_accum`` micro-batches), and ``run_steps`` drives one or
several trainers in lockstep on one step schedule that decides which steps are timed and which measured.

The memory meters are passed in (``Meters``): this package imports nothing of the harness.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from twinbench.reference.qlora.breakdown import scope
from twinbench.reference.qlora.config import LoopConfig
from twinbench.reference.qlora.data import micro_batches
from twinbench.reference.qlora.model import flat, hf_loss, lora_parameters
from twinbench.reference.qlora.probe import ProbeResult, probe


@dataclass(frozen=True)
class Meters:
    """Context-manager factories; each object has ``peak`` (bytes) after its block. ``memory``: the step's
    peak memory above the level before it (allocator on CUDA, sampled RSS on the CPU); ``tensors``: the
    peak of live tensor storages allocated inside the step."""

    memory: Callable[[], Any]
    tensors: Callable[[], Any]


class StepRole(enum.Enum):
    TIMED = "timed"
    MEMORY = "memory"  # not timed: the heap is trimmed first, so the step faults its pages back in
    TENSORS = "tensors"  # not timed: the live-tensor meter does Python bookkeeping per op


MEMORY_EVERY = 4  # peak memory on 0-based steps 1, 5, 9, ..., live tensors on 3, 7, 11, ...; the rest timed


def step_role(i: int, steps: int, every: int = MEMORY_EVERY) -> StepRole:
    """The role of 0-based step ``i`` of ``steps``; the first step (optimizer state) is never measured."""
    if i % every == 1 or steps == 1:
        return StepRole.MEMORY
    if i % every == every - 1:
        return StepRole.TENSORS
    return StepRole.TIMED


class Trainer:
    """AdamW over the LoRA weights, ``grad_accum`` micro-batches per ``step()``; records loss and timing."""

    def __init__(self, model, tokenizer, cfg: LoopConfig, device: str = "cpu",
                 loss_fn: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor] = hf_loss, fused: bool = False):
        self.model, self.tokenizer, self.cfg, self.device, self.loss_fn = model, tokenizer, cfg, device, loss_fn
        self.params = lora_parameters(model)
        trainable = [p for p in self.params.values() if p.requires_grad]
        # reference: the plain per-parameter AdamW loop; ``fused``: one fused kernel (same formula)
        self.fused = fused
        self.optimizer = torch.optim.AdamW(trainable or [torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate,
                                           weight_decay=cfg.weight_decay, foreach=False, fused=fused)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda i: max(0.0, 1 - i / cfg.steps))
        self.batches = micro_batches(tokenizer, cfg)
        self.loss_curve: list[float] = []
        self.step_times_s: list[float] = []
        self.tokens_per_step: list[int] = []
        self.first_grads: torch.Tensor | None = None

    def step(self) -> float:
        self.model.train()
        micro = [{k: v.to(self.device) for k, v in next(self.batches).items()} for _ in range(self.cfg.grad_accum)]
        n_labels = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        t0 = time.perf_counter()
        total = 0.0
        for b in micro:
            # each micro-batch's mean loss, weighted by its share of labelled tokens: equals the big-batch mean
            share = int((b["labels"][:, 1:] != -100).sum()) / max(n_labels, 1)
            loss = self.loss_fn(self.model, b)
            if loss.requires_grad:  # a loop with frozen adapters has nothing to differentiate
                (loss * share).backward()
            total += float(loss.detach()) * share
            del loss  # its spent graph still holds tensors (the embedding output) into the next forward
        if self.first_grads is None:
            self.first_grads = flat([p.grad for p in self.params.values()], list(self.params.values()))
        with scope("optimizer"):
            if self.cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.params.values(), self.cfg.max_grad_norm, foreach=self.fused)
            self.optimizer.step()
            self.schedule.step()
            self.optimizer.zero_grad(set_to_none=True)
        if str(self.device).startswith("cuda"):
            torch.cuda.synchronize(self.device)
        self.step_times_s.append(time.perf_counter() - t0)
        self.tokens_per_step.append(int(sum(int(b["attention_mask"].sum()) for b in micro)))
        self.loss_curve.append(total)
        return total


@dataclass
class StepLog:
    """What ``run_steps`` measured for one loop; ``timed``: 0-based indices of the timed steps (the first
    step, which allocates the optimizer state, only when nothing else was timed)."""

    memory_peaks: list[int] = field(default_factory=list)
    tensor_peaks: list[int] = field(default_factory=list)
    timed: list[int] = field(default_factory=list)


def run_steps(trainers: Mapping[str, Trainer], steps: int, meters: Meters) -> dict[str, StepLog]:
    """``steps`` optimizer steps of every trainer, interleaved step by step (A B A B ...), each step in the
    role ``step_role`` gives it, so two loops are measured under the same conditions."""
    logs = {name: StepLog() for name in trainers}
    timed: list[int] = []
    for i in range(steps):
        role = step_role(i, steps)
        for name, trainer in trainers.items():
            if role is StepRole.MEMORY:
                with meters.memory() as meter:
                    trainer.step()
                logs[name].memory_peaks.append(meter.peak)
            elif role is StepRole.TENSORS:
                with meters.tensors() as meter:
                    trainer.step()
                logs[name].tensor_peaks.append(meter.peak)
            else:
                trainer.step()
        if role is StepRole.TIMED:
            timed.append(i)
    for log in logs.values():
        log.timed = timed[1:] or timed
    return logs


@dataclass
class LoopResult:
    loss_curve: list[float]
    first_grads: torch.Tensor  # LoRA gradients of the first optimizer step, flattened in name order
    final_lora: torch.Tensor  # LoRA weights after the last step, flattened in name order
    step_times_s: list[float]  # the timed steps' (the first step's one-off warm-up excluded)
    tokens_per_step: list[int]  # of the same steps
    peak_memory_bytes: int
    peak_tensor_bytes: int | None  # None: too few steps for a live-tensor step
    trainable_parameters: int
    probe_before: ProbeResult
    probe_after: ProbeResult

    @property
    def median_step_s(self) -> float:
        times = sorted(self.step_times_s)
        return times[len(times) // 2]


def train(model, tokenizer, cfg: LoopConfig, meters: Meters, device: str = "cpu", loss_fn=hf_loss,
          fused: bool = False) -> LoopResult:
    """Probe, ``cfg.steps`` optimizer steps (``run_steps``'s schedule), probe again."""
    before = probe(model, tokenizer, cfg, device)
    trainer = Trainer(model, tokenizer, cfg, device, loss_fn, fused)
    log = run_steps({"loop": trainer}, cfg.steps, meters)["loop"]
    after = probe(model, tokenizer, cfg, device)
    params = list(trainer.params.values())
    return LoopResult(
        loss_curve=trainer.loss_curve, first_grads=trainer.first_grads, final_lora=flat(params, params),
        step_times_s=[trainer.step_times_s[i] for i in log.timed] or trainer.step_times_s,
        tokens_per_step=[trainer.tokens_per_step[i] for i in log.timed] or trainer.tokens_per_step,
        peak_memory_bytes=max(log.memory_peaks), peak_tensor_bytes=max(log.tensor_peaks, default=None),
        trainable_parameters=sum(p.numel() for p in params if p.requires_grad), probe_before=before,
        probe_after=after)
