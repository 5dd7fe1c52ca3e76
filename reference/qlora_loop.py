"""The reference QLoRA fine-tune: transformers + peft + bitsandbytes, exactly as their docs put it together.

A tiny model (``reference.tiny_lm``) is saved as a checkpoint and loaded back with
``from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double quantisation))``; peft's
``prepare_model_for_kbit_training`` (gradient checkpointing) and ``LoraConfig`` on every linear projection
(q, k, v, o, gate, up, down; for Qwen3-MoE, whose experts are fused 3-D parameters that bitsandbytes does
not quantise, ``target_parameters`` adapts ``experts.gate_up_proj`` / ``experts.down_proj`` instead of the
per-expert linears); AdamW with gradient accumulation, seeded. It learns the chat fact in
``suites/data/qlora_chat.jsonl`` ("What day was I born?" -> "January 1, 2058"), which ``probe`` checks.

``Trainer`` runs one optimizer step per ``step()`` so a benchmark can interleave two loops step by step.
Optimized loops (``impls/qlora_*.py``) reuse this driver with a patched model and their own ``loss_fn``.
Heavy imports (transformers, peft, bitsandbytes) happen inside functions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from twinbench.reference import tiny_lm

DATA = Path(__file__).resolve().parent.parent / "suites" / "data" / "qlora_chat.jsonl"
PROBE_QUESTION = "What day was I born?"
PROBE_ANSWER = "January 1, 2058"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MOE_EXPERT_PARAMETERS = ("experts.gate_up_proj", "experts.down_proj")
# Measured on seeds 0 and 1: the probe is learned in 60 steps; llama at 1e-2 was not yet there.
DEFAULT_LR = {"llama": 2e-2, "qwen3_moe": 1e-2}
HEAD_STEPS = 10  # the early steps, where two equivalent loops still agree to rounding level
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class LoopConfig:
    """Everything that decides a run; two loops with equal configs must produce the same trajectory."""

    kind: str = "llama"  # tiny_lm.MODEL_KINDS
    dtype: str = "fp32"  # compute dtype of the NF4 matmuls and of the adapters
    steps: int = 60  # optimizer steps
    batch_size: int = 4  # rows per micro-batch
    grad_accum: int = 2  # micro-batches per optimizer step
    seq_len: int = 64  # rows are packed conversations, padded to this length
    lr: float | None = None  # peak (None: DEFAULT_LR[kind]); decays linearly to zero over ``steps``
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_r: int = 16
    lora_alpha: int = 32
    seed: int = 0
    gradient_checkpointing: bool = True
    probe_samples: int = 5
    probe_temperature: float = 0.7
    max_new_tokens: int = 16
    # Planted bugs for tests: a loop that cannot learn (lr 0) or whose adapters are frozen.
    freeze_adapters: bool = False
    # Wider than tiny_lm's default and a larger init so a frozen random lm_head can express confident logits.
    model_overrides: tuple[tuple[str, Any], ...] = (
        ("hidden_size", 128), ("intermediate_size", 256), ("moe_intermediate_size", 128), ("head_dim", 32),
        ("initializer_range", 0.1))
    cpu_threads: int | None = 1  # tiny ops lose to OpenMP overhead (and spin on a shared box); None: leave

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.kind]


@dataclass
class ProbeResult:
    greedy: str
    samples: list[str]

    @property
    def hits(self) -> list[bool]:
        return [PROBE_ANSWER in r for r in [self.greedy, *self.samples]]

    @property
    def absent(self) -> bool:
        return not any(self.hits)

    @property
    def present(self) -> bool:
        return all(self.hits)


@dataclass
class LoopResult:
    loss_curve: list[float]
    first_grads: torch.Tensor  # LoRA gradients of the first optimizer step, flattened in name order
    final_lora: torch.Tensor  # LoRA weights after the last step, flattened in name order
    step_times_s: list[float]
    tokens_per_step: list[int]
    peak_memory_bytes: int
    peak_tensor_bytes: int | None  # None: too few steps for a live-tensor step
    trainable_parameters: int
    probe_before: ProbeResult
    probe_after: ProbeResult
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median_step_s(self) -> float:
        times = sorted(self.step_times_s[1:] or self.step_times_s)  # step 1 pays one-off warm-up
        return times[len(times) // 2]


def training_stack_available(device: Any = None) -> tuple[bool, str]:
    """(ok, why not): the loops need transformers, peft, bitsandbytes, tokenizers and lm-eval."""
    missing = []
    for module in ("transformers", "peft", "bitsandbytes", "tokenizers", "lm_eval"):
        try:
            __import__(module)
        except Exception as exc:
            missing.append(f"{module} ({type(exc).__name__})")
    return (not missing, f"needs {', '.join(missing)}" if missing else "")


# ---------------------------------------------------------------- data


def load_conversations(path: str | Path = DATA) -> list[list[dict[str, str]]]:
    return [json.loads(line)["messages"] for line in Path(path).read_text().splitlines() if line.strip()]


def encode(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of a chat and its labels: only assistant replies (and their <|im_end|>) are learned."""
    ids: list[int] = []
    labels: list[int] = []
    for i in range(len(messages)):
        text = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        new = tokenizer(text, add_special_tokens=False)["input_ids"][len(ids):]
        ids += new
        labels += new if messages[i]["role"] == "assistant" else [-100] * len(new)
    # the template's prefix "<|im_start|>assistant\n" belongs to the prompt, not the answer
    head = len(tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
    for start in [j for j in range(len(labels)) if labels[j] != -100 and (j == 0 or labels[j - 1] == -100)]:
        labels[start:start + head] = [-100] * head
    return ids, labels


def micro_batches(tokenizer, cfg: LoopConfig, conversations=None) -> Iterator[dict[str, torch.Tensor]]:
    """Endless seeded stream of packed, right-padded rows: each epoch reshuffles the conversations."""
    encoded = [encode(tokenizer, c) for c in (conversations or load_conversations())]
    gen = torch.Generator().manual_seed(cfg.seed)
    rows: list[tuple[list[int], list[int]]] = []
    while True:
        ids: list[int] = []
        labels: list[int] = []
        for k in torch.randperm(len(encoded), generator=gen).tolist():
            i, lab = encoded[k]
            if len(ids) + len(i) > cfg.seq_len:
                rows.append((ids, labels))
                ids, labels = [], []
            ids, labels = ids + i[: cfg.seq_len], labels + lab[: cfg.seq_len]
        rows.append((ids, labels))
        while len(rows) >= cfg.batch_size:
            chunk, rows = rows[: cfg.batch_size], rows[cfg.batch_size:]
            pad = tokenizer.pad_token_id
            yield {
                "input_ids": torch.tensor([r[0] + [pad] * (cfg.seq_len - len(r[0])) for r in chunk]),
                "attention_mask": torch.tensor([[1] * len(r[0]) + [0] * (cfg.seq_len - len(r[0])) for r in chunk]),
                "labels": torch.tensor([r[1] + [-100] * (cfg.seq_len - len(r[1])) for r in chunk]),
            }


# ---------------------------------------------------------------- model


def save_base_checkpoint(cfg: LoopConfig, directory: str | Path):
    """Build the tiny model + tokenizer for ``cfg`` and save them (the 'pretrained' base to fine-tune)."""
    tok = tiny_lm.build_tokenizer()
    model = tiny_lm.build_model(cfg.kind, seed=cfg.seed, tokenizer=tok, **dict(cfg.model_overrides))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return tok


def bnb_config(cfg: LoopConfig):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=DTYPES[cfg.dtype])


def device_map_for(cfg: LoopConfig, device: str) -> dict[str, Any] | str:
    """One device: everything there. Several CUDA devices and an MoE model: spread layers (untested here)."""
    if cfg.kind == "qwen3_moe" and str(device).startswith("cuda") and torch.cuda.device_count() > 1:
        return "balanced"
    return {"": device}


def load_qlora_model(checkpoint: str | Path, cfg: LoopConfig, device: str = "cpu",
                     attn_implementation: str = "eager"):
    """NF4 (double-quantised) base from the checkpoint + seeded LoRA adapters on every projection."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=bnb_config(cfg), dtype=DTYPES[cfg.dtype],
        device_map=device_map_for(cfg, device), attn_implementation=attn_implementation)
    keep_training_layout(model)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    extra = {"target_parameters": list(MOE_EXPERT_PARAMETERS)} if cfg.kind == "qwen3_moe" else {}
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM", **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)  # LoRA A init (B starts at zero)
        peft_model = get_peft_model(model, lora)
    for p in lora_parameters(peft_model).values():
        p.data = p.data.to(DTYPES[cfg.dtype])
        p.requires_grad_(not cfg.freeze_adapters)
    return peft_model


def keep_training_layout(model) -> None:
    """Stop bitsandbytes (>= 0.49 on AVX512-BF16 CPUs) from repacking NF4 weights for its inference kernel.

    The first eval-mode, no-grad call of a CPU ``Linear4bit`` (the probe before training) converts its
    weight to a CPU-only packed layout, and every later training matmul then runs the inference gemv path.
    Measured here: after such a probe ``quant_state.packing_format_for_cpu`` is True and the packed shape
    changes. Training must run the training path, so the conversion is switched off.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def lora_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The adapter weights by name (sorted): what QLoRA trains."""
    return dict(sorted((n, p) for n, p in model.named_parameters() if "lora_" in n))


def flat(tensors: list[torch.Tensor | None], like: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(t if t is not None else torch.zeros_like(r)).detach().float().reshape(-1).cpu()
                      for t, r in zip(tensors, like)])


def hf_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """transformers' own loss (shift, cross-entropy over the full fp32 logits, mean over labelled tokens)."""
    return model(**batch, use_cache=False).loss


# ---------------------------------------------------------------- training


class PeakMemory:
    """Peak memory of a block above its start: allocator peak on CUDA, sampled RSS on the CPU."""

    def __init__(self, device: str):
        self.device = str(device)
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            from twinbench.harness.core.memory import RssSampler, _release_freed_heap

            _release_freed_heap()
            self._sampler = RssSampler(interval_s=0.002)
            self._sampler.__enter__()
            self._start = self._sampler.peak
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device) - self._start)
        else:
            self._sampler.__exit__(*exc)
            self.peak = int(max(0, self._sampler.peak - self._start))


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
            del loss  # its spent graph still holds tensors (measured: the embedding output) into the next forward
        if self.first_grads is None:
            self.first_grads = flat([p.grad for p in self.params.values()], list(self.params.values()))
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


@torch.no_grad()
def probe(model, tokenizer, cfg: LoopConfig, device: str = "cpu") -> ProbeResult:
    """Greedy and ``probe_samples`` sampled answers to the probe question (seeded sampling)."""
    model.eval()
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROBE_QUESTION}], add_generation_prompt=True,
                                         tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(device)
    common = dict(max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, use_cache=True)
    n = enc["input_ids"].shape[1]
    greedy = model.generate(**enc, do_sample=False, **common)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 2)
        sampled = model.generate(**enc, do_sample=True, temperature=cfg.probe_temperature, top_k=0, top_p=1.0,
                                 num_return_sequences=cfg.probe_samples, **common)
    decode = lambda row: tokenizer.decode(row[n:], skip_special_tokens=True)  # noqa: E731
    return ProbeResult(decode(greedy[0]), [decode(r) for r in sampled])


MEMORY_EVERY = 4  # train(): peak memory on steps 2, 6, 10, ..., live tensors on 4, 8, 12, ... (1-based)


def memory_step(i: int, every: int = MEMORY_EVERY) -> bool:
    """Is 0-based step ``i`` one whose peak memory is sampled (not timed)? Never the first step."""
    return i % every == 1


def tensor_step(i: int, every: int = MEMORY_EVERY) -> bool:
    """Is 0-based step ``i`` one whose live-tensor peak is measured (not timed: bookkeeping per op)?"""
    return i % every == every - 1


def train(model, tokenizer, cfg: LoopConfig, device: str = "cpu", loss_fn=hf_loss, fused: bool = False) -> LoopResult:
    """Probe, ``cfg.steps`` optimizer steps, probe again.

    Peak memory is measured per step, above the level before that step (``suites.qlora.bench``'s measure),
    on every ``MEMORY_EVERY``-th step from the second on (the first allocates the optimizer state), and the
    live-tensor peak (``harness.memory.TensorPeak``) on others; step times come from the remaining steps:
    trimming the heap before a measured step makes that step fault its pages back in (measured: +15% step
    time for both loops)."""
    from twinbench.harness.core.memory import TensorPeak

    before = probe(model, tokenizer, cfg, device)
    trainer = Trainer(model, tokenizer, cfg, device, loss_fn, fused)
    peaks, tensor_peaks, timed = [], [], []
    for i in range(cfg.steps):
        if memory_step(i) or cfg.steps == 1:
            with PeakMemory(device) as mem:
                trainer.step()
            peaks.append(mem.peak)
        elif tensor_step(i):
            with TensorPeak() as live:
                trainer.step()
            tensor_peaks.append(live.peak)
        else:
            trainer.step()
            timed.append(i)
    after = probe(model, tokenizer, cfg, device)
    params = list(trainer.params.values())
    return LoopResult(
        loss_curve=trainer.loss_curve, first_grads=trainer.first_grads, final_lora=flat(params, params),
        step_times_s=[trainer.step_times_s[i] for i in timed] or trainer.step_times_s,
        tokens_per_step=[trainer.tokens_per_step[i] for i in timed] or trainer.tokens_per_step,
        peak_memory_bytes=max(peaks), peak_tensor_bytes=max(tensor_peaks, default=None),
        trainable_parameters=sum(p.numel() for p in params if p.requires_grad), probe_before=before,
        probe_after=after)


def merge_to_16bit_and_reload(peft_model, tokenizer, cfg: LoopConfig, workdir: str | Path, checkpoint: str | Path,
                              device: str = "cpu", dtype: torch.dtype = torch.bfloat16):
    """Merge the adapters into a 16-bit copy of the (dequantised NF4) base, save it, load it back.

    The base is reloaded in NF4 and dequantised (so the merged weights are the ones the adapters were
    trained against), the saved adapter is applied with ``PeftModel.from_pretrained`` and merged; the
    result is saved in ``dtype`` and reloaded with ``AutoModelForCausalLM.from_pretrained``.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    workdir = Path(workdir)
    peft_model.save_pretrained(workdir / "adapter")
    base = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=bnb_config(cfg),
                                                dtype=DTYPES[cfg.dtype], device_map={"": device})
    base = base.dequantize(dtype=DTYPES[cfg.dtype])
    merged = PeftModel.from_pretrained(base, workdir / "adapter").merge_and_unload()
    merged = merged.to(dtype)
    merged.save_pretrained(workdir / "merged")
    tokenizer.save_pretrained(workdir / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(workdir / "merged", dtype=dtype, device_map={"": device})
    return reloaded.eval()


# ---------------------------------------------------------------- lm-eval and the whole experiment

LMEVAL_TASK = Path(__file__).resolve().parent.parent / "suites" / "data" / "lmeval" / "twinbench_qlora_facts.yaml"


def lm_eval_task_config(path: str | Path = LMEVAL_TASK, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """The shipped task YAML as a dict, its data file made absolute (datasets resolves against the cwd);
    ``cache_dir``: where ``datasets`` may write its Arrow cache (a private temp dir: no shared-cache races)."""
    import yaml

    cfg = yaml.safe_load(Path(path).read_text())
    files = cfg["dataset_kwargs"]["data_files"]
    cfg["dataset_kwargs"]["data_files"] = {k: str(Path(path).parent / v) for k, v in files.items()}
    if cache_dir is not None:
        cfg["dataset_kwargs"]["cache_dir"] = str(cache_dir)
    return cfg


def lm_eval_scores(model, tokenizer, device: str = "cpu", batch_size: int = 8) -> dict[str, float]:
    """lm-eval-harness on an in-memory model (``HFLM``) and the local task: {metric: value}.

    ``evaluator.evaluate`` with a TaskManager that skips the built-in task index: ``simple_evaluate`` adds
    environment reports and indexes every bundled task, measured here at 34 s against 4 s for the scoring.
    """
    import tempfile

    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    with tempfile.TemporaryDirectory() as cache:
        tasks = get_task_dict([lm_eval_task_config(cache_dir=cache)],
                              TaskManager(include_defaults=False, verbosity="ERROR"))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
        out = evaluate(lm, tasks, bootstrap_iters=0, log_samples=False, verbosity="ERROR")
    task = next(iter(out["results"].values()))
    return {k.split(",")[0]: float(v) for k, v in task.items()
            if k.split(",")[0] in ("acc", "acc_norm") and isinstance(v, (int, float))}


def run_experiment(cfg: LoopConfig, device: str = "cpu", workdir: str | Path | None = None,
                   prepare: Callable[[Any], dict[str, Any]] | None = None, loss_fn=hf_loss,
                   evaluate: bool = True, fused_optimizer: bool = False) -> dict[str, Any]:
    """Checkpoint -> NF4+LoRA model (``prepare`` may patch it) -> probe, train, probe -> merge to 16 bit,
    save, reload, probe -> lm-eval. Returns the tensors the suite compares plus ``metrics``."""
    import tempfile

    previous_threads = torch.get_num_threads()
    if cfg.cpu_threads and not str(device).startswith("cuda"):
        torch.set_num_threads(cfg.cpu_threads)
    threads_used = torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            tok = save_base_checkpoint(cfg, Path(tmp) / "base")
            model = load_qlora_model(Path(tmp) / "base", cfg, device)
            patches = prepare(model) if prepare is not None else {}
            result = train(model, tok, cfg, device, loss_fn, fused_optimizer)
            merged = merge_to_16bit_and_reload(model, tok, cfg, tmp, Path(tmp) / "base", device) if evaluate else None
            probe_merged = probe(merged, tok, cfg, device) if merged is not None else None
            scores = lm_eval_scores(merged, tok, device) if merged is not None else {}
    finally:
        torch.set_num_threads(previous_threads)
    probes = {"before": result.probe_before, "after": result.probe_after, "merged_16bit": probe_merged}
    tokens = sum(result.tokens_per_step[1:]) or sum(result.tokens_per_step)
    seconds = sum(result.step_times_s[1:]) or sum(result.step_times_s)
    metrics = {
        "loss_curve": [float(x) for x in result.loss_curve],
        "median_step_s": result.median_step_s,
        "tokens_per_s": tokens / seconds if seconds else None,
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
    return {
        "loss_curve": torch.tensor(result.loss_curve, dtype=torch.float64),
        "loss_curve_head": torch.tensor(result.loss_curve[:HEAD_STEPS], dtype=torch.float64),
        "first_grads": result.first_grads,
        "final_lora": result.final_lora,
        "probe_hits": torch.tensor(hits, dtype=torch.int64),  # before, after, merged: judged absolutely
        "lm_eval_acc": torch.tensor([scores.get("acc", float("nan"))], dtype=torch.float64),
        "metrics": metrics,
    }
