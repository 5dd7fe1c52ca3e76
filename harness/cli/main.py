"""The `twinbench` command. User mistakes print one line and exit 2; failures found exit 1."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from pathlib import Path

from twinbench.harness.cli import arguments, ci_output
from twinbench.harness.core.errors import UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own usage errors: one line, exit 2
        raise UsageError(message)


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="parity + performance for suites x devices x cases x impls")
    p.add_argument("suites", nargs="*", help="suite names (default: every suite with the profile)")
    p.add_argument("--device", action="append", default=[], help="cpu, cuda:0, xpu:0, mps (repeatable; default all)")
    p.add_argument("--impl", action="append", default=[], help="only these impls (the reference always runs)")
    p.add_argument("--case", action="append", default=[], help="key=value[,key=value...]: filter or new shape")
    p.add_argument("--profile", default="quick", help="quick (default), full, seed, or a suite's own profile")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/<timestamp>)")
    p.add_argument("--plugin", action="append", default=[], help="extra impls/suites from a Python file")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run in --out")
    p.add_argument("--timeout", type=arguments.positive_float, default=600.0,
                   help="seconds without progress before a case is a hang")
    p.add_argument("--trials", type=arguments.positive_int, default=None, help="parity trials (fresh inputs) per case")
    p.add_argument("--seed", type=arguments.nonnegative_int, default=0)
    p.add_argument("--reference-device", default=None, help="compute the high-precision reference here (e.g. cpu)")
    p.add_argument("--no-timing", action="store_true", help="parity only")
    p.add_argument("--rounds", type=arguments.rounds, default=None, help="interleaved timing rounds (>= 7)")
    p.add_argument("--budget", type=arguments.positive_float, default=None, help="timing seconds per case and mode")
    p.add_argument("--threads", type=arguments.positive_int, default=None, help="CPU threads for the CPU worker")
    p.add_argument("--memory-limit-gb", type=arguments.positive_float, default=None,
                   help="CPU worker address-space cap")
    p.add_argument("--no-report", action="store_true", help="skip report.html/summary.md/junit.xml")
    p.add_argument("--cluster", default=None, metavar="ADDRESS",
                   help="spread the run over a Ray cluster (default: $RAY_ADDRESS; 'local' starts one here)")
    p.add_argument("--cluster-resource", action="append", default=[], metavar="NAME",
                   help="only nodes offering this Ray resource (e.g. accelerator_type:H100; repeatable)")
    ci_output.add_options(p)
    # a run's journal keeps every finished record, so an interrupted run is finished, not restarted
    p.set_defaults(handler=cmd_run, interrupt_hint=" (finish with --resume)")


def cmd_run(args) -> int:
    from twinbench.harness.cli.console import print_table
    from twinbench.harness.core.timing import TimingPlan
    from twinbench.harness.run import process, runner
    from twinbench.harness.run.plan import RunOptions

    plan = TimingPlan()
    if args.rounds is not None:
        plan.rounds = args.rounds
    if args.budget is not None:
        plan.budget_s = args.budget
    out = args.out or Path("runs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    _check_run_folder(out, report=not args.no_report)
    options = RunOptions(
        suites=args.suites, devices=args.device, impls=args.impl, cases=args.case, profile=args.profile,
        out=out, plugins=[str(Path(p).resolve()) for p in args.plugin], resume=args.resume,
        timeout=args.timeout, trials=args.trials, seed=args.seed, reference_device=args.reference_device,
        timing=not args.no_timing, plan=plan, threads=args.threads, memory_limit_gb=args.memory_limit_gb,
        report=not args.no_report, triton_interpret=process.user_triton_interpret())
    address = args.cluster or os.environ.get("RAY_ADDRESS") or None  # `ray job submit` sets RAY_ADDRESS
    if args.cluster_resource and not address:
        raise UsageError("--cluster-resource needs --cluster ADDRESS (or RAY_ADDRESS)")
    if address:
        from twinbench.harness.cluster.driver import ClusterOptions, run_on_cluster

        doc = run_on_cluster(options, ClusterOptions(address, tuple(args.cluster_resource)))
    else:
        doc = runner.run(options)
    print_table(doc)
    written = [out / "results.json"]
    if options.report:
        written += _write_reports(doc, out)
    print("wrote " + ", ".join(str(p) for p in written))
    ci_output.publish(doc, annotations=args.annotations)
    return runner.exit_code(doc)


def _check_run_folder(out: Path, *, report: bool) -> None:
    """A run writes only into a new folder or its own (one with its journal, for --resume)."""
    from twinbench.harness.store.results import Output, check_outputs
    from twinbench.reports import REPORT_FILES

    if (out / "results.json").exists() and not (out / "journal.jsonl").exists():
        raise UsageError(f"--out {out} holds a results.json that no run journal there produced; "
                         f"choose another --out (it is not overwritten)")
    names = ["results.json", "journal.jsonl", *(REPORT_FILES if report else ())]
    check_outputs([Output("--out", out, folder=True), *(Output("--out", out / n) for n in names)])


def _write_reports(doc, out: Path) -> list[Path]:
    try:
        from twinbench import reports
    except ImportError:
        return []
    write_all = getattr(reports, "write_all", None)
    return list(write_all(doc, out) or []) if write_all else []


def cmd_devices(args) -> int:
    from twinbench.harness.core import devices

    found = devices.detect()
    if args.json:
        print(json.dumps([{"device": d.as_dict(), "fingerprint": devices.fingerprint(d)} for d in found], indent=1))
        return 0
    from rich.table import Table
    from twinbench.harness.cli.console import make_console

    table = Table(title="devices")
    for col in ("name", "backend", "model", "arch", "units", "memory", "dtypes", "fingerprint"):
        table.add_column(col)
    for d in found:
        table.add_row(d.name, d.backend, d.model, d.arch, str(d.compute_units), f"{d.memory_bytes / 2**30:.1f} GiB",
                      ",".join(d.dtypes), devices.fingerprint(d)["id"])
    make_console().print(table)
    return 0


def cmd_list(args) -> int:
    """Every impl per device: can it run there, and why not — before anything runs.

    The probes run in a worker per device (its environment, as a run would see it), each bounded by
    ``--timeout`` (default PROBE_TIMEOUT_S): a probe that hangs or crashes marks its impl and the list
    still returns.
    """
    from rich.markup import escape
    from rich.table import Table
    from twinbench.harness.cli.console import make_console
    from twinbench.harness.core import devices, registry
    from twinbench.harness.run.supervisor import PROBE_TIMEOUT_S, probe_impls

    plugins = [str(Path(p).resolve()) for p in args.plugin]
    registry.load_plugins(plugins)
    selected = [devices.find(d) for d in args.device] if args.device else list(devices.detect())
    suites = args.suites or sorted(registry.SUITES)
    for s in suites:
        registry.get_suite(s)
    probed = {dev.name: probe_impls(dev, suites, plugins, timeout=args.timeout or PROBE_TIMEOUT_S) for dev in selected}
    table = Table(title="implementations")
    for col in ("suite", "impl", "tags", *[d.name for d in selected]):
        table.add_column(col, overflow="fold")
    for s in suites:
        for impl in registry.impls_for(s):
            cells = []
            for dev in selected:
                ok, why = probed[dev.name].get((s, impl.name), (False, "not probed"))
                # a runnable impl's own note (formats native or emulated...) and why it is never timed there
                note = "; ".join(filter(None, (why, impl.timing_excluded(dev)))) if ok else why
                cells.append(("[green]yes[/]" + (f" ({escape(note)})" if note else "")) if ok
                             else f"[red]no[/]: {escape(why)}")
            table.add_row(s, impl.name, ",".join(impl.tags), *cells)
    console = make_console()
    console.print(table)
    if registry.import_failures:
        for module, why in sorted(registry.import_failures.items()):
            console.print(f"[yellow]import failed[/] {module}: {why}")
    for s in suites:
        suite = registry.SUITES[s]
        console.print(f"{s}: " + ", ".join(f"{p} ({len(c)} cases)" for p, c in suite.profiles.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="twinbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    d = sub.add_parser("devices", help="detected devices, capabilities and fingerprints")
    d.add_argument("--json", action="store_true")
    d.set_defaults(handler=cmd_devices)
    lst = sub.add_parser("list", help="every impl per device: runnable, and why not")
    lst.add_argument("suites", nargs="*")
    lst.add_argument("--device", action="append", default=[])
    lst.add_argument("--plugin", action="append", default=[])
    lst.add_argument("--timeout", type=arguments.positive_float, default=None,
                     help="seconds one impl's available()/supports() may take (default: PROBE_TIMEOUT_S, 60)")
    lst.set_defaults(handler=cmd_list)
    _add_run(sub)
    from twinbench.harness.cli import bench_command, bisect_command, doctor_command, results_commands

    results_commands.register(sub)
    bench_command.register(sub)
    doctor_command.register(sub)
    bisect_command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from twinbench.harness.run.process import WorkerFailed

    args = None
    try:
        args = build_parser().parse_args(argv)
        return int(args.handler(args) or 0)
    except UsageError as exc:
        print(f"twinbench: error: {exc}", file=sys.stderr)
        return 2
    except WorkerFailed as exc:  # a gate/doctor worker that could not start or died: its first line, no traceback
        print(f"twinbench: stopped: {str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"twinbench: interrupted{getattr(args, 'interrupt_hint', '')}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
