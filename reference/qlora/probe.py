"""The learned fact: "What day was I born?" -> "January 1, 2058" (taught by the suite's chat data)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from twinbench.reference.qlora.config import LoopConfig

PROBE_QUESTION = "What day was I born?"
PROBE_ANSWER = "January 1, 2058"


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
