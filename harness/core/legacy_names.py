"""The first version's module names and where each one lives now: the one table of the layout move.

A plugin written against the first version (``from harness.registry import register_impl``) fails to
import under the ``twinbench.*`` namespace; the registry turns that failure into one line naming the new
module (:func:`legacy_import_hint`) instead of a traceback.
"""

from __future__ import annotations

import ast
import importlib.util
import linecache
from types import TracebackType

_HARNESS = {
    "registry": "core.registry", "case": "core.case", "inputs": "core.inputs", "errors": "core.errors",
    "parity": "core.parity", "timing": "core.timing", "devices": "core.devices", "memory": "core.memory",
    "results": "store.results", "baseline": "store.baseline", "history": "store.history",
    "runner": "run.runner", "worker": "run.worker",
    "gate": "gate.stats", "gate_against": "gate.against", "gate_worker": "gate.worker", "calibrate": "gate.calibrate",
    "cli": "cli.main", "cli_reports": "cli.results_commands", "console": "cli.console",
}
# impls/ was one flat folder; now one folder per op plus impls/kernels for shared kernel libraries.
_IMPLS = {
    "attention_flash_attn": "attention.flash_attn_peer", "attention_sdpa": "attention.sdpa",
    "attention_transformers": "attention.transformers_peer", "attention_triton_fa": "attention.triton_fa",
    "_triton_fa_kernels": "attention.triton_fa_kernels",
    "dpo_fused_torch": "dpo.fused_torch", "dpo_liger": "dpo.liger_peer", "dpo_trl": "dpo.trl_peer",
    "dpo_loop_fused": "dpo_loop.fused",
    "gating_fused_torch": "gating.fused_torch", "gating_transformers": "gating.transformers_peer",
    "gating_triton": "gating.triton_router",
    "moe_ffn_sorted": "moe_ffn.sorted_experts", "moe_ffn_transformers": "moe_ffn.transformers_peer",
    "moe_ffn_triton": "moe_ffn.triton_grouped",
    "nf4_kernels": "kernels.nf4", "nf4_native": "kernels.nf4_native",
    "quant_linear_triton_kernels": "kernels.nf4_triton",
    "qlora_attention_op": "qlora.attention_op", "qlora_moe_lora": "qlora.moe_lora",
    "qlora_nf4_lora": "qlora.nf4_lora", "qlora_patched": "qlora.patched", "qlora_recompute": "qlora.recompute",
    "quant_linear_bnb": "quant_linear.bnb_peer", "quant_linear_fused": "quant_linear.fused",
    "quant_linear_triton": "quant_linear.triton_nf4",
}
# Top-level packages of the first version whose modules kept their names below ``twinbench.``.
_SAME_NAME_ROOTS = ("reference", "suites", "reports")

LEGACY_MODULES: dict[str, str] = {
    "harness": "twinbench.harness",
    "impls": "twinbench.impls",
    **{f"harness.{old}": f"twinbench.harness.{new}" for old, new in _HARNESS.items()},
    **{f"impls.{old}": f"twinbench.impls.{new}" for old, new in _IMPLS.items()},
}
LEGACY_ROOTS = frozenset({"harness", "impls", *_SAME_NAME_ROOTS})


def new_module_name(old: str) -> str | None:
    """Where a first-version module lives now; None when ``old`` is not one of the first version's modules."""
    if old in LEGACY_MODULES:
        return LEGACY_MODULES[old]
    if old.split(".", 1)[0] in _SAME_NAME_ROOTS and _is_module(f"twinbench.{old}"):
        return f"twinbench.{old}"
    return None


def _is_module(name: str) -> bool:
    """``name`` is an importable module (``from suites.attention import make_inputs`` also asks whether
    ``suites.attention.make_inputs`` is one: it is not, so the hint names ``suites.attention``)."""
    try:
        return importlib.util.find_spec(name) is not None
    except Exception:  # its parent failed to import, or is no package: not a module we can point to
        return False


def _imported_names(filename: str, lineno: int) -> list[str]:
    """Dotted module names the import statement at ``filename:lineno`` asks for (``from a import b``
    may name module ``a.b``), most specific first; [] when that line is no import."""
    source = "".join(linecache.getlines(filename))
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    names: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if not node.lineno <= lineno <= (node.end_lineno or node.lineno):
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif node.module and not node.level:
            names += [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
    return names


def legacy_import_hint(exc: BaseException) -> tuple[str, str] | None:
    """(first-version module, its new name) when ``exc`` is an import of a first-version module; else None.

    The exception names only the part of the path that was missing (``harness`` when no such package is
    importable, ``harness.registry`` when the package is but the module is not), so the import statement
    that raised is read back to name the module the plugin asked for.
    """
    if not isinstance(exc, ImportError) or not exc.name or exc.name.split(".", 1)[0] not in LEGACY_ROOTS:
        return None
    missing = exc.name
    tb: TracebackType | None = exc.__traceback__
    frames = []
    while tb is not None:
        frames.append((tb.tb_frame.f_code.co_filename, tb.tb_lineno))
        tb = tb.tb_next
    for filename, lineno in reversed(frames):  # the innermost import statement is the one that failed
        if filename.startswith("<"):  # importlib's frozen machinery
            continue
        asked = [n for n in _imported_names(filename, lineno)
                 if (n == missing or n.startswith(missing + ".")) and new_module_name(n)]
        if asked:
            return asked[0], new_module_name(asked[0]) or ""
    new = new_module_name(missing)
    return (missing, new) if new else None
