"""Ahead-of-time compilation of Triton kernels for real GPU targets, on a machine without a GPU.

``triton.compile`` with a ``GPUTarget`` runs the whole backend on the CPU (ptxas and the AMD linker ship inside
the triton wheel), so every kernel configuration the autotuner may choose can be checked before the first
GPU run: it compiles; its shared memory fits the target's per-block limit; an fp32 build uses no TF32/XF32
instruction (tensor cores would round fp32 inputs to 10 mantissa bits: parity failures on every GPU that
the CPU interpreter cannot show); and its registers and spills are recorded. See docs/method.md §5.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Target:
    """A GPU to compile for, with the limits a kernel must fit."""

    name: str
    backend: str  # "cuda" or "hip"
    arch: int | str
    warp_size: int
    shared_limit: int  # bytes of shared memory / LDS one block (workgroup) may use

    def gpu_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget(self.backend, self.arch, self.warp_size)


# Per-block shared memory with the opt-in carve-out (CUDA programming guide, compute capabilities table;
# AMD CDNA3/RDNA4 ISA guides: 64 KiB LDS per workgroup).
TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("sm80", "cuda", 80, 32, 166912),    # A100: 163 KiB
    Target("sm89", "cuda", 89, 32, 101376),    # Ada consumer / L40S: 99 KiB
    Target("sm90", "cuda", 90, 32, 232448),    # H100/H200: 227 KiB
    Target("sm100", "cuda", 100, 32, 232448),  # B200: 227 KiB
    Target("gfx942", "hip", "gfx942", 64, 65536),   # MI300X
    Target("gfx950", "hip", "gfx950", 64, 163840),  # MI350X/MI355X: 160 KiB LDS; OCP fp8 and MX dot_scaled
    Target("gfx1201", "hip", "gfx1201", 32, 65536),  # RDNA4
)}
CI_TARGETS = ("sm80", "sm90", "sm100", "gfx942", "gfx1201")


@dataclass(frozen=True)
class Variant:
    """One compilation of one kernel: its signature, constexprs and launch options."""

    kernel: str
    fn: Any  # the @triton.jit function
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2
    fp32: bool = False  # an fp32 build: must not use tf32/xf32 instructions
    # Shared memory this variant's tiles need, as the autotuner's pruning estimates it (None: not estimated).
    estimated_shared: int | None = None
    note: str = ""

    @property
    def id(self) -> str:
        consts = ",".join(f"{k}={v}" for k, v in sorted(self.constexprs.items()))
        return f"{self.kernel}[{consts},w{self.num_warps},s{self.num_stages}]"


@dataclass
class Report:
    """What compiling one variant for one target gave."""

    kernel: str
    variant: str
    target: str
    compiled: bool
    error: str = ""
    shared_bytes: int = 0
    shared_limit: int = 0
    registers: int | None = None  # per thread: registers (CUDA), VGPRs (HIP)
    spills: int | None = None  # CUDA: stack + local bytes per thread; HIP: spilled VGPRs + SGPRs
    reduced_precision_instructions: int = 0
    fp32: bool = False
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return dict(asdict(self), ok=self.ok)


# Stack (spilled registers and local arrays) per thread above which a CUDA build counts as spilling: the
# kernels we keep stay under ~1.6 KB; builds ptxas gives up on reach 7-17 KB (docs/triton_fa.md).
CUDA_STACK_LIMIT = 4096
# TF32 on NVIDIA (mma/wgmma/tcgen05 with .tf32 operands) and XF32 on CDNA3 (v_mfma_*_xf32).
REDUCED_FP32 = re.compile(r"\.tf32\b|\btf32\b|_xf32\b")


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _cuda_resources(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers per thread, bytes per thread in local memory: the stack frame, where ptxas puts spilled
    registers, plus other local arrays) from ``cuobjdump -res-usage``. A register count far below 255 with a
    large stack is a kernel ptxas could not keep in registers."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        done = subprocess.run([_tool("cuobjdump"), "-res-usage", fh.name], capture_output=True, text=True,
                              timeout=60)
    regs = re.search(r"REG:(\d+)", done.stdout)
    local = [int(n) for n in re.findall(r"(?:STACK|LOCAL):(\d+)", done.stdout)]
    return (int(regs.group(1)) if regs else None), (sum(local) if local else None)


def _hip_resources(amdgcn: str) -> tuple[int | None, int | None]:
    """(VGPRs, spilled VGPRs + SGPRs) from the code object's metadata notes."""
    vgprs = re.search(r"\.vgpr_count:\s+(\d+)", amdgcn)
    spills = [int(n) for n in re.findall(r"\.[vs]gpr_spill_count:\s+(\d+)", amdgcn)]
    return (int(vgprs.group(1)) if vgprs else None), (sum(spills) if spills else None)


def compile_variant(variant: Variant, target: Target) -> Report:
    """Compile ``variant`` for ``target`` and judge it (never raises for a kernel's own failure)."""
    import triton
    from triton.compiler import ASTSource

    report = Report(kernel=variant.kernel, variant=variant.id, target=target.name, compiled=False,
                    shared_limit=target.shared_limit, fp32=variant.fp32)
    start = time.perf_counter()
    try:
        source = ASTSource(fn=variant.fn, signature=variant.signature, constexprs=variant.constexprs)
        compiled = triton.compile(source, target=target.gpu_target(),
                                  options={"num_warps": variant.num_warps, "num_stages": variant.num_stages})
    except Exception as exc:  # a compiler error is this variant's verdict, not the checker's crash
        report.error = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300] if str(exc) else type(exc).__name__
        report.problems.append(f"does not compile: {report.error}")
        report.seconds = time.perf_counter() - start
        return report
    report.seconds = time.perf_counter() - start
    report.compiled = True
    report.shared_bytes = int(compiled.metadata.shared)
    if target.backend == "cuda":
        report.registers, report.spills = _cuda_resources(compiled.asm["cubin"])
        text = compiled.asm.get("ptx", "")
    else:
        text = compiled.asm.get("amdgcn", "")
        report.registers, report.spills = _hip_resources(text)
    if target.backend == "cuda" and (report.spills or 0) > CUDA_STACK_LIMIT:
        report.problems.append(f"{report.spills} B of stack per thread ({report.registers} registers): ptxas "
                               "could not keep the tile in registers")
    if report.shared_bytes > target.shared_limit:
        report.problems.append(f"shared memory {report.shared_bytes} B > {target.name}'s {target.shared_limit} B")
    if variant.estimated_shared is not None and report.shared_bytes > variant.estimated_shared:
        report.problems.append(f"shared memory {report.shared_bytes} B above the autotuner's estimate "
                               f"{variant.estimated_shared} B: its pruning may keep configs that do not fit")
    if variant.fp32:
        report.reduced_precision_instructions = len(REDUCED_FP32.findall(text))
        if report.reduced_precision_instructions:
            report.problems.append(f"fp32 build uses {report.reduced_precision_instructions} tf32/xf32 "
                                   "instruction(s): fp32 inputs rounded to 10 mantissa bits")
    return report


def sweep(variants: list[Variant], targets: list[Target],
          on_report: Callable[[Report], None] | None = None) -> list[Report]:
    """Every variant on every target; ``on_report`` sees each report as it comes (progress)."""
    reports = []
    for variant in variants:
        for target in targets:
            report = compile_variant(variant, target)
            reports.append(report)
            if on_report:
                on_report(report)
    return reports
