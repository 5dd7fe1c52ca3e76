"""The parity rule (docs/method.md §1): is an optimized impl computing the reference's function?

For every trial (fresh seeded inputs) the reference runs twice — upcast (``ref_hi``, possibly on another
device) and in the test dtype (``ref_lo``) — and the impl runs with poisoned allocations. Outputs and every
gradient (backward seeded with one random ``g`` per output) must satisfy
``err(opt, ref_hi) <= k * err(ref_lo, ref_hi) + rounding floor`` (or the suite's fixed bound).
Also checked: NaN/Inf placement, unwritten (poisoned) elements, input mutation and run-to-run stability.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from twinbench.harness.core.case import Case, torch_dtype
from twinbench.harness.core.registry import Impl, Inputs, Statistic, Suite, Tolerance

_aten = torch.ops.aten
# Every ATen op that hands out uninitialised memory (overload packets: all their overloads).
_EMPTY_OPS = frozenset({_aten.empty, _aten.empty_like, _aten.empty_strided, _aten.new_empty,
                        _aten.new_empty_strided, _aten.empty_permuted})


def poison_fill(t: torch.Tensor) -> None:
    """NaN for floating and complex tensors, the dtype's max for integers; bool is left alone."""
    if not t.numel() or t.dtype == torch.bool:
        return
    with torch.no_grad():
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        else:
            t.fill_(torch.iinfo(t.dtype).max)


class PoisonedAllocations(TorchDispatchMode):
    """While active, every uninitialised allocation that reaches the dispatcher comes back poisoned
    (:func:`poison_fill`), so an output element an impl never writes cannot pass (docs/method.md §1).

    A dispatch mode, not a ``torch.empty`` hook: it sees ``torch.empty*`` from Python, ``torch.ops.aten.empty*``
    and ``at::empty`` from a C++/CUDA extension alike, and it is active in backward too: the autograd
    engine restores the caller's thread-local state (the dispatch-mode stack included) on its device
    threads, so custom ``autograd.Function`` backwards on GPUs are covered as on the CPU. Not covered:
    allocations inside an op registered with the dispatcher (a ``torch.library`` custom op) — the mode
    sees the op, not what its kernel allocates below it.
    ``ignore_compile_internals``: a ``torch.compile``d impl still runs compiled (by default dynamo falls
    back to eager under a dispatch mode, and parity would judge code that is never timed).
    """

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in _EMPTY_OPS and isinstance(out, torch.Tensor):
            poison_fill(out)
        return out


# Parity arithmetic runs in float64 on the CPU, a chunk at a time: MPS has no float64, and full-size
# float64 copies of a large gradient (plus boolean index tensors) cost many times the tensor itself.
CHUNK_ELEMENTS = 1 << 20


def _blocks(shape: tuple[int, ...]) -> Iterator[tuple[Any, ...]]:
    """Index tuples that cover a tensor of ``shape`` in order, each at most :data:`CHUNK_ELEMENTS` elements
    (a whole dimension per block where it fits)."""
    if not shape:
        yield ()
        return
    inner = math.prod(shape[1:])
    if inner <= CHUNK_ELEMENTS:
        step = max(1, CHUNK_ELEMENTS // max(inner, 1))
        for i in range(0, shape[0], step):
            yield (slice(i, i + step),)
        return
    for i in range(shape[0]):
        for rest in _blocks(shape[1:]):
            yield (i, *rest)


def _host(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A chunk on the CPU (moved in its own dtype first, then converted there)."""
    t = t.detach().to("cpu")
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def _chunk_pairs(*tensors: torch.Tensor | None) -> Iterator[tuple[torch.Tensor | None, ...]]:
    """The same block of each tensor (all of one shape), on the CPU; None stays None."""
    shape = next(tuple(t.shape) for t in tensors if t is not None)
    for idx in _blocks(shape):
        yield tuple(None if t is None else _host(t[idx]) for t in tensors)


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
    detail: str = ""  # what failed besides the error (NaN/Inf placement, shape, dtype...), or a note
    misplaced_nonfinite: int = 0  # elements non-finite on one side only, or with another non-finite value

    def describe(self) -> str:
        """One line naming what failed: the error only when it is over its bound (a NaN/Inf placement
        failure with a zero error must not read as an error failure), then the detail."""
        parts = []
        if self.metric != "exact" and not math.isnan(self.error) and self.error > self.bound:
            parts.append(f"err {self.error:.3g} > bound {self.bound:.3g}")
        if self.detail:
            parts.append(self.detail)
        return f"{self.name}: {'; '.join(parts) or 'failed'}"


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

    def reason(self) -> str:
        """Why the impl is wrong: the problems, then each failed check (:meth:`TensorCheck.describe`)."""
        return "; ".join(self.problems + [c.describe() for c in self.checks.values() if not c.ok])

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
    try:  # the mode stays on through backward: a custom autograd.Function's backward allocates too
        result, metrics = split_metrics(impl.fn(**inputs.tensors, **inputs.static))
        outs = normalize_outputs(result)
        if metrics:
            inputs.meta.setdefault("metrics", {}).update(metrics)
        grads: dict[str, torch.Tensor | None] = {}
        if callable(grad_out):
            grad_out = grad_out(outs)
        if grad_out is not None and inputs.grad:
            # An output of the wrong shape is left out of backward (its seed ``g`` cannot apply): it is
            # judged 'wrong' by its shape, and gradients it alone leads to are 'missing', never a crash.
            pairs = [(o, grad_out[n]) for n, o in outs.items()
                     if n in grad_out and o.requires_grad and o.shape == grad_out[n].shape]
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


def _rounding_gap(chunk: torch.Tensor) -> float:
    """The rounding error of the chunk's dtype at its magnitude: the larger of what an add of 0.3 loses and
    half an ulp at the chunk's largest finite value. The add alone is 0 for ~70% of single bf16 values
    (0.6484375 + 0.3 - 0.3 is exact), so a tensor of a few elements (one token's 8 router weights) could get
    a bound of 0 and fail an impl one ulp off; the half ulp keeps it honest there."""
    r = torch.nan_to_num(chunk, nan=0.0, posinf=0.0, neginf=0.0)
    if not r.numel():
        return 0.0
    added = float(((r + 0.3) - 0.3 - r).abs().max())
    largest = float(r.abs().max())
    if largest == 0.0 or not r.is_floating_point():
        return added
    half_ulp = 0.5 * float(torch.finfo(r.dtype).eps) * 2.0 ** math.floor(math.log2(largest))
    return max(added, half_ulp)


def _finite_abs_max(chunk: torch.Tensor) -> float:
    if not chunk.numel():
        return 0.0
    a = chunk.to(torch.float64).abs()
    return float(a.masked_fill_(~torch.isfinite(a), 0.0).max())


def rounding_floor(ref_cast: torch.Tensor) -> float:
    """2 * max|(ref + 0.3 - 0.3) - ref| in the output's own dtype: the rounding error at its magnitude."""
    if not ref_cast.is_floating_point() or ref_cast.numel() == 0:
        return 0.0
    return 2.0 * max(_rounding_gap(c) for (c,) in _chunk_pairs(ref_cast))


def reorder_allowance(t: torch.Tensor, fp32_ulps: float = Tolerance.fp32_ulps) -> float:
    """How far two runs of a non-deterministic impl (atomics, parallel scatter-add) may differ: twice the
    rounding floor, plus for fp32 the same few ulps at the tensor's scale that the parity bound allows for
    reordered sums (the rounding floor alone is a fraction of one ulp at magnitude 0.3)."""
    allowance = 2 * rounding_floor(t)
    if t.dtype == torch.float32 and t.numel():
        scale = max(_finite_abs_max(c) for (c,) in _chunk_pairs(t))
        allowance += fp32_ulps * float(torch.finfo(torch.float32).eps) * scale
    return allowance


def _close_enough_twice(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Non-deterministic impls: the same inputs twice agree within :func:`reorder_allowance` (NaN in place)."""
    if a.shape != b.shape or not a.is_floating_point():
        return _bitwise_equal(a, b)
    allowance = reorder_allowance(a) + 1e-30
    for x, y in _chunk_pairs(a, b):
        x, y = x.to(torch.float64), y.to(torch.float64)
        if not torch.equal(x.isnan(), y.isnan()):
            return False
        if bool(((x - y).abs().nan_to_num_(nan=0.0) > allowance).any()):
            return False
    return True


@dataclass
class _Sums:
    """Running max, sum and count of a non-negative quantity over chunks."""

    max: float = 0.0
    total: float = 0.0
    count: int = 0

    def add(self, values: torch.Tensor, keep: torch.Tensor) -> None:
        picked = values.masked_fill_(~keep, 0.0)
        if picked.numel():
            self.max = max(self.max, float(picked.max()))
            self.total += float(picked.sum())
        self.count += int(keep.sum())

    def stat(self, metric: str) -> float:
        if self.count == 0:
            return 0.0
        return self.max if metric == "max" else self.total / self.count


def compare_tensor(name: str, opt: torch.Tensor | None, hi: torch.Tensor | None, lo: torch.Tensor | None,
                   tol: Tolerance, is_grad: bool, *, source_scale: float = 0.0) -> TensorCheck:
    """Apply the parity rule to one tensor. ``hi`` is the upcast reference, ``lo`` the same-dtype one.

    ``source_scale``: the magnitude of what the tensor is computed from (``Tolerance.scale_of``); the bound's
    relative terms and its cap use the larger of it and the reference's own magnitude.
    Runs chunk by chunk in float64 on the CPU: the extra memory is a few chunks, whatever the tensor's size
    and device.
    """
    if hi is None and opt is None:
        return TensorCheck(name=name, ok=True, error=0.0, bound=0.0, ratio=0.0, mean_error=0.0, ref_lo_error=None,
                           scale=0.0, metric=tol.metric, detail="no gradient on either side")
    if opt is None:
        return _unmeasurable(name, tol, "missing (reference has it)")
    if hi is not None and tuple(opt.shape) != tuple(hi.shape):
        return _unmeasurable(name, tol, f"shape {tuple(opt.shape)} != reference {tuple(hi.shape)}")
    three_way = tol.three_way and lo is not None
    if three_way and tuple(lo.shape) != tuple(opt.shape):
        lo, three_way = None, False
    err, lo_err, misplaced = _Sums(), _Sums(), 0
    scale = floor = 0.0
    for o, h, lo_c in _chunk_pairs(opt, hi, lo if three_way else None):
        # hi None: the reference says 'no gradient', so the impl must give zeros
        h_cast = torch.zeros_like(o) if h is None else h.to(o.dtype)  # 'result cast back' to the judged dtype
        floor = max(floor, _rounding_gap(h_cast)) if three_way and o.is_floating_point() else floor
        o64, h64 = o.to(torch.float64), h_cast.to(torch.float64)
        bad_o, bad_h = ~torch.isfinite(o64), ~torch.isfinite(h64)
        # a non-finite element passes only where the reference has the same non-finite value
        same = torch.nan_to_num(o64, nan=7.0, posinf=8.0, neginf=9.0) == torch.nan_to_num(h64, nan=7.0, posinf=8.0,
                                                                                          neginf=9.0)
        misplaced += int((bad_o ^ bad_h).sum()) + int((bad_o & bad_h & ~same).sum())
        finite = ~(bad_o | bad_h)
        scale = max(scale, float(h64.abs().masked_fill_(~finite, 0.0).max()) if h64.numel() else 0.0)
        err.add((o64 - h64).abs_(), finite)
        if lo_c is not None:
            lo64 = lo_c.to(torch.float64)
            lo_err.add((lo64 - h64).abs_(), finite & torch.isfinite(lo64))
    error = err.stat(tol.metric)
    mean_error = err.stat("mean")
    relative_to = max(scale, source_scale)
    bound = tol.atol + tol.rtol * relative_to
    lo_error = None
    if three_way:
        lo_error = lo_err.stat(tol.metric)
        bound += (tol.k_grad if is_grad else tol.k) * lo_error + 2.0 * floor
        if opt.dtype == torch.float32:
            bound += tol.fp32_ulps * float(torch.finfo(torch.float32).eps) * relative_to
    if relative_to > 0 and tol.max_rel_bound > 0:
        bound = min(bound, tol.max_rel_bound * relative_to)
    ratio = error / bound if bound > 0 else (0.0 if error == 0 else math.inf)
    detail = ""
    if misplaced:
        detail = (f"NaN/Inf placement: {misplaced} element(s) non-finite where the reference is finite or "
                  f"differently non-finite (a NaN, or an unwritten output)")
    return TensorCheck(name=name, ok=not misplaced and error <= bound, error=error, bound=bound, ratio=ratio,
                       mean_error=mean_error, ref_lo_error=lo_error, scale=scale, metric=tol.metric, detail=detail,
                       misplaced_nonfinite=misplaced)


def _unmeasurable(name: str, tol: Tolerance, detail: str) -> TensorCheck:
    """A failed check with no error to measure (missing tensor, wrong shape): NaN error, infinite ratio."""
    nan = float("nan")
    return TensorCheck(name=name, ok=False, error=nan, bound=0.0, ratio=math.inf, mean_error=nan, ref_lo_error=None,
                       scale=0.0, metric=tol.metric, detail=detail)


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    for x, y in _chunk_pairs(a, b):
        if x.is_floating_point() or x.is_complex():
            if not bool(((x == y) | (x.isnan() & y.isnan())).all()):
                return False
        elif not torch.equal(x, y):
            return False
    return True


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
    hi_dtype: torch.dtype

    @property
    def hi_dtype_label(self) -> str:
        return str(self.hi_dtype).replace("torch.", "")


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
    # the dtype of each output of the reference run in the test dtype (empty when no such run exists)
    test_dtypes: dict[str, torch.dtype] = field(default_factory=dict)


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
    lo_out, lo_grads = call_impl(ref, leaves(inputs, None, None), first_grad_outputs)
    hi_grad_outputs = ({n: g.to(placement.device).to(placement.hi_dtype) for n, g in drawn.items()}
                       if backward else None)
    hi_out, hi_grads = call_impl(ref, leaves(inputs, placement.hi_dtype, placement.device), hi_grad_outputs)
    return ReferenceRuns(hi_outputs=hi_out, hi_grads=hi_grads, lo_outputs=lo_out, lo_grads=lo_grads,
                         grad_outputs=drawn if backward else None, test_dtypes={n: o.dtype for n, o in lo_out.items()})


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


def source_scale(tol: Tolerance, refs: ReferenceRuns) -> float:
    """``tol.scale_factor * max|ref_hi|`` over the outputs named in ``tol.scale_of`` (0 when none)."""
    named = [refs.hi_outputs[n] for n in tol.scale_of if n in refs.hi_outputs]
    mags = [max(_finite_abs_max(c) for (c,) in _chunk_pairs(t)) for t in named if t.numel()]
    return tol.scale_factor * max(mags, default=0.0)


def _measure(suite: Suite, case: Case, found: TrialChecks, refs: ReferenceRuns, name: str,
             opt: torch.Tensor | None, hi: torch.Tensor | None, lo: torch.Tensor | None, *, is_grad: bool) -> None:
    tol = suite.tolerance(case, name)
    found.policies.add(tol.why)
    found.measured.append(compare_tensor(name, opt, hi, lo, tol, is_grad, source_scale=source_scale(tol, refs)))


def expected_dtypes(suite: Suite, case: Case, refs: ReferenceRuns, name: str) -> tuple[torch.dtype, ...]:
    """The dtypes output ``name`` may have: the suite's override, else the reference's test-dtype run's
    (empty: not checked, no such run)."""
    declared = suite.output_dtype(case, name) if suite.output_dtype else None
    if declared is not None:
        allowed = declared if isinstance(declared, tuple) else (declared,)
        return tuple(torch_dtype(d) if isinstance(d, str) else d for d in allowed)
    return (refs.test_dtypes[name],) if name in refs.test_dtypes else ()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _with_dtype_failure(check: TensorCheck, got: torch.dtype, allowed: tuple[torch.dtype, ...]) -> TensorCheck:
    why = f"dtype {_dtype_name(got)} != reference's {' or '.join(map(_dtype_name, allowed))}"
    return replace(check, ok=False, ratio=math.inf, detail="; ".join(filter(None, [why, check.detail])))


def compare_outputs(suite: Suite, case: Case, refs: ReferenceRuns, run: ImplRun, inputs: Inputs) -> TrialChecks:
    """Every reference output against the impl's: exact for ids, the parity rule for floats; every output's
    dtype against the reference's run in the test dtype (an fp32 result for a bf16 case is wrong)."""
    found = TrialChecks()
    for name, hi in refs.hi_outputs.items():
        if name not in run.outputs:
            found.problems.append(f"output {name!r} missing")
            continue
        opt = run.outputs[name]
        if not hi.is_floating_point():
            found.exact.append(compare_exact(suite, case, name, opt, hi, inputs))
        else:
            _measure(suite, case, found, refs, name, opt, hi, refs.lo_outputs.get(name), is_grad=False)
        allowed = expected_dtypes(suite, case, refs, name)
        if allowed and opt.dtype not in allowed:
            checks = found.exact if not hi.is_floating_point() else found.measured
            checks[-1] = _with_dtype_failure(checks[-1], opt.dtype, allowed)
    if suite.statistics is not None:
        found.measured += [statistic_check(s) for s in suite.statistics(case, run.outputs, inputs)]
    return found


def statistic_check(stat: Statistic) -> TensorCheck:
    """A suite's :class:`Statistic` as a check named ``stat:<name>``: ok when its value is within its bound
    (a NaN value never is), merged over trials and recorded like any output's error."""
    ok = not math.isnan(stat.value) and stat.value <= stat.bound
    ratio = stat.value / stat.bound if stat.bound > 0 else (0.0 if stat.value == 0 else math.inf)
    return TensorCheck(name=f"stat:{stat.name}", ok=ok, error=stat.value, bound=stat.bound,
                       ratio=math.inf if math.isnan(ratio) else ratio, mean_error=stat.mean, ref_lo_error=None,
                       scale=0.0, metric="max", detail=stat.note)


def compare_gradients(suite: Suite, case: Case, refs: ReferenceRuns, run: ImplRun, inputs: Inputs,
                      found: TrialChecks) -> None:
    """Every input gradient the suite names (``grad:<input>``) by the parity rule, with the gradients' k."""
    for n in inputs.grad:
        _measure(suite, case, found, refs, f"grad:{n}", run.grads.get(n), refs.hi_grads.get(n),
                 refs.lo_grads.get(n), is_grad=True)


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


# The priming call's inputs: the same case drawn from another seed than any trial's.
PRIMING_SEED_OFFSET = 1_000_003


def prime(suite: Suite, impl: Impl, case: Case, device: str, seed: int,
          grad_outputs: dict[str, torch.Tensor] | None) -> None:
    """Call the impl once, forward and backward, on other inputs of the same case and discard the result,
    just before the first checked run: an impl that returns a result cached from its previous call
    (whatever the cache is keyed on) then gives that other input's result, and the first trial sees it.
    A re-run on the same inputs cannot: the cached result is the right one there (docs/method.md §1)."""
    other = suite.make_inputs(case, device, seed + PRIMING_SEED_OFFSET)
    call_impl(impl, leaves(other, None, None), grad_outputs, poison=True)


def _nonfinite_inputs(inputs: Inputs) -> list[str]:
    return [n for n, t in inputs.tensors.items()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def finite_twin(inputs: Inputs) -> Inputs:
    """The same inputs with every non-finite float element set to 0: a NaN row makes whole reference
    gradients NaN (a router-weight gradient sums over every row), and nothing behind it is compared."""
    tensors = {n: (torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)
                   if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
               for n, t in inputs.tensors.items()}
    return Inputs(tensors=tensors, static=dict(inputs.static), grad=inputs.grad, meta=inputs.meta)


@dataclass(frozen=True)
class _Trial:
    """What one comparison needs beyond the suite and impls."""

    placement: ReferencePlacement
    device: str
    backward: bool


def run_trial(suite: Suite, impl: Impl, ref: Impl, case: Case, inputs: Inputs, trial: _Trial, grad_seed: int,
              *, before_impl: Callable[[ReferenceRuns], None] | None = None) -> tuple[TrialChecks, ImplRun,
                                                                                          ReferenceRuns]:
    """The reference runs, the poisoned impl run, and their comparison on one set of inputs."""
    refs = run_reference(suite, ref, inputs, trial.placement, trial.device, grad_seed=grad_seed,
                         backward=trial.backward)
    if before_impl is not None:
        before_impl(refs)
    run = run_impl_poisoned(impl, inputs, refs.grad_outputs)
    found = compare_outputs(suite, case, refs, run, inputs)
    found.problems += [f"mutated its input {n!r}" for n in run.mutated]
    if trial.backward:
        compare_gradients(suite, case, refs, run, inputs, found)
    return found, run, refs


def _noted(found: TrialChecks, note: str) -> TrialChecks:
    """Checks from a twin run, their details saying which inputs they were measured on."""
    def tag(c: TensorCheck) -> TensorCheck:
        return replace(c, detail="; ".join(filter(None, [c.detail, note])))
    return TrialChecks(exact=[tag(c) for c in found.exact], measured=[tag(c) for c in found.measured],
                       problems=[f"{p} ({note})" for p in found.problems], policies=found.policies)


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
    worst trial. Trial ``t`` draws its inputs and output gradients from ``seed + t``. A trial whose inputs
    hold NaN/Inf is run a second time with them set to 0 (:func:`finite_twin`), so gradients the
    non-finite values turn entirely NaN are still compared somewhere."""
    placement = reference_placement(suite, case, device, reference_device)
    do_backward = backward and impl.backward and ref.backward
    verdict = ParityVerdict(ok=True, trials=trials or suite.trials, backward_checked=do_backward,
                            reference_device=placement.device, hi_dtype=placement.hi_dtype_label)
    setup = _Trial(placement=placement, device=device, backward=do_backward)
    policies: set[str] = set()
    for trial in range(verdict.trials):
        inputs = suite.make_inputs(case, device, seed + trial)
        priming = None
        if trial == 0:
            def priming(refs: ReferenceRuns) -> None:
                prime(suite, impl, case, device, seed, refs.grad_outputs)
        found, run, refs = run_trial(suite, impl, ref, case, inputs, setup, seed + trial, before_impl=priming)
        verdict.metrics.update(run.metrics)
        merge_trial(verdict, found)
        policies |= found.policies
        if trial == 0:  # the same inputs again must give the same results
            verdict.stable = rerun_is_stable(impl, inputs, refs.grad_outputs, run)
            if not verdict.stable:
                verdict.problems.append("unstable: the same inputs gave different results")
        del run, refs
        if bad := _nonfinite_inputs(inputs):
            twin, _, _ = run_trial(suite, impl, ref, case, finite_twin(inputs), setup, seed + trial)
            merge_trial(verdict, _noted(twin, f"on the inputs with NaN/Inf in {', '.join(bad)} set to 0"))
            policies |= twin.policies
    verdict.problems = sorted(set(verdict.problems))
    verdict.tolerance = "; ".join(sorted(policies))
    verdict.ok = not verdict.problems and all(c.ok for c in verdict.checks.values())
    return verdict


def case_dtype(case: Case) -> torch.dtype:
    """The case's test dtype (``dtype`` parameter, fp32 when absent)."""
    return torch_dtype(case.get("dtype", "fp32"))
