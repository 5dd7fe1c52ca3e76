"""The parity rule (docs/method.md §1): is an optimized impl computing the reference's function?

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
    if hi is None and opt is None:
        return TensorCheck(name=name, ok=True, error=0.0, bound=0.0, ratio=0.0, mean_error=0.0, ref_lo_error=None,
                           scale=0.0, metric=tol.metric, detail="no gradient on either side")
    if opt is None:
        return _unmeasurable(name, tol, "missing (reference has it)")
    if hi is None:
        hi = torch.zeros_like(opt)  # reference says 'no gradient': the impl must give zeros
    if tuple(opt.shape) != tuple(hi.shape):
        return _unmeasurable(name, tol, f"shape {tuple(opt.shape)} != reference {tuple(hi.shape)}")
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
    return TensorCheck(name=name, ok=ok, error=error, bound=bound, ratio=ratio, mean_error=mean_error,
                       ref_lo_error=lo_err, scale=scale, metric=tol.metric, detail=detail)


def _unmeasurable(name: str, tol: Tolerance, detail: str) -> TensorCheck:
    """A failed check with no error to measure (missing tensor, wrong shape): NaN error, infinite ratio."""
    nan = float("nan")
    return TensorCheck(name=name, ok=False, error=nan, bound=0.0, ratio=math.inf, mean_error=nan, ref_lo_error=None,
                       scale=0.0, metric=tol.metric, detail=detail)


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


@dataclass(frozen=True)
class ReferencePlacement:
    """Where and in which dtype the high-precision reference (``ref_hi``) runs."""

    device: str
    hi_dtype: torch.dtype | None  # None: the reference runs in the dtype it is given (training loops)

    @property
    def hi_dtype_label(self) -> str:
        return str(self.hi_dtype).replace("torch.", "") if self.hi_dtype else "as-given"


def reference_placement(suite: Suite, case: Case, device: str, reference_device: str | None) -> ReferencePlacement:
    """The suite's high-precision dtype on ``reference_device`` (default: the impl's device); MPS has no
    fp64, so an fp64 reference asked of MPS runs on the CPU."""
    ref_device = str(reference_device or device)
    hi_dtype = suite.hi_dtype(case) if suite.hi_dtype else default_hi_dtype(case)
    if hi_dtype == torch.float64 and ref_device.startswith("mps"):
        ref_device = "cpu"
    return ReferencePlacement(device=ref_device, hi_dtype=hi_dtype)


@dataclass
class ReferenceRuns:
    """One trial's reference results, and the output gradients the impl's backward is seeded with."""

    hi_outputs: dict[str, torch.Tensor]
    hi_grads: dict[str, torch.Tensor | None]
    lo_outputs: dict[str, torch.Tensor]  # empty without a three-way reference
    lo_grads: dict[str, torch.Tensor | None]
    grad_outputs: dict[str, torch.Tensor] | None  # on the impl's device; None when backward is not checked


def run_reference(suite: Suite, ref: Impl, inputs: Inputs, placement: ReferencePlacement, device: str, *,
                  grad_seed: int, backward: bool) -> ReferenceRuns:
    """``ref_lo`` (test dtype) then ``ref_hi`` (upcast) for a three-way suite, else ``ref_hi`` alone.

    The output gradients are drawn once, from the first run's outputs, and the same ``g`` seeds every
    backward of the trial, so the three gradients differ only by the code and dtype that computed them.
    """
    drawn: dict[str, torch.Tensor] = {}

    def draw_grad_outputs(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        drawn.update(make_grad_outputs(outputs, grad_seed))
        return drawn

    first_grad_outputs = draw_grad_outputs if backward else None
    if not suite.three_way_reference:  # one reference run, as given or upcast when the suite names a hi_dtype
        hi_out, hi_grads = call_impl(ref, leaves(inputs, placement.hi_dtype, placement.device), first_grad_outputs)
        grad_outputs = {n: g.to(device) for n, g in drawn.items()} if backward else None
        return ReferenceRuns(hi_outputs=hi_out, hi_grads=hi_grads, lo_outputs={}, lo_grads={},
                             grad_outputs=grad_outputs)
    lo_out, lo_grads = call_impl(ref, leaves(inputs, None, None), first_grad_outputs)
    hi_grad_outputs = ({n: g.to(placement.device).to(placement.hi_dtype or g.dtype) for n, g in drawn.items()}
                       if backward else None)
    hi_out, hi_grads = call_impl(ref, leaves(inputs, placement.hi_dtype, placement.device), hi_grad_outputs)
    return ReferenceRuns(hi_outputs=hi_out, hi_grads=hi_grads, lo_outputs=lo_out, lo_grads=lo_grads,
                         grad_outputs=drawn if backward else None)


@dataclass
class ImplRun:
    """The impl's outputs and input gradients under poisoned allocations, and what it did to its inputs."""

    outputs: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor | None]
    metrics: dict[str, Any]  # self-measured numbers (training loops)
    mutated: list[str]  # inputs it changed in place


def run_impl_poisoned(impl: Impl, inputs: Inputs, grad_outputs: dict[str, torch.Tensor] | None) -> ImplRun:
    """Run the impl on fresh leaves of ``inputs`` with poisoned ``torch.empty*``; inputs are compared
    bit for bit before and after, since an impl that writes into its inputs corrupts the caller's tensors."""
    own = leaves(inputs, None, None)
    before = {n: t.detach().clone() for n, t in own.tensors.items() if isinstance(t, torch.Tensor)}
    outputs, grads = call_impl(impl, own, grad_outputs, poison=True)
    mutated = [n for n, t in before.items() if not _bitwise_equal(t, own.tensors[n].detach())]
    # ``leaves`` shares ``meta`` with ``inputs``: the metrics are those every run of this trial reported so far
    return ImplRun(outputs=outputs, grads=grads, metrics=dict(own.meta.get("metrics", {})), mutated=mutated)


@dataclass
class TrialChecks:
    """One trial's comparisons, before they are merged into the verdict."""

    exact: list[TensorCheck] = field(default_factory=list)  # non-float outputs (ids): equal or not
    measured: list[TensorCheck] = field(default_factory=list)  # float outputs, then gradients
    problems: list[str] = field(default_factory=list)
    policies: set[str] = field(default_factory=set)  # the tolerances' reasons, for the verdict's summary


def compare_exact(suite: Suite, case: Case, name: str, opt: torch.Tensor, hi: torch.Tensor,
                  inputs: Inputs) -> TensorCheck:
    """A non-float output (router ids...): the suite's own rule (ties may be allowed), else equality."""
    if suite.check_discrete:
        ok, why = suite.check_discrete(case, name, opt, hi, inputs)
    else:
        ok, why = torch.equal(opt.cpu(), hi.cpu()), "ids differ from the reference"
    if ok:
        return TensorCheck(name=name, ok=True, error=0, bound=0, ratio=0, mean_error=0, ref_lo_error=None,
                           scale=0, metric="exact")
    return TensorCheck(name=name, ok=False, error=1, bound=0, ratio=math.inf, mean_error=1, ref_lo_error=None,
                       scale=0, metric="exact", detail=why)


def _measure(suite: Suite, case: Case, found: TrialChecks, name: str, opt: torch.Tensor | None,
             hi: torch.Tensor | None, lo: torch.Tensor | None, *, is_grad: bool) -> None:
    tol = suite.tolerance(case, name)
    found.policies.add(tol.why)
    found.measured.append(compare_tensor(name, opt, hi, lo, tol, is_grad))


def compare_outputs(suite: Suite, case: Case, refs: ReferenceRuns, run: ImplRun, inputs: Inputs) -> TrialChecks:
    """Every reference output against the impl's: exact for ids, the parity rule for floats."""
    found = TrialChecks()
    for name, hi in refs.hi_outputs.items():
        if name not in run.outputs:
            found.problems.append(f"output {name!r} missing")
        elif not hi.is_floating_point():
            found.exact.append(compare_exact(suite, case, name, run.outputs[name], hi, inputs))
        else:
            _measure(suite, case, found, name, run.outputs[name], hi, refs.lo_outputs.get(name), is_grad=False)
    return found


def compare_gradients(suite: Suite, case: Case, refs: ReferenceRuns, run: ImplRun, inputs: Inputs,
                      found: TrialChecks) -> None:
    """Every input gradient the suite names (``grad:<input>``) by the parity rule, with the gradients' k."""
    for n in inputs.grad:
        _measure(suite, case, found, f"grad:{n}", run.grads.get(n), refs.hi_grads.get(n), refs.lo_grads.get(n),
                 is_grad=True)


def same_results(first: ImplRun, again: ImplRun, *, deterministic: bool) -> bool:
    """Two runs on the same inputs: bit-identical for a deterministic impl; otherwise float tensors agree
    within :func:`reorder_allowance` (non-float outputs of a non-deterministic impl are not compared)."""
    for name, out in first.outputs.items():
        other = again.outputs.get(name)
        if deterministic:
            if other is None or not _bitwise_equal(out, other):
                return False
        elif other is not None and out.is_floating_point() and not _close_enough_twice(out, other):
            return False
    same = _bitwise_equal if deterministic else _close_enough_twice
    return all(same(g, again.grads[n]) for n, g in first.grads.items()
               if g is not None and again.grads.get(n) is not None)


def rerun_is_stable(impl: Impl, inputs: Inputs, grad_outputs: dict[str, torch.Tensor] | None,
                    first: ImplRun) -> bool:
    """Run the impl again on the same inputs: does it give the same results (:func:`same_results`)?"""
    outputs, grads = call_impl(impl, leaves(inputs, None, None), grad_outputs, poison=True)
    again = ImplRun(outputs=outputs, grads=grads, metrics={}, mutated=[])
    return same_results(first, again, deterministic=impl.deterministic)


def merge_trial(verdict: ParityVerdict, found: TrialChecks) -> None:
    """Keep each tensor's worst trial: a failure over a pass, then the higher error/bound ratio.
    An exact check keeps its latest failure (a ratio cannot rank two wrong id sets)."""
    for check in found.exact:
        if check.name not in verdict.checks or not check.ok:
            verdict.checks[check.name] = check
    for check in found.measured:
        prev = verdict.checks.get(check.name)
        if prev is None or (prev.ok and not check.ok) or (check.ok == prev.ok and check.ratio > prev.ratio):
            verdict.checks[check.name] = check
    verdict.problems += found.problems


def check_parity(suite: Suite, impl: Impl, ref: Impl, case: Case, device: str, *, trials: int | None = None,
                 seed: int = 0, reference_device: str | None = None, backward: bool = True) -> ParityVerdict:
    """Run the parity rule for one impl on one case (docs/method.md §1); the verdict keeps each tensor's
    worst trial. Trial ``t`` draws its inputs and output gradients from ``seed + t``."""
    placement = reference_placement(suite, case, device, reference_device)
    do_backward = backward and impl.backward and ref.backward
    verdict = ParityVerdict(ok=True, trials=trials or suite.trials, backward_checked=do_backward,
                            reference_device=placement.device, hi_dtype=placement.hi_dtype_label)
    policies: set[str] = set()
    for trial in range(verdict.trials):
        inputs = suite.make_inputs(case, device, seed + trial)
        refs = run_reference(suite, ref, inputs, placement, device, grad_seed=seed + trial, backward=do_backward)
        run = run_impl_poisoned(impl, inputs, refs.grad_outputs)
        verdict.metrics.update(run.metrics)
        verdict.problems += [f"mutated its input {n!r}" for n in run.mutated]
        found = compare_outputs(suite, case, refs, run, inputs)
        if do_backward:
            compare_gradients(suite, case, refs, run, inputs, found)
        merge_trial(verdict, found)
        policies |= found.policies
        if trial == 0 and suite.check_stability:  # the same inputs again must give the same results
            verdict.stable = rerun_is_stable(impl, inputs, refs.grad_outputs, run)
            if not verdict.stable:
                verdict.problems.append("unstable: the same inputs gave different results")
    verdict.problems = sorted(set(verdict.problems))
    verdict.tolerance = "; ".join(sorted(policies))
    verdict.ok = not verdict.problems and all(c.ok for c in verdict.checks.values())
    return verdict


def case_dtype(case: Case) -> torch.dtype:
    """The case's test dtype (``dtype`` parameter, fp32 when absent)."""
    return torch_dtype(case.get("dtype", "fp32"))
