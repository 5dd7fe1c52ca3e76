"""Training data: chats -> token ids with assistant-only labels -> an endless seeded stream of packed rows."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from twinbench.reference.qlora.config import LoopConfig


def load_conversations(path: str | Path) -> list[list[dict[str, str]]]:
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


def micro_batches(tokenizer, cfg: LoopConfig) -> Iterator[dict[str, torch.Tensor]]:
    """Endless seeded stream of packed, right-padded rows of ``cfg.data.chat``: each epoch reshuffles."""
    encoded = [encode(tokenizer, c) for c in load_conversations(cfg.data.chat)]
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
