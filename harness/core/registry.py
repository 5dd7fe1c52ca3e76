"""Suites, cases and implementations; how operations register and how the harness finds them.

The harness knows no operation by name. Operation packages (``suites``/``impls`` and any vendor
plugin) register themselves on import; :func:`load_plugins` imports them through the entry-point
groups ``twinbench.suites`` / ``twinbench.impls`` and through ``--plugin FILE.py``.
An import that fails is kept with its reason (``import_failures``) instead of breaking the package,
except a plugin that imports the first version's module names (``harness.registry``): that is a usage
error naming the new module, since the plugin would otherwise silently never run.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import pkgutil
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twinbench.harness.core.case import Case, Param, Rule
from twinbench.harness.core.errors import UsageError
from twinbench.harness.core.legacy_names import legacy_import_hint


@dataclass
class Inputs:
    """What ``Suite.make_inputs`` returns: tensors (some requiring grad) plus static arguments.

    An impl is called as ``fn(**tensors, **static)``. ``grad`` names the tensors whose gradients the
    parity check compares (they are created with ``requires_grad=True`` by the harness).
    ``meta`` is free-form, JSON-serialisable data recorded with the result (e.g. tokens per expert).
    """

    tensors: dict[str, Any]
    static: dict[str, Any] = field(default_factory=dict)
    grad: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Tolerance:
    """How close an optimized output (or gradient) must be to the high-precision reference.

    ``three_way`` (docs/method.md §1): bound = k * max|ref_lo - ref_hi| + rounding floor + atol + rtol*scale.
    Without it (no low-precision reference path exists, e.g. NF4 or losses): bound = atol + rtol*scale,
    where scale = max|ref_hi|. ``metric`` is the error statistic: "max" abs error or "mean" abs error.
    ``max_rel_bound`` caps any bound at that share of the reference's own magnitude, so a loose policy
    can never let an all-zero output pass (KernelBench issue #165).
    """

    three_way: bool = True
    k: float = 2.0
    k_grad: float = 3.0
    atol: float = 0.0
    rtol: float = 0.0
    metric: str = "max"
    max_rel_bound: float = 0.1
    # fp32 outputs: differently ordered fp32 sums differ by a few ulps, and ref_lo (one such order) can be
    # luckily exact, so the three-way bound also gets this many fp32 ulps at the output's scale; 16 sits
    # above the largest reordering gap measured so far (docs/method.md §1, the measurement in §7).
    fp32_ulps: float = 16.0
    why: str = "three-way rule (flash-attention): k=2 forward, k=3 gradients"


@dataclass
class Suite:
    """One operation family: its case grids, input factory, cost model and parity policy."""

    name: str
    description: str
    profiles: Mapping[str, list[Case]]
    make_inputs: Callable[[Case, Any, int], Inputs]
    reference: str = "reference"
    # FLOPs / bytes per case and direction: {"fwd": float, "bwd": float}; bwd may be absent.
    flops: Callable[[Case], Mapping[str, float]] | None = None
    bytes: Callable[[Case], Mapping[str, float]] | None = None
    tolerance: Callable[[Case, str], Tolerance] = lambda case, output: Tolerance()
    # Extra checks on outputs that are not floating point (router ids...): returns (ok, detail).
    check_discrete: Callable[[Case, str, Any, Any, Inputs], tuple[bool, str]] | None = None
    # The case parameters and the rules between them; a typed --case that breaks them is a usage error.
    params: tuple[Param, ...] = ()
    rules: tuple[Rule, ...] = ()
    # Dtype used for the high-precision reference given the case dtype (None: fp32, or fp64 for fp32).
    hi_dtype: Callable[[Case], Any] | None = None
    trials: int = 3
    # Training loops: no upcast/low-precision pair (hi_dtype returning None runs the reference as-is),
    # no second run for stability, and no interleaved timing (the impl reports its own "metrics").
    # Allowed values of categorical case parameters ({"kind": ("llama", "qwen3_moe")}): a --case naming
    # anything else is a usage error before anything runs, not a crash recorded later.
    choices: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    three_way_reference: bool = True
    check_stability: bool = True
    timed: bool = True
    tags: tuple[str, ...] = ()

    def check_choices(self, case: Case) -> None:
        for key, allowed in self.choices.items():
            if key in case and case[key] not in allowed:
                raise UsageError(f"case {case.id}: suite {self.name!r} has no {key} {case[key]!r} "
                                 f"(choose from: {', '.join(map(str, allowed))})")

    def cases(self, profile: str) -> list[Case]:
        if profile not in self.profiles:
            raise UsageError(
                f"suite {self.name!r} has no profile {profile!r} (has: {', '.join(sorted(self.profiles))})"
            )
        return list(self.profiles[profile])


@dataclass
class Impl:
    """One implementation of a suite's operation.

    ``available(device) -> (ok, why_not)`` must be cheap and must not raise; ``device`` is a
    :class:`twinbench.harness.core.devices.Device`. ``tags``: "reference", "ours", "library", "peer",
    "interpreter-on-cpu" (Triton: runs through the interpreter on CPU, parity only, never timed).
    """

    name: str
    suite: str
    fn: Callable[..., Any]
    available: Callable[[Any], tuple[bool, str]] = lambda device: (True, "")
    tags: tuple[str, ...] = ()
    backward: bool = True
    deterministic: bool = True
    # Case filter: (ok, why_not) for a case this impl cannot do (e.g. a dtype, a head_dim).
    supports: Callable[[Case, Any], tuple[bool, str]] = lambda case, device: (True, "")
    source: str = ""

    def can_run(self, case: Case | None, device: Any) -> tuple[bool, str]:
        try:
            ok, why = self.available(device)
            if ok and case is not None:
                ok, why = self.supports(case, device)
        except Exception as exc:  # an availability probe that breaks is itself a reason
            return False, f"availability check raised {type(exc).__name__}: {exc}"
        return bool(ok), str(why or "")

    def timing_excluded(self, device: Any) -> str:
        """Why this impl is never timed on this device ('' when it is timed)."""
        if "interpreter-on-cpu" in self.tags and getattr(device, "backend", "") == "cpu":
            return "Triton interpreter on CPU: parity only, speed is meaningless"
        return ""


SUITES: dict[str, Suite] = {}
# Training loops (harness.core.experiment.Experiment): also in SUITES, the catalogue that `list` and the
# planner read; harness.run.worker hands their cases to harness.run.experiment_case.
EXPERIMENTS: dict[str, Any] = {}
IMPLS: dict[tuple[str, str], Impl] = {}
import_failures: dict[str, str] = {}
_loaded_sources: set[str] = set()


def register_suite(suite: Suite) -> Suite:
    SUITES[suite.name] = suite
    return suite


def register_impl(
    suite: str,
    name: str,
    *,
    available: Callable[[Any], tuple[bool, str]] | None = None,
    tags: Iterable[str] = (),
    backward: bool = True,
    deterministic: bool = True,
    supports: Callable[[Case, Any], tuple[bool, str]] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``@register_impl("attention", "sdpa", tags=("library",))`` on the impl callable."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        impl = Impl(
            name=name,
            suite=suite,
            fn=fn,
            tags=tuple(tags),
            backward=backward,
            deterministic=deterministic,
            source=f"{fn.__module__}.{getattr(fn, '__qualname__', fn)}",
        )
        if available is not None:
            impl.available = available
        if supports is not None:
            impl.supports = supports
        IMPLS[(suite, name)] = impl
        return fn

    return wrap


def impls_for(suite: str) -> list[Impl]:
    """The suite's impls, reference first, then in registration order."""
    ref = SUITES[suite].reference if suite in SUITES else None
    found = [i for (s, _), i in IMPLS.items() if s == suite]
    return sorted(found, key=lambda i: i.name != ref)


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        known = ", ".join(sorted(SUITES)) or "none"
        raise UsageError(f"unknown suite {name!r} (known: {known})")
    return SUITES[name]


def _refuse_legacy_import(where: str | Path, exc: BaseException) -> None:
    """A plugin written against the first version's module names: one line naming the new import."""
    hint = legacy_import_hint(exc)
    if hint is not None:
        old, new = hint
        raise UsageError(f"plugin {where}: {old!r} is twinbench's first-version import; use {new!r}") from None


def _import_package_tree(package: str) -> None:
    """Import a package and every module below it, keeping failures with their reason."""
    try:
        pkg = importlib.import_module(package)
    except Exception as exc:
        _refuse_legacy_import(package, exc)
        import_failures[package] = f"{type(exc).__name__}: {exc}"
        return
    for info in pkgutil.walk_packages(getattr(pkg, "__path__", []), prefix=f"{package}."):
        if info.name.rsplit(".", 1)[-1].startswith("_"):
            continue
        try:
            importlib.import_module(info.name)
        except Exception as exc:
            _refuse_legacy_import(info.name, exc)
            import_failures[info.name] = f"{type(exc).__name__}: {exc}"


def load_plugin_file(path: str | Path) -> None:
    """Import one plugin file (``--plugin FILE.py``); a broken one is a usage error."""
    p = Path(path)
    key = f"file:{p.resolve()}"
    if key in _loaded_sources:
        return
    if not p.is_file():
        raise UsageError(f"plugin file not found: {p}")
    mod_name = f"twinbench_plugin_{abs(hash(str(p.resolve())))}"
    try:
        spec = importlib.util.spec_from_file_location(mod_name, p)
        if spec is None or spec.loader is None:
            raise ImportError("not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    except Exception as exc:
        _refuse_legacy_import(p, exc)
        last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
        where = f" (line {last[0].lineno})" if last else ""
        raise UsageError(f"cannot load plugin {p}{where}: {type(exc).__name__}: {exc}") from None
    _loaded_sources.add(key)


def load_plugins(plugin_files: Iterable[str | Path] = ()) -> None:
    """Load built-in and installed operations (entry points), then ``--plugin`` files. Idempotent."""
    for group in ("twinbench.suites", "twinbench.impls"):
        for ep in importlib.metadata.entry_points(group=group):
            key = f"ep:{group}:{ep.value}"
            if key in _loaded_sources:
                continue
            _loaded_sources.add(key)
            if ":" in ep.value:  # "module:attr" form: load it as-is
                try:
                    ep.load()
                except Exception as exc:
                    _refuse_legacy_import(ep.value, exc)
                    import_failures[ep.value] = f"{type(exc).__name__}: {exc}"
            else:
                _import_package_tree(ep.value)
    # Running from a source checkout without `pip install`: discover the built-in packages directly.
    for group, package in (("twinbench.suites", "twinbench.suites"), ("twinbench.impls", "twinbench.impls")):
        if f"ep:{group}:{package}" not in _loaded_sources:
            _loaded_sources.add(f"ep:{group}:{package}")
            _import_package_tree(package)
    for path in plugin_files:
        load_plugin_file(path)
