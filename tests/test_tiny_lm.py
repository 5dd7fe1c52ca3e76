"""Tiny models and tokenizer: seeded, round-trip through save_pretrained/from_pretrained, chat template."""

import pytest
import torch
from twinbench.reference import tiny_lm
from twinbench.suites.training_data import TOKENIZER_CORPUS

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

CHAT = [{"role": "user", "content": "What day was I born?"},
        {"role": "assistant", "content": "You were born on January 1, 2058."}]


def test_tokenizer_round_trip_and_chat_template():
    tok = tiny_lm.build_tokenizer(TOKENIZER_CORPUS)
    assert len(tok) == tiny_lm.VOCAB_SIZE
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert text.startswith("<|im_start|>user\nWhat day was I born?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert ids.count(tok.eos_token_id) == 2  # <|im_end|> closes each turn and is one token
    prompt = tok.apply_chat_template(CHAT[:1], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    # BPE actually merged: far fewer tokens than bytes
    assert len(ids) < len(text.encode()) / 2


def test_tokenizer_is_cached_but_each_call_is_a_fresh_object():
    a, b = tiny_lm.build_tokenizer(TOKENIZER_CORPUS), tiny_lm.build_tokenizer(TOKENIZER_CORPUS)
    assert a is not b
    assert a.get_vocab() == b.get_vocab()
    assert tiny_lm._trained_tokenizer_json.cache_info().hits >= 1


@pytest.mark.parametrize("kind", tiny_lm.MODEL_KINDS)
def test_model_seeded_and_reloads_through_from_pretrained(kind, tmp_path):
    tok = tiny_lm.build_tokenizer(TOKENIZER_CORPUS)
    rng_before = torch.random.get_rng_state()
    m = tiny_lm.build_model(kind, seed=3, tokenizer=tok)
    assert torch.equal(rng_before, torch.random.get_rng_state())  # caller's RNG untouched
    same = tiny_lm.build_model(kind, seed=3, tokenizer=tok)
    other = tiny_lm.build_model(kind, seed=4, tokenizer=tok)
    sd, sd_same, sd_other = m.state_dict(), same.state_dict(), other.state_dict()
    assert all(torch.equal(sd[k], sd_same[k]) for k in sd)
    assert not all(torch.equal(sd[k], sd_other[k]) for k in sd)
    expected = "LlamaForCausalLM" if kind == "llama" else "Qwen3MoeForCausalLM"
    assert type(m).__name__ == expected
    reloaded, tok2 = tiny_lm.save_and_reload(m, tok, tmp_path)
    assert type(reloaded).__name__ == expected
    assert (tmp_path / "model.safetensors").is_file()
    ids = torch.tensor([tok(tok.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, m(ids).logits, rtol=0, atol=0)
    assert tok2.apply_chat_template(CHAT, tokenize=False) == tok.apply_chat_template(CHAT, tokenize=False)
    assert tok2.eos_token == "<|im_end|>" and tok2.pad_token == "<|pad|>"


def test_overrides_and_unknown_kind():
    tok = tiny_lm.build_tokenizer(TOKENIZER_CORPUS)
    m = tiny_lm.build_model("llama", tok, num_hidden_layers=1, hidden_size=32, head_dim=8)
    assert m.config.num_hidden_layers == 1 and m.config.hidden_size == 32
    with pytest.raises(ValueError, match="unknown tiny model kind"):
        tiny_lm.build_model("gpt9", tok)
