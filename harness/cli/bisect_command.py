"""`twinbench bisect GOOD BAD`: the first commit where a case got slower or broke parity (harness/gate/bisect.py).

Exit 0 when the first bad commit is named, 1 when it is not (BAD is no worse than GOOD, or undecided steps
leave a range), 2 on a user mistake (unknown ref, GOOD not an ancestor of BAD, a plugin path outside the
repository or with uncommitted changes, an unwritable --json).
"""

from __future__ import annotations

import sys
from pathlib import Path

from twinbench.harness.core.errors import UsageError


def register(sub) -> None:
    from twinbench.harness.cli.results_commands import _add_gate_options, _add_selection

    p = sub.add_parser("bisect", help="find the first commit between GOOD and BAD where a case got slower "
                                      "(or broke parity), each step gated against GOOD")
    p.add_argument("good", metavar="GOOD", help="a commit (ref) where the case was fine")
    p.add_argument("bad", metavar="BAD", help="a later commit (ref) where it is slower or fails parity")
    p.add_argument("--repo", type=Path, default=None,
                   help="the repository to bisect (default: this twinbench checkout); --plugin paths are relative "
                        "to it and each commit's own copy is loaded")
    p.add_argument("--parity", action="store_true",
                   help="bisect a parity failure (automatic when BAD fails parity)")
    p.add_argument("--json", type=Path, default=None, help="write the steps and the result here (JSON)")
    _add_gate_options(p, threshold_help="product threshold (default 0.02, as gate --against)")
    _add_selection(p)
    p.set_defaults(handler=cmd_bisect)


def cmd_bisect(args) -> int:
    from twinbench.harness.cli.results_commands import _gate_config, _measurement
    from twinbench.harness.gate import against, bisect
    from twinbench.harness.run.process import WorkerFailed
    from twinbench.harness.store.results import Output, atomic_write_json, check_outputs

    if not args.suites or not args.impl:
        raise UsageError("bisect needs --suite and --impl: the case that got slower")
    if args.json:
        check_outputs([Output("--json", args.json)])
    code = bisect.code_under_test(args.repo, args.plugin)
    selection = against.Selection(suites=list(args.suites), impls=list(args.impl), cases=list(args.case),
                                  profile=args.profile, device=args.device)
    options = bisect.BisectOptions(good=args.good, bad=args.bad, code=code, selection=selection,
                                   measurement=_measurement(args), parity=args.parity)
    config = _gate_config(args, threshold=against.DEFAULT_THRESHOLD, test=against.DEFAULT_TEST)
    try:
        result = bisect.run_bisect(options, config)
    except WorkerFailed as exc:  # GOOD's or BAD's worker: without them there is no bisection
        print(f"twinbench: bisect stopped: {str(exc).splitlines()[0][:300]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # main's message offers --resume, which bisect has not
        print("twinbench: bisect interrupted; its worktrees and workers are gone, nothing was written",
              file=sys.stderr)
        return 130
    print(bisect.format_table(result))
    if args.json:
        atomic_write_json(args.json, result.to_json())
        print(f"wrote {args.json}")
    return result.exit_code
