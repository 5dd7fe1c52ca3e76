"""What decides a QLoRA run: ``LoopConfig`` (hashable: two loops with equal configs must produce the same
trajectory) and the data files it reads (passed in by the caller; the package data lives with the suite)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MOE_EXPERT_PARAMETERS = ("experts.gate_up_proj", "experts.down_proj")
# Seeds 0 and 1 learn the probe in 60 steps at these rates; llama at 1e-2 did not (docs/qlora.md).
DEFAULT_LR = {"llama": 2e-2, "qwen3_moe": 1e-2}
HEAD_STEPS = 10  # the early steps, where two equivalent loops still agree to rounding level
# The bench profile's ~100M-parameter models (``LoopConfig.model_overrides``), built from configs with random
# init: Llama-like 1024 wide, 8 layers (GQA 16/4 heads); Qwen3-MoE-like 768 wide, 6 layers, 16 experts, top-4.
# The default initializer_range (0.02) already lets a 768+-wide frozen lm_head express confident logits.
MODEL_SIZES: dict[str, dict[str, tuple[tuple[str, Any], ...]]] = {
    "100m": {
        "llama": (("hidden_size", 1024), ("intermediate_size", 3072), ("num_hidden_layers", 8),
                  ("num_attention_heads", 16), ("num_key_value_heads", 4), ("head_dim", 64),
                  ("max_position_embeddings", 1024)),
        "qwen3_moe": (("hidden_size", 768), ("moe_intermediate_size", 384), ("intermediate_size", 1536),
                      ("num_hidden_layers", 6), ("num_experts", 16), ("num_experts_per_tok", 4),
                      ("num_attention_heads", 12), ("num_key_value_heads", 4), ("head_dim", 64),
                      ("max_position_embeddings", 1024)),
    },
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class DataFiles:
    """The files a QLoRA run reads; the caller (the suite, the bench command) says where they are."""

    chat: Path  # JSONL, one {"messages": [...]} chat per line: what the loop learns
    lm_eval_task: Path  # lm-eval task YAML; its data_files are relative to it
    tokenizer_corpus: Path  # text the tiny BPE tokenizer is trained from


@dataclass(frozen=True)
class LoopConfig:
    """Everything that decides a run; two loops with equal configs must produce the same trajectory."""

    data: DataFiles
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
