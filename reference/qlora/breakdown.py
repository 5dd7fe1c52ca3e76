"""Per-op time breakdown of one training step: ``torch.profiler`` events grouped into the parts of a QLoRA loop.

Every profiled op's *self* CPU time (its children excluded, so nothing counts twice) goes to the category of
its nearest labelled ancestor:

- forward: labels pushed by module hooks (``self_attn``/``input_layernorm`` -> attention, ``mlp``/
  ``post_attention_layernorm`` -> mlp_experts, peft's ``lora_A``/``lora_B``/``lora_dropout`` -> lora) and by
  ``scope`` inside the patched loop's fused ops, which call no submodules;
- backward: the autograd node (``autograd::engine::evaluate_function: XBackward``) takes the category of the
  forward op with the same ``sequence_nr`` (the profiler links them), unless its own name says more;
- by name everywhere: NF4 dequantisation (bitsandbytes' and ours) -> nf4, ``Optimizer.*`` -> optimizer.
Whatever is left (embedding, final norm, lm_head, loss, data movement) is ``other``.

The NF4 GEMMs themselves run in their sub-block's category in both loops (the patched ops fuse the frozen
GEMM with the adapter accumulation; bitsandbytes' ``gemm_4bit`` is dequantise + ``linear``): ``nf4`` is the
dequantisation, which both loops run three times per weight and micro-batch (forward, recompute, dx).
Labels cost nothing when no profiler runs (``scope`` checks first). CPU time only: on CUDA it is launch time.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

CATEGORIES = ("attention", "mlp_experts", "nf4", "lora", "optimizer", "other")
LABEL = "twinbench.qlora:"
BACKWARD_NODE = "autograd::engine::evaluate_function: "
MODULE_LABELS = {"self_attn": "attention", "input_layernorm": "attention", "mlp": "mlp_experts",
                 "post_attention_layernorm": "mlp_experts", "lora_A": "lora", "lora_B": "lora",
                 "lora_dropout": "lora"}
# (substring of an op or node name, category), first match wins
NAME_RULES = (("Optimizer.", "optimizer"), ("dequantize", "nf4"),
              ("RecomputedAttention", "attention"), ("flash_attention", "attention"),
              ("scaled_dot_product", "attention"), ("RecomputedMLP", "mlp_experts"), ("SiluMul", "mlp_experts"),
              ("SortedLoRAExperts", "mlp_experts"))
TOP_OPS = 5  # per category, the ops with the most self time


def scope(category: str):
    """A profiler label for the ops inside (``category`` one of ``CATEGORIES``); a no-op when not profiling."""
    if not torch.autograd.profiler._is_profiler_enabled:
        return contextlib.nullcontext()
    return torch.profiler.record_function(LABEL + category)


def _module_category(name: str) -> str | None:
    """The category of a module by its qualified name: the innermost labelled component decides."""
    for part in reversed(name.split(".")):
        if part in MODULE_LABELS:
            return MODULE_LABELS[part]
    return None


@contextlib.contextmanager
def labelled_modules(model: torch.nn.Module):
    """Forward hooks that wrap each labelled module's forward in ``scope`` (removed on exit)."""
    handles = []
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 2)[-2] if name.count(".") else ""
        category = MODULE_LABELS.get(last) or (MODULE_LABELS.get(parent) if parent.startswith("lora_") else None)
        if category is None:
            continue
        stack: list[Any] = []

        def enter(_m, _args, category=category, stack=stack):
            label = scope(category)
            label.__enter__()
            stack.append(label)

        def leave(_m, _args, _out, stack=stack):
            if stack:
                stack.pop().__exit__(None, None, None)

        # always_call: non-reentrant checkpointing stops a recomputation by raising once it has what backward
        # needs; a label left open would swallow every later op of the step
        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _by_name(name: str) -> str | None:
    if name.startswith(LABEL):
        return name[len(LABEL):]
    for needle, category in NAME_RULES:
        if needle in name:
            return category
    return None


def _is_backward(name: str) -> bool:
    return name.startswith(BACKWARD_NODE) or "Backward" in name


def categorise(events) -> dict[str, Any]:
    """``{"total_ms", "ms": {category: ms}, "share": {category: fraction}, "top_ops": {category: [[op, ms]]}}``
    from a profiler's ``events()``."""
    events = list(events)
    forward_of: dict[int, str] = {}

    def walk(event) -> str | None:
        e = event
        while e is not None:
            found = _by_name(e.name)
            if found is None and e.name.startswith(BACKWARD_NODE):
                found = forward_of.get(e.sequence_nr)
            if found is not None:
                return found
            e = e.cpu_parent
        return None

    for e in events:  # forward ops first, so their backward nodes can look them up
        if e.sequence_nr is not None and e.sequence_nr >= 0 and not _is_backward(e.name):
            found = walk(e)
            if found is not None:
                forward_of.setdefault(e.sequence_nr, found)
    ms: dict[str, float] = {c: 0.0 for c in CATEGORIES}
    per_op: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for e in events:
        category = walk(e) or "other"
        category = category if category in ms else "other"
        t = e.self_cpu_time_total / 1e3
        ms[category] += t
        per_op[category][e.name] += t
    total = sum(ms.values())
    return {
        "total_ms": total,
        "ms": ms,
        "share": {c: (v / total if total else 0.0) for c, v in ms.items()},
        "top_ops": {c: [[n, t] for n, t in sorted(per_op[c].items(), key=lambda kv: -kv[1])[:TOP_OPS]]
                    for c in CATEGORIES},
    }


def profile_step(step: Callable[[], Any], model: torch.nn.Module) -> dict[str, Any]:
    """One call of ``step`` (a training step of ``model``) under the profiler, its time by category."""
    from torch.profiler import ProfilerActivity, profile

    with labelled_modules(model), profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return categorise(prof.events())
