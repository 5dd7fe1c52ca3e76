"""Dao-AILab flash-attn (CUDA sm80+, ROCm CK build for gfx90a/942/950, Triton AMD backend for RDNA)."""

from __future__ import annotations

import importlib.util
import os

from twinbench.harness.core.registry import register_impl

# ROCm archs of flash-attn's Composable Kernel build (docs/method.md §5); any other AMD GPU needs the Triton
# backend, which flash-attn chooses at import from this variable (set before import: the worker's environment).
CK_ARCHS = ("gfx90a", "gfx942", "gfx950")
TRITON_AMD_VARIABLE = "FLASH_ATTENTION_TRITON_AMD_ENABLE"


def _available(device) -> tuple[bool, str]:
    if device.backend not in ("cuda", "rocm"):
        return False, f"flash-attn runs on CUDA/ROCm only, not {device.backend}"
    if importlib.util.find_spec("flash_attn") is None:
        return False, "flash_attn not installed"
    if device.backend == "cuda":
        major = int(str(device.extra.get("capability", "0.0")).split(".")[0])
        if major < 8:
            return False, f"flash-attn needs sm80+, device is {device.arch}"
    elif device.arch not in CK_ARCHS and os.environ.get(TRITON_AMD_VARIABLE, "").upper() != "TRUE":
        return False, (f"flash-attn's ROCm build supports {'/'.join(CK_ARCHS)}, device is {device.arch or 'unknown'} "
                       f"(set {TRITON_AMD_VARIABLE}=TRUE for its Triton backend)")
    return True, ""


def _supports(case, device) -> tuple[bool, str]:
    if case["dtype"] not in ("fp16", "bf16"):
        return False, "flash-attn takes fp16/bf16 only"
    if case["head_dim"] > 256:
        return False, "flash-attn supports head_dim <= 256"
    return True, ""


@register_impl("attention", "flash_attn", tags=("library",), available=_available, supports=_supports,
               deterministic=False)
def flash_attn(q, k, v, *, causal, scale):
    from flash_attn import flash_attn_func  # [B, S, H, D] layout; GQA and bottom-right causal natively

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                          causal=causal)
    return out.transpose(1, 2)
