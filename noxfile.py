"""nox sessions: tests, lint, bench, full. Each installs the CPU torch build unless TWINBENCH_TORCH_SPEC says
otherwise (e.g. TWINBENCH_TORCH_SPEC="torch" with your CUDA/ROCm index configured)."""

import os

import nox

nox.options.sessions = ["lint", "tests"]
CONSTRAINTS = ".ci/constraints-cpu.txt"


def _install(session: nox.Session) -> None:
    spec = os.environ.get("TWINBENCH_TORCH_SPEC")
    if spec:
        session.install(spec)
        session.install("-e", ".[all]")
    else:
        session.install("-c", CONSTRAINTS, "-e", ".[all]")


@nox.session
def tests(session: nox.Session) -> None:
    """The project's own tests (CPU)."""
    _install(session)
    session.run("python", "-m", "pytest", "-q", *(session.posargs or ["-n", "2", "--dist", "loadfile"]))


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def bench(session: nox.Session) -> None:
    """The harness's own micro-benchmarks (pytest-benchmark), then the quick suites' performance run."""
    _install(session)
    session.run("python", "-m", "pytest", "tests/test_bench_harness.py", "--benchmark-enable",
                "--benchmark-autosave", "-p", "no:randomly")
    session.run("twinbench", "run", "--device", "cpu", "--out", "runs/bench", *session.posargs)


@nox.session
def full(session: nox.Session) -> None:
    """Every suite's full profile on every detected device (hours on a CPU; meant for GPU machines)."""
    _install(session)
    session.run("twinbench", "run", "--profile", "full", "--out", "runs/full", *session.posargs)


@nox.session
def aot(session: nox.Session) -> None:
    """Every Triton kernel variant compiled ahead of time for every GPU target (sm80/89/90/100, gfx942, gfx1201):
    the compile table, and exit 1 when a variant fails a check (CI compiles a subset: tests/test_aot_compile.py)."""
    _install(session)
    session.run("python", "tests/aot_variants.py", "--full", "--out", "runs/aot.json", *session.posargs)
