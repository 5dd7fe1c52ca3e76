"""Suites, cases and implementations; how operations register and how the harness finds them.

The harness knows no operation by name. Operation packages (``suites``/``impls`` and any vendor
plugin) register themselves on import; :func:`load_plugins` imports them through the entry-point
groups ``twinbench.suites`` / ``twinbench.impls`` and through ``--plugin FILE.py``.
An import that fails is kept with its reason (``import_failures``) instead of breaking the package,
except a plugin that imports the first version's module names (``harness.registry``): that is a usage
error naming the new module, since the plugin would otherwise silently never run.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import pkgutil
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

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
    # An output computed from other outputs' magnitudes (DPO rewards = beta * a difference of two log-prob
    # sums): its scale, for rtol and the max_rel_bound cap, is the larger of its own magnitude and
    # scale_factor * max|those outputs| — rounding in what it is computed from does not shrink when the
    # difference happens to be near 0 (docs/method.md §1).
    scale_of: tuple[str, ...] = ()
    scale_factor: float = 1.0
    why: str = "three-way rule (flash-attention): k=2 forward, k=3 gradients"


@dataclass(frozen=True)
class Statistic:
    """A number measured on an impl's outputs against its exact inputs rather than against the reference's
    outputs, with the bound the method derives for it (a quantiser's rounding error against fp64, bounded by
    its format: docs/low_precision.md §Parity). The impl is wrong when ``value > bound``; ``mean`` is the
    statistic's mean where it has one, ``note`` what else was counted (e.g. the fraction saturated)."""

    name: str
    value: float
    bound: float
    mean: float = 0.0
    note: str = ""


@dataclass(kw_only=True)
class Operation:
    """What kernel suites and training-loop experiments share: a name, case grids per profile, the declared
    case parameters, and the name of the reference impl the others are judged against."""

    name: str
    description: str
    profiles: Mapping[str, list[Case]]
    reference: str = "reference"
    # The case parameters and the rules between them; a typed --case that breaks them is a usage error.
    params: tuple[Param, ...] = ()
    rules: tuple[Rule, ...] = ()
    tags: tuple[str, ...] = ()
    # Kernel suites are timed by the harness (interleaved); experiments measure their own steps.
    timed: ClassVar[bool] = True

    def cases(self, profile: str) -> list[Case]:
        if profile not in self.profiles:
            raise UsageError(f"{type(self).__name__.lower()} {self.name!r} has no profile {profile!r} "
                             f"(has: {', '.join(sorted(self.profiles))})")
        return list(self.profiles[profile])


@dataclass(kw_only=True)
class Suite(Operation):
    """One kernel operation: its input factory, cost model and parity policy."""

    make_inputs: Callable[[Case, Any, int], Inputs]
    # FLOPs / bytes per case and direction: {"fwd": float, "bwd": float}; bwd may be absent.
    flops: Callable[[Case], Mapping[str, float]] | None = None
    bytes: Callable[[Case], Mapping[str, float]] | None = None
    tolerance: Callable[[Case, str], Tolerance] = lambda case, output: Tolerance()
    # Extra checks on outputs that are not floating point (router ids...): returns (ok, detail).
    check_discrete: Callable[[Case, str, Any, Any, Inputs], tuple[bool, str]] | None = None
    # Every output must have the dtype of the reference's run in the test dtype; an output whose dtype
    # legitimately differs names the dtype(s) it may have here: (case, output) -> a dtype, a tuple of
    # dtypes, or None for the rule.
    output_dtype: Callable[[Case, str], Any] | None = None
    # Dtype of the high-precision reference given the case dtype (None: fp32, or fp64 for fp32 cases).
    hi_dtype: Callable[[Case], Any] | None = None
    # Statistics of the impl's outputs against its inputs, each judged against its own bound (a quantiser's
    # error statistics against fp64): (case, impl outputs, inputs) -> [Statistic]; recorded as "stat:<name>".
    statistics: Callable[[Case, Mapping[str, Any], Inputs], list[Statistic]] | None = None
    trials: int = 3


@dataclass(frozen=True)
class ImplOrigin:
    """Where an impl's code came from, recorded with its results: module, file, installed distribution."""

    module: str
    file: str | None = None
    package: str | None = None  # the installed distribution providing the module, if any
    version: str | None = None

    def to_json(self) -> dict[str, str | None]:
        return {"module": self.module, "file": self.file, "package": self.package, "version": self.version}

    def describe(self) -> str:
        where = self.file or self.module
        return f"{where} ({self.package} {self.version})" if self.package else where


PLUGIN_MODULE_PREFIX = "twinbench_plugin_"  # load_plugin_file's module names: files loaded by path, never installed


@functools.cache
def _distribution_of(top_level: str) -> tuple[str | None, str | None]:
    """(installed distribution, version) providing the top-level module ``top_level``, or (None, None).

    The import name is usually the distribution's own (twinbench, torch, a vendor's package): a direct lookup,
    a few ms. Only otherwise the whole scan of installed distributions (``packages_distributions``, 0.5-1 s: every
    harness worker registers the built-in impls, and paid it at every start before 2026-12-06); never for the
    modules plugin files are loaded as, which no distribution provides."""
    if top_level.startswith(PLUGIN_MODULE_PREFIX):
        return None, None
    try:
        dist = importlib.metadata.distribution(top_level)
        return dist.metadata["Name"], dist.version
    except importlib.metadata.PackageNotFoundError:
        pass
    names = importlib.metadata.packages_distributions().get(top_level, [])
    if not names:
        return None, None
    try:
        return names[0], importlib.metadata.version(names[0])
    except importlib.metadata.PackageNotFoundError:
        return names[0], None


def origin_of(fn: Callable[..., Any]) -> ImplOrigin:
    module = getattr(fn, "__module__", None) or "?"
    try:
        file = inspect.getsourcefile(fn)
    except TypeError:
        file = None
    file = file or getattr(sys.modules.get(module), "__file__", None)
    package, version = _distribution_of(module.split(".")[0])
    return ImplOrigin(module=module, file=str(Path(file).resolve()) if file else None, package=package,
                      version=version)


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
    origin: ImplOrigin | None = None

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
    replace: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``@register_impl("attention", "sdpa", tags=("library",))`` on the impl callable.

    A name already registered by other code (a built-in impl, the reference included) is a usage error
    naming both sources unless ``replace=True``: a plugin must never silently stand in for what it is
    judged against. The same function registered again (a module imported twice) is not a replacement.
    """

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        source = f"{fn.__module__}.{getattr(fn, '__qualname__', fn)}"
        origin = origin_of(fn)
        known = IMPLS.get((suite, name))
        # the same function of the same file (a module imported twice, or under a second name) is no replacement
        same_code = known is not None and known.origin is not None and origin.file is not None and (
            known.origin.file, getattr(known.fn, "__qualname__", None)) == (origin.file, getattr(fn, "__qualname__", 0))
        if known is not None and not replace and not same_code:
            theirs = known.origin.describe() if known.origin else known.source
            raise UsageError(f"impl {name!r} of suite {suite!r} is already registered by {known.source} "
                             f"[{theirs}]; {source} [{origin.describe()}] registers it again: rename it, "
                             f"or pass replace=True to register_impl")
        impl = Impl(
            name=name,
            suite=suite,
            fn=fn,
            tags=tuple(tags),
            backward=backward,
            deterministic=deterministic,
            source=source,
            origin=origin,
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
    except UsageError:
        raise
    except Exception as exc:
        _refuse_legacy_import(package, exc)
        import_failures[package] = f"{type(exc).__name__}: {exc}"
        return
    for info in pkgutil.walk_packages(getattr(pkg, "__path__", []), prefix=f"{package}."):
        if info.name.rsplit(".", 1)[-1].startswith("_"):
            continue
        try:
            importlib.import_module(info.name)
        except UsageError:
            raise
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
    mod_name = f"{PLUGIN_MODULE_PREFIX}{abs(hash(str(p.resolve())))}"
    try:
        spec = importlib.util.spec_from_file_location(mod_name, p)
        if spec is None or spec.loader is None:
            raise ImportError("not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    except UsageError:
        raise
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
                except UsageError:
                    raise
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
