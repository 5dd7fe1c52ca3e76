"""Case: a frozen, hashable set of parameters with a stable string id, parsable from the command line."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from twinbench.harness.core.errors import UsageError

DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}
_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16",
            "float64": "fp64", "double": "fp64"}


def torch_dtype(name: str):
    """'bf16' -> torch.bfloat16 (also accepts the long names)."""
    import torch

    short = _ALIASES.get(name, name)
    if short not in DTYPE_NAMES:
        raise UsageError(f"unknown dtype {name!r} (use one of {', '.join(DTYPE_NAMES)})")
    return getattr(torch, DTYPE_NAMES[short])


def dtype_name(dtype) -> str:
    """torch.bfloat16 -> 'bf16'."""
    long = str(dtype).replace("torch.", "")
    return _ALIASES.get(long, long)


def _parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return _ALIASES.get(text.strip(), text.strip())


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class Case:
    """Parameters in the suite's own order; equal cases hash equal whatever the order."""

    items: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, params: Mapping[str, Any] | None = None, **kw: Any) -> Case:
        merged = dict(params or {}, **kw)
        for key, value in merged.items():
            if isinstance(value, (list, dict, set)):
                raise TypeError(f"case parameter {key} must be a scalar, got {type(value).__name__}")
        return cls(tuple(merged.items()))

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.items, key=lambda kv: kv[0])))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Case) and dict(self.items) == dict(other.items)

    def __getitem__(self, key: str) -> Any:
        return dict(self.items)[key]

    def __contains__(self, key: str) -> bool:
        return key in dict(self.items)

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.items).get(key, default)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.items)

    def replace(self, **kw: Any) -> Case:
        return Case.of(self.as_dict(), **kw)

    @property
    def id(self) -> str:
        return ",".join(f"{k}={_format_value(v)}" for k, v in self.items)

    def __str__(self) -> str:
        return self.id

    @staticmethod
    def parse_overrides(text: str) -> dict[str, Any]:
        """'batch=1,seq=77,dtype=bf16' -> {'batch': 1, 'seq': 77, 'dtype': 'bf16'}; malformed -> UsageError."""
        out: dict[str, Any] = {}
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise UsageError(f"malformed --case {text!r}: expected key=value[,key=value...], got {part!r}")
            key, _, value = part.partition("=")
            key = key.strip()
            if not key.isidentifier() or not value.strip():
                raise UsageError(f"malformed --case {text!r}: bad pair {part!r}")
            out[key] = _parse_value(value)
        if not out:
            raise UsageError(f"malformed --case {text!r}: no key=value pairs")
        return out


def select_cases(grid: Iterable[Case], case_args: Iterable[str], suite_name: str, *,
                 params: Iterable[Param] = (), rules: Iterable[Rule] = ()) -> list[Case]:
    """Cases to run: the grid, or for each ``--case`` the grid cases it matches, else a new case.

    A ``--case`` whose keys all exist in the grid filters it when some grid case matches; otherwise it
    builds a new case from the first grid case with those values overridden ("any shape a user types").
    A new case must satisfy the suite's declared ``params`` and ``rules``, else it is a usage error.
    """
    params, rules = list(params), list(rules)
    grid = list(grid)
    case_args = list(case_args)
    if not case_args:
        return grid
    if not grid:
        raise UsageError(f"suite {suite_name!r} has no cases to override")
    known = set(grid[0].as_dict())
    chosen: list[Case] = []
    for text in case_args:
        over = Case.parse_overrides(text)
        unknown = sorted(set(over) - known)
        if unknown:
            raise UsageError(
                f"--case {text!r}: suite {suite_name!r} has no parameter {', '.join(unknown)} "
                f"(parameters: {', '.join(grid[0].as_dict())})"
            )
        matches = [c for c in grid if all(c.get(k) == v for k, v in over.items())]
        if not matches:
            built = grid[0].replace(**over)
            problems = case_problems(built, params, rules)
            if problems:
                raise UsageError(f"--case {text!r}: suite {suite_name!r}: {'; '.join(problems)}")
            matches = [built]
        for c in matches:
            if c not in chosen:
                chosen.append(c)
    return chosen


@dataclass(frozen=True)
class Param:
    """One case parameter a suite accepts: its type and valid values, checked before any worker starts.

    ``kind`` is int, float, bool or str; ``low``/``high`` are inclusive bounds for numbers; ``choices`` lists
    the allowed values where the set is closed (dtypes, loss types). A typed value the reference would choke
    on (``head_dim=-1``, ``tokens=16.5``, ``norm=maybe``) is the user's mistake, not a crash of some impl.
    """

    name: str
    kind: type
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()

    def problem(self, value: Any) -> str:
        """Why ``value`` is not valid for this parameter ('' when it is)."""
        if self.kind is bool:
            ok_type = isinstance(value, bool)
        elif self.kind is int:
            ok_type = isinstance(value, int) and not isinstance(value, bool)
        elif self.kind is float:
            ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok_type = isinstance(value, self.kind)
        if not ok_type:
            return f"must be {'true or false' if self.kind is bool else 'an integer' if self.kind is int else self.kind.__name__}, got {_format_value(value)!r}"
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(_format_value(c) for c in self.choices)}, got {_format_value(value)!r}"
        if self.low is not None and value < self.low:
            return f"must be >= {_format_value(self.low)}, got {_format_value(value)}"
        if self.high is not None and value > self.high:
            return f"must be <= {_format_value(self.high)}, got {_format_value(value)}"
        if self.kind is float and not math.isfinite(value):
            return f"must be finite, got {_format_value(value)}"
        return ""


@dataclass(frozen=True)
class Rule:
    """A constraint between parameters (``top_k <= experts``): ``holds(case)`` and how to say it."""

    holds: Callable[[Case], bool]
    text: str


def DTYPE_PARAM(*allowed: str) -> Param:  # noqa: N802 (reads as a constant in the suites' declarations)
    """The ``dtype`` parameter with the short names a suite supports (default: fp32, fp16, bf16)."""
    return Param("dtype", str, choices=allowed or ("fp32", "fp16", "bf16"))


def case_problems(case: Case, params: Iterable[Param], rules: Iterable[Rule] = ()) -> list[str]:
    """Everything wrong with ``case`` under the suite's declarations; empty when it is valid."""
    declared = {p.name: p for p in params}
    if not declared:  # a suite (or a plugin's) that declares nothing is not checked
        return []
    problems = [f"{key} is not a parameter (parameters: {', '.join(declared)})"
                for key in case.as_dict() if key not in declared]
    problems += [f"{name} is missing" for name in declared if name not in case]
    for key, value in case.items:
        why = declared[key].problem(value) if key in declared else ""
        if why:
            problems.append(f"{key} {why}")
    if not problems:  # rules read the values, so only once every value is well-typed
        problems += [rule.text for rule in rules if not rule.holds(case)]
    return problems
