"""Stand-ins for the two commands of the nightly recipe that need a Ray cluster (tests/test_nightly_recipe.py).

``twinbench run ... --cluster`` and ``ray job submit ... -- twinbench bisect ...`` are parsed exactly as
the real command line would parse them, then, instead of running: ``run`` copies a prepared results file
into its ``--out``, ``ray`` appends the job's entrypoint to a log. Every other ``twinbench`` command runs
for real. A command this checkout does not have yet (``run --cluster``, ``bisect``: issue #19's other
parts) is parsed without it and written to the log as unchecked.

Usage (the executables the test writes): ``python3 nightly_shims.py twinbench|ray ARGS...``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

CLUSTER_OPTIONS = ("--cluster", "--cluster-resource")
RAY_FLAGS = ("--no-wait",)  # the `ray job submit` options the recipe uses that take no value


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def parse_check(argv: list[str]) -> tuple[argparse.Namespace | None, list[str]]:
    """Parse a twinbench command line without running it: (its arguments, what was left unchecked).

    A line that does not parse raises AssertionError naming it (the recipe has rotted).
    """
    from twinbench.harness.cli.main import build_parser
    from twinbench.harness.core.errors import UsageError

    parser = build_parser()
    commands = _subcommands(parser)
    if argv[0] == "bisect" and "bisect" not in commands:
        return None, ["twinbench bisect (not in this checkout)"]
    unchecked = []
    if argv[0] == "run" and "--cluster" not in commands["run"]._option_string_actions:
        kept, skip = [], False
        for word in argv:
            if skip:
                skip = False
            elif word in CLUSTER_OPTIONS:
                skip = True
            else:
                kept.append(word)
        argv, unchecked = kept, ["twinbench run --cluster (not in this checkout)"]
    try:
        return parser.parse_args(argv), unchecked
    except (UsageError, SystemExit) as exc:
        raise AssertionError(f"`twinbench {shlex.join(argv)}` does not parse: {exc}") from None


def _log(entry: dict) -> None:
    with open(os.environ["RECIPE_LOG"], "a") as f:
        f.write(json.dumps(entry) + "\n")


def twinbench(argv: list[str]) -> int:
    if argv[:1] == ["run"] and any(word in CLUSTER_OPTIONS for word in argv):
        args, unchecked = parse_check(argv)
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(os.environ["RECIPE_RESULTS"], args.out / "results.json")
        _log({"command": ["twinbench", *argv], "unchecked": unchecked})
        return 0
    from twinbench.harness.cli.main import main

    return main(argv)


def ray(argv: list[str]) -> int:
    split = argv.index("--")
    options, entrypoint = argv[:split], argv[split + 1:]
    assert options[:2] == ["job", "submit"], options
    values: dict[str, str | bool] = {}
    words = iter(options[2:])
    for word in words:
        assert word.startswith("--"), options
        values[word] = True if word in RAY_FLAGS else next(words)
    for option in ("--runtime-env-json", "--entrypoint-resources"):
        if option in values:
            json.loads(values[option])
    if "--working-dir" in values:
        assert Path(values["--working-dir"], entrypoint[-1]).is_file(), (values["--working-dir"], entrypoint)
    unchecked = parse_check(entrypoint[1:])[1] if entrypoint[0] == "twinbench" else []
    _log({"command": ["ray", *argv], "entrypoint": entrypoint, "options": values, "unchecked": unchecked})
    return 0


if __name__ == "__main__":
    sys.exit({"twinbench": twinbench, "ray": ray}[sys.argv[1]](sys.argv[2:]))
