"""Where the training-loop experiments' shipped data lives (package data under ``suites/data``): the one
place that knows these paths; the loops in ``reference/`` are handed them."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
TOKENIZER_CORPUS = DATA / "tokenizer_corpus.txt"  # the tiny BPE tokenizer's training text
QLORA_CHAT = DATA / "qlora_chat.jsonl"  # the chats the QLoRA loop learns (the probe's fact among them)
QLORA_LM_EVAL_TASK = DATA / "lmeval" / "twinbench_qlora_facts.yaml"
PREFERENCES = DATA / "preferences.jsonl"  # the DPO loop's preference pairs
