"""The parity rule (METHOD.md section 1): is an optimized impl computing the reference's function?

For every trial (fresh seeded inputs) the reference runs twice — upcast (``ref_hi``, possibly on another
device) and in the test dtype (``ref_lo``) — and the impl runs with poisoned allocations. Outputs and every
gradient (backward seeded with one random ``g`` per output) must satisfy
``err(opt, ref_hi) <= k * err(ref_lo, ref_hi) + rounding floor`` (or the suite's fixed bound).
Also checked: NaN/Inf placement, unwritten (poisoned) elements, input mutation and run-to-run stability.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from twinbench.harness.core.case import Case, torch_dtype
from twinbench.harness.core.registry import Impl, Inputs, Suite, Tolerance

_EMPTY_FUNCS = {torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty,
                torch.Tensor.new_empty_strided}


class PoisonedAllocations(TorchFunctionMode):
    """While active, uninitialised tensors from Python (``torch.empty*``) come back full of NaN
    (floats) or the dtype's max (integers), so an output element an impl never writes cannot pass."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _EMPTY_FUNCS and isinstance(out, torch.Tensor) and out.numel():
            with torch.no_grad():
                if out.is_floating_point() or out.is_complex():
                    out.fill_(float("nan"))
                elif out.dtype != torch.bool:
                    out.fill_(torch.iinfo(out.dtype).max)
        return out


@dataclass
class TensorCheck:
    """One output or gradient compared against ``ref_hi``: the measured error, its bound and ratio."""

    name: str
    ok: bool
    error: float
    bound: float
    ratio: float
    mean_error: float
    ref_lo_error: float | None
    scale: float
    metric: str
    detail: str = ""


@dataclass
class ParityVerdict:
    ok: bool
    checks: dict[str, TensorCheck] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    stable: bool | None = None
    trials: int = 0
    backward_checked: bool = False
    reference_device: str = ""
    hi_dtype: str = ""
    tolerance: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)  # numbers the impl measured itself (loops)

    def worst(self, prefix: str) -> TensorCheck | None:
        """The check with the highest error/bound ratio among outputs ('out') or gradients ('grad')."""
        picked = [c for n, c in self.checks.items() if n.startswith("grad:") == (prefix == "grad")]
        return max(picked, key=lambda c: c.ratio, default=None)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["checks"] = {k: asdict(v) for k, v in self.checks.items()}
        return d


def split_metrics(result: Any) -> tuple[Any, dict[str, Any]]:
    """An impl may return ``{"metrics": {...}, ...tensors}``: self-measured numbers (training loops)."""
    if isinstance(result, Mapping) and isinstance(result.get("metrics"), Mapping):
        rest = {k: v for k, v in result.items() if k != "metrics"}
        return rest, dict(result["metrics"])
    return result, {}


def normalize_outputs(result: Any) -> dict[str, Any]:
    """Tensor -> {'out': t}; tuple -> {'out0', 'out1', ...}; mapping -> itself (tensors only kept)."""
    if isinstance(result, torch.Tensor):
        return {"out": result}
    if isinstance(result, Mapping):
        return {str(k): v for k, v in result.items() if isinstance(v, torch.Tensor)}
    if isinstance(result, (tuple, list)):
        return {f"out{i}": v for i, v in enumerate(result) if isinstance(v, torch.Tensor)}
    raise TypeError(f"impl returned {type(result).__name__}; expected a tensor, tuple or mapping of tensors")


def leaves(inputs: Inputs, dtype: torch.dtype | None, device: str | torch.device | None) -> Inputs:
    """A copy of the inputs (optionally cast/moved) whose ``grad`` tensors are fresh leaves."""
    tensors = {}
    for name, t in inputs.tensors.items():
        if isinstance(t, torch.Tensor):
            t = t.detach()
            if device is not None:
                t = t.to(device)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            t = t.clone()
            if name in inputs.grad:
                t.requires_grad_(True)
        tensors[name] = t
    return Inputs(tensors=tensors, static=dict(inputs.static), grad=inputs.grad, meta=inputs.meta)


def call_impl(impl: Impl, inputs: Inputs, grad_out: Mapping[str, torch.Tensor] | Callable | None,
              poison: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
    """Run forward (and backward when ``grad_out`` is given): outputs and input gradients.

    ``grad_out`` may be a callable that makes the output gradients from the outputs (first run of a trial).
    """
    mode = PoisonedAllocations() if poison else None
    if mode is not None:
        mode.__enter__()
    try:
        result, metrics = split_metrics(impl.fn(**inputs.tensors, **inputs.static))
        outs = normalize_outputs(result)
        if metrics:
            inputs.meta.setdefault("metrics", {}).update(metrics)
        grads: dict[str, torch.Tensor | None] = {}
        if callable(grad_out):
            grad_out = grad_out(outs)
        if grad_out is not None and inputs.grad:
            pairs = [(o, grad_out[n]) for n, o in outs.items() if n in grad_out and o.requires_grad]
            leaves = [inputs.tensors[n] for n in inputs.grad]
            if pairs:
                got = torch.autograd.grad([p[0] for p in pairs], leaves,
                                          grad_outputs=[p[1].to(p[0].dtype) for p in pairs],
                                          allow_unused=True)
                grads = dict(zip(inputs.grad, got))
            else:
                grads = dict.fromkeys(inputs.grad)
    finally:
        if mode is not None:
            mode.__exit__(None, None, None)
    return {n: o.detach() for n, o in outs.items()}, {n: (g.detach() if g is not None else None)
                                                      for n, g in grads.items()}


def rounding_floor(ref_cast: torch.Tensor) -> float:
    """2 * max|(ref + 0.3 - 0.3) - ref| in the output's own dtype: the rounding error at its magnitude."""
    if not ref_cast.is_floating_point() or ref_cast.numel() == 0:
        return 0.0
    r = torch.nan_to_num(ref_cast, nan=0.0, posinf=0.0, neginf=0.0)
    return 2.0 * float(((r + 0.3) - 0.3 - r).abs().max())


def reorder_allowance(t: torch.Tensor, fp32_ulps: float = Tolerance.fp32_ulps) -> float:
    """How far two runs of a non-deterministic impl (atomics, parallel scatter-add) may differ: twice the
    rounding floor, plus for fp32 the same few ulps at the tensor's scale that the parity bound allows for
    reordered sums (the rounding floor alone is a fraction of one ulp at magnitude 0.3)."""
    allowance = 2 * rounding_floor(t)
    if t.dtype == torch.float32 and t.numel():
        scale = float(torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0).abs().max())
        allowance += fp32_ulps * float(torch.finfo(torch.float32).eps) * scale
    return allowance


def _close_enough_twice(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Non-deterministic impls: the same inputs twice agree within :func:`reorder_allowance` (NaN in place)."""
    if a.shape != b.shape or not a.is_floating_point():
        return _bitwise_equal(a, b)
    same_nan = torch.equal(a.isnan(), b.isnan())
    diff = (a.double() - b.double()).abs().nan_to_num(nan=0.0)
    return same_nan and bool((diff <= reorder_allowance(a) + 1e-30).all())


def _stat(x: torch.Tensor, metric: str) -> float:
    if x.numel() == 0:
        return 0.0
    return float(x.max() if metric == "max" else x.mean())


def compare_tensor(name: str, opt: torch.Tensor | None, hi: torch.Tensor | None, lo: torch.Tensor | None,
                   tol: Tolerance, is_grad: bool) -> TensorCheck:
    """Apply the parity rule to one tensor. ``hi`` is the upcast reference, ``lo`` the same-dtype one."""
    nan = float("nan")
    if hi is None and opt is None:
        return TensorCheck(name, True, 0.0, 0.0, 0.0, 0.0, None, 0.0, tol.metric, "no gradient on either side")
    if opt is None:
        return TensorCheck(name, False, nan, 0.0, math.inf, nan, None, 0.0, tol.metric, "missing (reference has it)")
    if hi is None:
        hi = torch.zeros_like(opt)  # reference says 'no gradient': the impl must give zeros
    if tuple(opt.shape) != tuple(hi.shape):
        return TensorCheck(name, False, nan, 0.0, math.inf, nan, None, 0.0, tol.metric,
                           f"shape {tuple(opt.shape)} != reference {tuple(hi.shape)}")
    hi_cast = hi.to(opt.dtype)  # 'result cast back' to the dtype being judged
    o = opt.to(hi.device, torch.float64)
    h = hi_cast.to(torch.float64)
    bad_o, bad_h = ~torch.isfinite(o), ~torch.isfinite(h)
    detail = ""
    ok = True
    if bool(bad_o.any() or bad_h.any()):
        same_place = torch.equal(bad_o, bad_h)
        same_value = torch.equal(torch.nan_to_num(o[bad_o], nan=7.0), torch.nan_to_num(h[bad_h], nan=7.0)) \
            if same_place else False
        if not (same_place and same_value):
            ok = False
            n = int((bad_o != bad_h).sum()) if same_place is False else int(bad_o.sum())
            detail = f"{n} non-finite element(s) where the reference differs (NaN/Inf or unwritten output)"
    finite = ~(bad_o | bad_h)
    diff = (o - h).abs()[finite]
    error = _stat(diff, tol.metric)
    mean_error = float(diff.mean()) if diff.numel() else 0.0
    scale = float(h[finite].abs().max()) if bool(finite.any()) else 0.0
    lo_err = None
    bound = tol.atol + tol.rtol * scale
    if tol.three_way and lo is not None:
        lo_d = lo.to(hi.device, torch.float64)
        lo_diff = (lo_d - h).abs()[finite & torch.isfinite(lo_d)]
        lo_err = _stat(lo_diff, tol.metric)
        bound += (tol.k_grad if is_grad else tol.k) * lo_err + rounding_floor(hi_cast)
        if opt.dtype == torch.float32:
            bound += tol.fp32_ulps * float(torch.finfo(torch.float32).eps) * scale
    if scale > 0 and tol.max_rel_bound > 0:
        bound = min(bound, tol.max_rel_bound * scale)
    ratio = error / bound if bound > 0 else (0.0 if error == 0 else math.inf)
    ok = ok and error <= bound
    return TensorCheck(name, ok, error, bound, ratio, mean_error, lo_err, scale, tol.metric, detail)


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def default_hi_dtype(case: Case) -> torch.dtype:
    return torch.float64 if case.get("dtype", "fp32") in ("fp32", "float32") else torch.float32


def make_grad_outputs(outs: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """One random ``g`` per differentiable output, drawn in the output's dtype on the CPU (reproducible)."""
    gen = torch.Generator().manual_seed(seed + 7919)
    return {n: torch.randn(o.shape, generator=gen, dtype=torch.float32).to(o.dtype).to(o.device)
            for n, o in outs.items() if o.is_floating_point()}


def check_parity(suite: Suite, impl: Impl, ref: Impl, case: Case, device: str, *, trials: int | None = None,
                 seed: int = 0, reference_device: str | None = None, backward: bool = True) -> ParityVerdict:
    """Run the parity rule for one impl on one case; the verdict keeps each tensor's worst trial."""
    ref_dev = reference_device or device
    hi_dtype = suite.hi_dtype(case) if suite.hi_dtype else default_hi_dtype(case)  # None: as given
    if hi_dtype == torch.float64 and str(ref_dev).startswith("mps"):
        ref_dev = "cpu"  # MPS has no fp64: the high-precision reference moves to the CPU
    n_trials = trials or suite.trials
    do_bwd = backward and impl.backward and ref.backward
    verdict = ParityVerdict(ok=True, trials=n_trials, backward_checked=do_bwd, reference_device=str(ref_dev),
                            hi_dtype=str(hi_dtype).replace("torch.", "") if hi_dtype else "as-given")
    policies = set()
    for trial in range(n_trials):
        base = suite.make_inputs(case, device, seed + trial)
        made: dict[str, torch.Tensor] = {}

        def grads_for(outs: dict[str, torch.Tensor], _seed: int = seed + trial) -> dict[str, torch.Tensor]:
            made.update(make_grad_outputs(outs, _seed))
            return made

        if suite.three_way_reference:
            lo_out, lo_grads = call_impl(ref, leaves(base, None, None), grads_for if do_bwd else None)
            g_lo = made if do_bwd else None
            g_hi = ({n: g.to(ref_dev).to(hi_dtype or g.dtype) for n, g in g_lo.items()}
                    if g_lo is not None else None)
            hi_out, hi_grads = call_impl(ref, leaves(base, hi_dtype, ref_dev), g_hi)
        else:  # one reference run, in the dtype it is given (or upcast when the suite names a hi_dtype)
            hi_out, hi_grads = call_impl(ref, leaves(base, hi_dtype, ref_dev), grads_for if do_bwd else None)
            g_lo = {n: g.to(device) for n, g in made.items()} if do_bwd else None
            lo_out, lo_grads = {}, {}

        opt_in = leaves(base, None, None)
        snapshot = {n: t.detach().clone() for n, t in opt_in.tensors.items() if isinstance(t, torch.Tensor)}
        opt_out, opt_grads = call_impl(impl, opt_in, g_lo, poison=True)
        verdict.metrics.update(opt_in.meta.get("metrics", {}))
        for n, before in snapshot.items():
            if not _bitwise_equal(before, opt_in.tensors[n].detach()):
                verdict.problems.append(f"mutated its input {n!r}")

        pairs: list[tuple[str, Any, Any, Any, bool]] = []
        for n in hi_out:
            if n not in opt_out:
                verdict.problems.append(f"output {n!r} missing")
                continue
            if not hi_out[n].is_floating_point():
                okd, why = (suite.check_discrete(case, n, opt_out[n], hi_out[n], base) if suite.check_discrete
                            else (torch.equal(opt_out[n].cpu(), hi_out[n].cpu()), "ids differ from the reference"))
                verdict.checks.setdefault(n, TensorCheck(n, True, 0, 0, 0, 0, None, 0, "exact"))
                if not okd:
                    verdict.checks[n] = TensorCheck(n, False, 1, 0, math.inf, 1, None, 0, "exact", why)
                continue
            pairs.append((n, opt_out[n], hi_out[n], lo_out.get(n), False))
        if do_bwd:
            for n in base.grad:
                pairs.append((f"grad:{n}", opt_grads.get(n), hi_grads.get(n), lo_grads.get(n), True))
        for name, o, h, lo, is_grad in pairs:
            tol = suite.tolerance(case, name)
            policies.add(tol.why)
            check = compare_tensor(name, o, h, lo, tol, is_grad)
            prev = verdict.checks.get(name)
            if prev is None or (not check.ok and prev.ok) or (check.ok == prev.ok and check.ratio > prev.ratio):
                verdict.checks[name] = check

        if trial == 0 and suite.check_stability:  # stability: same inputs again must give the same bits
            again_out, again_grads = call_impl(impl, leaves(base, None, None), g_lo, poison=True)
            stable = True
            for n, o in opt_out.items():
                a = again_out.get(n)
                if impl.deterministic:
                    stable &= a is not None and _bitwise_equal(o, a)
                elif a is not None and o.is_floating_point():
                    stable &= _close_enough_twice(o, a)
            for n, gr in opt_grads.items():
                a = again_grads.get(n)
                if gr is not None and a is not None:
                    stable &= _bitwise_equal(gr, a) if impl.deterministic else _close_enough_twice(gr, a)
            verdict.stable = bool(stable)
            if not stable:
                verdict.problems.append("unstable: the same inputs gave different results")
    verdict.problems = sorted(set(verdict.problems))
    verdict.tolerance = "; ".join(sorted(policies))
    verdict.ok = not verdict.problems and all(c.ok for c in verdict.checks.values())
    return verdict


def case_dtype(case: Case) -> torch.dtype:
    """The case's test dtype (``dtype`` parameter, fp32 when absent)."""
    return torch_dtype(case.get("dtype", "fp32"))
