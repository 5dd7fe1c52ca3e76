"""bitsandbytes' NF4 linear (``bnb.matmul_4bit``, what ``bnb.nn.Linear4bit`` calls while training) + LoRA.

The LoRA term is computed as peft does (``lora_B(lora_A(x)) * scaling``). On CPU, bnb logs "Failed to load
CPU gemm_4bit_forward from kernels-community" when the optional hub kernel is absent (offline): it then
uses its native CPU kernels — a note, not a failure (docs/method.md §6). Only the training path is
exercised here (x requires grad), which dequantises W to the compute dtype and calls the dtype's GEMM;
bnb's AVX512-BF16 inference GEMV (eval mode, no grad) computes in bf16 whatever the compute dtype.
"""

from __future__ import annotations

from twinbench.harness.core.registry import register_impl


def bnb_available(device) -> tuple[bool, str]:
    try:
        import bitsandbytes  # noqa: F401
        from bitsandbytes.cextension import BNB_BACKEND
    except Exception as exc:  # not installed, or its native library failed to load
        return False, f"bitsandbytes unavailable: {type(exc).__name__}: {exc}"
    backend = getattr(device, "backend", "cpu")
    wanted = {"cpu": "CPU", "cuda": "CUDA", "rocm": "ROCm", "xpu": "XPU"}.get(backend)
    if wanted is None:
        return False, f"bitsandbytes has no {backend} backend"
    if backend != "cpu" and BNB_BACKEND != wanted:
        return False, f"bitsandbytes was built for {BNB_BACKEND}, not {wanted}"
    if backend == "rocm":
        import bitsandbytes

        major_minor = tuple(int(p) for p in bitsandbytes.__version__.split(".")[:2])
        if major_minor < (0, 50):
            return False, f"bitsandbytes {bitsandbytes.__version__} < 0.50 gives NaN/corrupt 4-bit output on ROCm"
    if backend == "cpu":
        return True, _cpu_note()
    return True, ""


def _cpu_note() -> str:
    """bnb logs 'Failed to load CPU gemm_4bit_forward from kernels-community' when its optional hub kernel is
    absent (offline); that kernel serves only the inference GEMV, not the training path timed here."""
    try:
        from bitsandbytes.backends.cpu import ops as cpu_ops
    except Exception:
        return ""
    if getattr(cpu_ops, "gemm_4bit_forward_kernel", "absent") is None:
        return "note: kernels-community gemm_4bit_forward not loaded (offline); bnb uses its native CPU kernels"
    return ""


def quant_state(packed, absmax, shape, blocksize, dtype, absmax2=None, code2=None, offset=None):
    """A bnb QuantState over the given storage (no copies)."""
    import torch
    from bitsandbytes.functional import QuantState, get_4bit_type

    code = get_4bit_type("nf4", device=packed.device)
    size = torch.Size(shape)
    if absmax2 is None:
        return QuantState(absmax=absmax, shape=size, code=code, blocksize=blocksize, quant_type="nf4", dtype=dtype)
    state2 = QuantState(absmax=absmax2, code=code2, blocksize=256, dtype=torch.float32)
    return QuantState(absmax=absmax, shape=size, code=code, blocksize=blocksize, quant_type="nf4", dtype=dtype,
                      offset=offset, state2=state2)


@register_impl("quant_linear", "bnb_matmul_4bit", tags=("library",), available=bnb_available)
def bnb_matmul_4bit(x, packed, absmax, lora_A=None, lora_B=None, bias=None, absmax2=None, code2=None,
                    offset=None, *, shape, blocksize, scaling):
    import bitsandbytes as bnb

    qs = quant_state(packed, absmax, shape, blocksize, x.dtype, absmax2, code2, offset)
    out = bnb.matmul_4bit(x, packed, quant_state=qs, bias=bias)
    if lora_A is not None:
        out = out + (x @ lora_A.t()) @ lora_B.t() * scaling
    return out
