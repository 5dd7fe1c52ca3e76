"""The model side of QLoRA: a tiny base saved as a checkpoint, loaded back in NF4 (double quantisation) with
seeded LoRA adapters on every projection, and merged into a 16-bit model at the end.

``from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double quantisation))``, peft's
``prepare_model_for_kbit_training`` (gradient checkpointing) and ``LoraConfig`` on q, k, v, o, gate, up, down;
for Qwen3-MoE, whose experts are fused 3-D parameters that bitsandbytes does not quantise,
``target_parameters`` adapts ``experts.gate_up_proj`` / ``experts.down_proj`` instead of per-expert linears.
Heavy imports (transformers, peft, bitsandbytes) happen inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from twinbench.reference import tiny_lm
from twinbench.reference.qlora.config import DTYPES, LORA_TARGETS, MOE_EXPERT_PARAMETERS, LoopConfig


def training_stack_available(device: Any = None) -> tuple[bool, str]:
    """(ok, why not): the loops need transformers, peft, bitsandbytes, tokenizers and lm-eval."""
    missing = []
    for module in ("transformers", "peft", "bitsandbytes", "tokenizers", "lm_eval"):
        try:
            __import__(module)
        except Exception as exc:
            missing.append(f"{module} ({type(exc).__name__})")
    return (not missing, f"needs {', '.join(missing)}" if missing else "")


def save_base_checkpoint(cfg: LoopConfig, directory: str | Path):
    """Build the tiny model + tokenizer for ``cfg`` and save them (the 'pretrained' base to fine-tune)."""
    tok = tiny_lm.build_tokenizer(cfg.data.tokenizer_corpus)
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
    weight to a CPU-only packed layout, and every later training matmul then runs the inference gemv path
    (after such a probe ``quant_state.packing_format_for_cpu`` is True and the packed shape changes).
    Training must run the training path, so the conversion is switched off.
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
