"""Suites declare each case parameter's type and valid values: a typed --case that breaks them is the user's
mistake (one line, exit 2, before any worker starts), never a crash blamed on an impl."""

from __future__ import annotations

import pytest
from twinbench.harness.cli.main import main
from twinbench.harness.core.case import DTYPE_PARAM, Case, Param, Rule, case_problems, select_cases
from twinbench.harness.core.errors import UsageError
from twinbench.harness.core.registry import SUITES, load_plugins

load_plugins()
DECLARING = sorted(name for name, suite in SUITES.items() if suite.params)


def test_every_kernel_suite_declares_its_parameters():
    assert {"attention", "gating", "moe_ffn", "quant_linear", "dpo"} <= set(DECLARING)


@pytest.mark.parametrize("name", DECLARING)
def test_every_profile_case_satisfies_its_suite(name):
    suite = SUITES[name]
    for profile, cases in suite.profiles.items():
        for case in cases:
            assert case_problems(case, suite.params, suite.rules) == [], (profile, case.id)


@pytest.mark.parametrize(("param", "value", "fragment"), [
    (Param("n", int, low=1), 0, "must be >= 1"),
    (Param("n", int, low=1), 16.5, "must be an integer"),
    (Param("n", int, low=1), True, "must be an integer"),
    (Param("flag", bool), "maybe", "must be true or false"),
    (Param("x", float, low=0.0, high=0.5), 0.7, "must be <= 0.5"),
    (Param("x", float), float("nan"), "must be finite"),
    (DTYPE_PARAM(), "fp8", "must be one of fp32, fp16, bf16"),
])
def test_a_bad_value_is_named(param, value, fragment):
    assert fragment in param.problem(value)


@pytest.mark.parametrize("value", [1, 7, 2 ** 40])
def test_a_good_value_passes(value):
    assert Param("n", int, low=1).problem(value) == ""


def test_rules_run_only_on_well_typed_values_and_unknown_keys_are_named():
    params = (Param("top_k", int, low=1), Param("experts", int, low=1))
    rules = (Rule(lambda c: c["top_k"] <= c["experts"], "top_k must be <= experts"),)
    assert case_problems(Case.of(top_k=9, experts=4), params, rules) == ["top_k must be <= experts"]
    assert case_problems(Case.of(top_k=9.5, experts=4), params, rules) == ["top_k must be an integer, got '9.5'"]
    assert "bogus is not a parameter" in case_problems(Case.of(top_k=1, experts=4, bogus=1), params, rules)[0]


def test_select_cases_refuses_a_typed_shape_that_breaks_a_rule():
    grid = [Case.of(top_k=2, experts=8)]
    params = (Param("top_k", int, low=1), Param("experts", int, low=1))
    rules = (Rule(lambda c: c["top_k"] <= c["experts"], "top_k must be <= experts"),)
    with pytest.raises(UsageError, match="top_k must be <= experts"):
        select_cases(grid, ["top_k=9,experts=4"], "toy", params=params, rules=rules)
    assert select_cases(grid, ["top_k=3"], "toy", params=params, rules=rules) == [Case.of(top_k=3, experts=8)]


@pytest.mark.parametrize(("suite", "case", "fragment"), [
    ("attention", "seq_q=0", "seq_q must be >= 1, got 0"),
    ("attention", "head_dim=-1", "head_dim must be >= 1, got -1"),
    ("attention", "heads=6,kv_heads=4", "heads must be a multiple of kv_heads"),
    ("gating", "tokens=16.5", "tokens must be an integer"),
    ("gating", "top_k=9,experts=4", "top_k must be <= experts"),
    ("gating", "norm=maybe", "norm must be true or false"),
    ("moe_ffn", "routing=sideways", "routing must be one of balanced, skewed, one_expert"),
    ("dpo", "beta=0", "beta must be >= 1e-06"),
])
def test_cli_refuses_a_bad_case_with_one_line_and_writes_nothing(tmp_path, capsys, suite, case, fragment):
    # In process (like tests/test_cli.py): the refusal comes before any worker, so a subprocess per case would
    # only add a torch import; `python -m twinbench` itself is exercised by the end-to-end tests.
    out = tmp_path / "run"
    code = main(["run", suite, "--case", case, "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and err.count("\n") == 1, err
    assert not out.exists()
