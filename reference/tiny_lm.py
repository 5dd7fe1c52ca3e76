"""Tiny causal language models and a BPE tokenizer, built offline (no downloads), for training-loop suites.

The models are real transformers classes (``LlamaForCausalLM``, ``Qwen3MoeForCausalLM``) built from a
config with seeded random init; the tokenizer is a byte-level BPE trained with ``tokenizers`` from a text
corpus the caller names (the suites ship ``suites/data/tokenizer_corpus.txt``) and wrapped as a ``PreTrainedTokenizerFast`` with a chat
template. ``save_and_reload`` goes through ``save_pretrained`` / ``from_pretrained`` so the real loading
code (and e.g. a ``quantization_config``) runs.

API::

    tok = build_tokenizer(corpus_path)             # PreTrainedTokenizerFast; trained once per process
    model = build_model("llama", tok, seed=0)      # or "qwen3_moe"; **overrides go into the config
    model, tok = save_and_reload(model, tok, dir)  # from_pretrained kwargs: save_and_reload(..., dtype=...)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]   # (transformers 5: tokenize=True returns a dict)

Special tokens: ``<|im_start|>``, ``<|im_end|>`` (eos, ends every chat turn), ``<|pad|>`` (pad),
``<|endoftext|>`` (bos). Heavy imports (transformers, tokenizers) happen inside the functions.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ("<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")
VOCAB_SIZE = 512  # BPE target; small so embeddings and lm_head stay tiny
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Config defaults: a few hundred thousand parameters, GQA attention, shapes that NF4 (block 64) divides.
LLAMA_DEFAULTS: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6,
    tie_word_embeddings=False, attention_bias=False,
)
QWEN3_MOE_DEFAULTS: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
    norm_topk_prob=True, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
    router_aux_loss_coef=0.0, decoder_sparse_step=1, mlp_only_layers=[],
)
MODEL_KINDS = ("llama", "qwen3_moe")


@functools.cache
def _trained_tokenizer_json(corpus: str, vocab_size: int) -> str:
    """Train the byte-level BPE once per process (and corpus); cached as its JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(Path(corpus).read_text(encoding="utf-8").splitlines(), trainer=trainer)
    return tok.to_str()


def build_tokenizer(corpus: str | Path, vocab_size: int = VOCAB_SIZE):
    """A fresh ``PreTrainedTokenizerFast`` (chat template, pad/eos/bos set) over the cached trained BPE."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_trained_tokenizer_json(str(corpus), vocab_size))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"], chat_template=CHAT_TEMPLATE, padding_side="right",
        model_max_length=LLAMA_DEFAULTS["max_position_embeddings"],
    )


def build_config(kind: str, tokenizer, **overrides: Any):
    """The transformers config for a tiny ``kind`` model whose vocabulary matches ``tokenizer``."""
    from transformers import LlamaConfig, Qwen3MoeConfig

    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r} (use one of {', '.join(MODEL_KINDS)})")
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
               eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    cls, defaults = (LlamaConfig, LLAMA_DEFAULTS) if kind == "llama" else (Qwen3MoeConfig, QWEN3_MOE_DEFAULTS)
    return cls(**{**defaults, **ids, **overrides})


def build_model(kind: str, tokenizer, seed: int = 0, dtype=None, **overrides: Any):
    """A randomly initialised tiny ``LlamaForCausalLM`` / ``Qwen3MoeForCausalLM``; same seed, same weights."""
    import torch
    from transformers import AutoModelForCausalLM

    config = build_config(kind, tokenizer, **overrides)
    with torch.random.fork_rng(devices=[]):  # seeded init (CPU RNG) without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def save_and_reload(model, tokenizer, directory: str | Path, **from_pretrained_kwargs: Any):
    """``save_pretrained`` both into ``directory``, then load them back with the Auto classes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()  # shard/weight-loading bars would flood the console of every run
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    reloaded = AutoModelForCausalLM.from_pretrained(directory, **from_pretrained_kwargs)
    return reloaded.eval(), AutoTokenizer.from_pretrained(directory)


def count_parameters(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
