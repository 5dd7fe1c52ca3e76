"""Subcommands for reports, baselines, the PR gate, gate calibration and nightly history.

Registered into the `twinbench` parser by harness.cli. User mistakes raise UsageError (one line, exit 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twinbench.harness.cli import arguments, ci_output
from twinbench.harness.core.errors import UsageError

DEFAULT_BASELINES = Path("baselines")
DEFAULT_HISTORY = Path("history.sqlite")
# Besides gate.json, what `gate --against --out` writes (with --baseline: the results' full reports too).
GATE_AGAINST_FILES = ("summary.md", "junit.xml")
# What `gate --against` renders its outputs from: it runs no results document, the gate table is the story.
EMPTY_DOC: dict[str, Any] = {"schema_version": 1, "provenance": {}, "fingerprints": {}, "results": []}


def merge_documents(paths: list[str]) -> dict[str, Any]:
    """One document from several results files (e.g. one per machine); later records win per key.

    The key includes the device's fingerprint: `cuda:0` on an H100 machine and `cuda:0` on an MI300X
    machine are two devices, both kept (the report's device-by-device view sets them side by side).
    """
    from twinbench.harness.store.results import load, record_key

    docs = [load(p) for p in paths]
    merged = dict(docs[0], fingerprints={}, ceilings={}, results=[])
    by_key: dict[tuple, dict[str, Any]] = {}
    for d in docs:
        merged["fingerprints"].update(d.get("fingerprints") or {})
        merged["ceilings"].update(d.get("ceilings") or {})
        for rec in d["results"]:
            by_key[(*record_key(rec), rec.get("fingerprint"))] = rec
    merged["results"] = list(by_key.values())
    if len(docs) > 1:
        merged["provenance"] = dict(docs[0]["provenance"], command=f"{len(docs)} results files: "
                                    + ", ".join(str(p) for p in paths))
    return merged


def _files_in(path: str | None) -> list[Path]:
    """An input given as a file or a folder of files (a baseline folder): what must never be overwritten."""
    if not path or "://" in path:
        return []
    p = Path(path)
    return [f for f in p.iterdir() if f.is_file()] if p.is_dir() else [p]


def _gate_config(args, *, threshold: float, test: str):
    from twinbench.harness.gate.stats import GateConfig

    config = GateConfig(threshold=args.threshold if args.threshold is not None else threshold, k=args.k,
                        alpha=args.alpha, correction=args.correction, test=args.test or test)
    config.check()
    return config


def _add_gate_options(p, *, threshold_help: str) -> None:
    p.add_argument("--threshold", type=arguments.nonnegative_float, default=None, help=threshold_help)
    p.add_argument("--k", type=arguments.nonnegative_float, default=2.0,
                   help="minimum effect >= k x the case's own noise (default 2)")
    p.add_argument("--alpha", type=arguments.probability, default=0.05,
                   help="family-wise level across compared cases")
    p.add_argument("--correction", default="holm", help="holm (default) or bh")
    p.add_argument("--test", default=None, help="mwu (Mann-Whitney U) or wilcoxon (paired; --against only)")


def cmd_report(args) -> int:
    from twinbench.harness.store.results import Output, check_outputs
    from twinbench.reports.html import write_html
    from twinbench.reports.junit import write_junit
    from twinbench.reports.markdown import write_markdown

    out = Path(args.out)
    outputs = [Output("--out", out)] + [Output(option, Path(path)) for option, path in
                                        (("--markdown", args.markdown), ("--junit", args.junit), ("--csv", args.csv))
                                        if path]
    check_outputs(outputs, inputs=[*args.results, *_files_in(args.baseline), *_files_in(args.history)])
    doc = merge_documents(args.results)
    focus = _focus_device(doc, args.focus_device)
    gate = None
    if args.baseline:
        from twinbench.harness.gate.stats import GateConfig
        from twinbench.harness.gate.stored import gate_against_baseline

        gate = gate_against_baseline(doc, args.baseline, GateConfig(), allow_mismatch=args.allow_fingerprint_mismatch)
    trends = None
    if args.history:
        from twinbench.harness.store import history

        trends = history.trends(args.history, doc)
    written = [write_html(doc, out, gate=gate, trends=trends, focus_device=focus)]
    if args.markdown:
        written.append(write_markdown(doc, args.markdown, gate=gate))
    if args.junit:
        written.append(write_junit(doc, args.junit, gate=gate))
    if args.csv:
        from twinbench.harness.store.results import write_csv

        write_csv(doc, args.csv)
        written.append(Path(args.csv))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _focus_device(doc: dict[str, Any], text: str | None) -> str | None:
    """The device column --focus-device names (exactly one), or None for the default (the first file's)."""
    from twinbench.reports import model

    if text is None:
        return None
    columns = model.device_columns(doc)
    matched = model.match_devices(columns, text)
    if len(matched) != 1:
        listed = "; ".join(f"{c.model} ({c.key})" for c in columns)
        raise UsageError(f"--focus-device {text!r} matches {len(matched)} of the devices in these results "
                         f"({listed}); give a fingerprint id or fingerprint/device")
    return matched[0].key


def cmd_baseline_save(args) -> int:
    from twinbench.harness.store import baseline
    from twinbench.harness.store.results import Output, check_outputs, load

    doc = load(args.results)
    plans = baseline.plan_save(doc, args.dir, device=args.device, replace=args.replace)
    check_outputs([Output("--dir", Path(args.dir), folder=True), *(Output("--dir", path) for path, _ in plans)],
                  inputs=[args.results])
    for path in baseline.write(plans):
        n = len(baseline.load(path)["entries"])
        print(f"wrote {path} ({n} entries)")
    return 0


def cmd_baseline_show(args) -> int:
    from twinbench.harness.store import baseline

    paths = [Path(p) for p in args.files] or sorted(
        p for p in Path(args.dir).glob("*.json") if not p.name.endswith(".calibration.json"))
    if not paths:
        raise UsageError(f"no baselines in {args.dir}")
    for path in paths:
        base = baseline.load(path)
        fp = base["fingerprint"]
        hard = fp["hard"]
        src = base.get("source") or {}
        print(f"{path}: fingerprint {fp['id']} ({fp.get('name')}: {hard.get('backend')} {hard.get('device')}, "
              f"torch {hard.get('torch')}, {hard.get('cpu_threads')} threads), {len(base['entries'])} entries, "
              f"from git {str(src.get('git_sha', ''))[:12]}{' (dirty)' if src.get('git_dirty') else ''} "
              f"at {base.get('created', '')}")
        if args.verbose:
            for e in sorted(base["entries"], key=baseline.entry_key):
                print(f"  {e['suite']:<14} {e['impl']:<18} {e['mode']:<7} {e['median_ms']:>10.4g} ms  "
                      f"n={len(e['samples_ms'])}  {e['case']}")
    return 0


def _pair_looks(n: int) -> int:
    if n == 1:
        raise UsageError("--pair-looks must be 0 or >= 2 (a spread needs two fresh pairs)")
    return n


def cmd_gate(args) -> int:
    from twinbench.harness.gate.stats import format_table

    if bool(args.against) == bool(args.baseline):
        raise UsageError("give exactly one of --baseline FILE (with RESULTS) or --against GIT_REF")
    if args.out:  # before the gate runs: an unwritable --out must not follow a printed verdict
        from twinbench.harness.store.results import Output, check_outputs
        from twinbench.reports import REPORT_FILES

        names = ["gate.json", *(REPORT_FILES if args.baseline else GATE_AGAINST_FILES)]
        check_outputs([Output("--out", Path(args.out), folder=True), *(Output("--out", Path(args.out) / n)
                                                                         for n in names)],
                      inputs=[*args.results, *_files_in(args.confirm), *_files_in(args.baseline),
                              *_files_in(args.calibration)])
    if args.baseline:
        from twinbench.harness.gate.stored import gate_against_baseline
        from twinbench.harness.store.results import load

        if not args.results:
            raise UsageError("gate --baseline needs a RESULTS file (from `twinbench run`)")
        config = _gate_config(args, threshold=0.05, test="mwu")
        doc = merge_documents(args.results)
        confirm = load(args.confirm) if args.confirm else None
        result = gate_against_baseline(doc, args.baseline, config, allow_mismatch=args.allow_fingerprint_mismatch,
                                       calibration=args.calibration, confirm_doc=confirm)
    else:
        from twinbench.harness.gate import against as gate_against

        if args.results:
            raise UsageError("gate --against runs both sides itself; it takes no RESULTS file")
        if args.confirm:
            raise UsageError("--confirm is for --baseline (--against re-runs flagged cases itself)")
        options = gate_against.GateOptions(against=args.against, selection=_selection(args),
                                           measurement=_measurement(args), out=Path(args.out) if args.out else None,
                                           parity=not args.no_parity,
                                           calibration=Path(args.calibration) if args.calibration else None,
                                           calibration_dir=DEFAULT_BASELINES)
        config = _gate_config(args, threshold=gate_against.DEFAULT_THRESHOLD, test=gate_against.DEFAULT_TEST)
        result = gate_against.run_gate(options, config)
        doc = None
    print(format_table(result))
    if args.out:
        _write_gate_outputs(result, Path(args.out), doc)
    ci_output.publish(doc if doc is not None else EMPTY_DOC, gate=result, annotations=args.annotations)
    return int(result["exit_code"])


def _write_gate_outputs(result: dict[str, Any], out: Path, doc: dict[str, Any] | None) -> None:
    from twinbench.harness.store.results import atomic_write_json

    atomic_write_json(out / "gate.json", result)
    written = [out / "gate.json"]
    if doc is not None:
        from twinbench import reports

        written += reports.write_all(doc, out, gate=result)
    else:
        from twinbench.reports.junit import write_junit
        from twinbench.reports.markdown import write_markdown

        markdown, junit = GATE_AGAINST_FILES
        written += [write_markdown(EMPTY_DOC, out / markdown, gate=result),
                    write_junit(EMPTY_DOC, out / junit, gate=result)]
    print("wrote " + ", ".join(str(p) for p in written))


def _selection(args):
    """gate --against / calibrate: what to compare."""
    from twinbench.harness.gate.against import Selection

    return Selection(suites=list(args.suites), impls=list(args.impl), cases=list(args.case), profile=args.profile,
                     device=args.device, plugins=[str(Path(p).resolve()) for p in args.plugin])


def _measurement(args):
    """gate --against / calibrate: how the two workers measure (rounds and clock validated here)."""
    from twinbench.harness.gate import against as gate_against
    from twinbench.harness.run import process

    threads = gate_against.all_threads() if args.threads == "all" else args.threads
    return gate_against.Measurement(
        rounds=gate_against.check_rounds(args.rounds), block_ms=args.block_ms or gate_against.DEFAULT_BLOCK_MS,
        threads=threads, clock=gate_against.clock_for(args.device, args.clock, threads), pin=not args.no_pin,
        timeout=args.timeout, triton_interpret=process.user_triton_interpret())


def cmd_calibrate(args) -> int:
    from twinbench.harness.gate import calibrate
    from twinbench.harness.store.results import Output, check_outputs

    slowdowns = calibrate.parse_slowdowns(args.slowdowns)
    modes = calibrate.parse_modes(args.modes)
    check_outputs([*([Output("--json", Path(args.json))] if args.json else []),
                   *([Output("--dir", Path(args.dir), folder=True)] if args.save else [])])
    options = calibrate.CalibrateOptions(
        selection=_selection(args), measurement=_measurement(args), slowdowns=slowdowns, modes=modes,
        comparisons=args.comparisons, power_comparisons=args.power_comparisons, max_cases=args.max_cases,
        pair_looks=_pair_looks(args.pair_looks),
        timed=calibrate.parse_timed(args.timed),
        threshold=args.threshold, k=args.k, alpha=args.alpha, correction=args.correction,
        tests=[args.test] if args.test else ["mwu", "wilcoxon"], save_dir=Path(args.dir) if args.save else None,
        json=Path(args.json) if args.json else None)
    return calibrate.main(options)


def cmd_history_add(args) -> int:
    from twinbench.harness.store import history
    from twinbench.harness.store.results import Output, check_outputs

    if "://" not in args.db:  # a URL is a database server's business
        check_outputs([Output("--db", Path(args.db))], inputs=args.results)
    for path in args.results:
        added = history.add(args.db, path)
        print(f"{path}: {'added' if added else 'already in the history, skipped'} ({history.display_name(args.db)})")
    return 0


def cmd_history_show(args) -> int:
    from twinbench.harness.store import history

    print(history.show(args.db, suite=args.suite, metric=args.metric, window=args.window,
                       max_pvalue=args.max_pvalue, min_magnitude=args.min_magnitude, as_json=args.json))
    return 0


def register(sub) -> None:
    p = sub.add_parser("report", help="HTML report (plus optional markdown/JUnit/CSV) from results files")
    p.add_argument("results", nargs="+", help="results.json files (several machines merge into one report)")
    p.add_argument("--out", default="report.html", help="the HTML file to write (default report.html)")
    p.add_argument("--baseline", default=None, help="baseline file or folder: show deltas with intervals")
    p.add_argument("--allow-fingerprint-mismatch", action="store_true")
    p.add_argument("--history", default=None, help="history database (path or URL): show trends")
    p.add_argument("--markdown", default=None, help="also write the markdown summary here")
    p.add_argument("--junit", default=None, help="also write JUnit XML here")
    p.add_argument("--csv", default=None, help="also write the long-format CSV here")
    p.add_argument("--focus-device", default=None,
                   help="the device under bring-up, highlighted in the device-by-device view: a fingerprint id, "
                        "a device name or part of the model name (default: the first results file's device)")
    p.set_defaults(handler=cmd_report)

    b = sub.add_parser("baseline", help="save or show regression baselines (one file per fingerprint)")
    bsub = b.add_subparsers(dest="baseline_command", required=True, parser_class=sub._parser_class)
    s = bsub.add_parser("save", help="store a run's timing samples as the baseline of its fingerprint(s)")
    s.add_argument("results")
    s.add_argument("--dir", default=str(DEFAULT_BASELINES))
    s.add_argument("--device", default=None, help="only this device's fingerprint")
    s.add_argument("--replace", action="store_true", help="drop entries not in these results")
    s.set_defaults(handler=cmd_baseline_save)
    sh = bsub.add_parser("show", help="list baselines: fingerprint, entries, provenance")
    sh.add_argument("files", nargs="*")
    sh.add_argument("--dir", default=str(DEFAULT_BASELINES))
    sh.add_argument("-v", "--verbose", action="store_true", help="every entry")
    sh.set_defaults(handler=cmd_baseline_show)

    g = sub.add_parser("gate", help="PR gate: regressions vs a stored baseline or a git ref (exit 1)")
    g.add_argument("results", nargs="*", help="results.json (with --baseline)")
    g.add_argument("--baseline", default=None, help="baseline file or folder (default folder: baselines/)")
    g.add_argument("--against", default=None, help="git ref: time base and working tree interleaved")
    g.add_argument("--confirm", default=None, help="a fresh results file re-running the flagged cases")
    g.add_argument("--allow-fingerprint-mismatch", action="store_true")
    g.add_argument("--calibration", default=None, help="calibration JSON (default: beside the baseline; "
                   "--against: baselines/<fingerprint>.calibration.json)")
    g.add_argument("--out", default=None, help="folder for gate.json, summary.md, junit.xml (and report)")
    g.add_argument("--no-parity", action="store_true", help="--against: skip the head's parity check")
    ci_output.add_options(g)
    _add_gate_options(g, threshold_help="product threshold (default 0.05 stored baseline, "
                                        "0.02 --against)")
    _add_selection(g)
    g.set_defaults(handler=cmd_gate)

    c = sub.add_parser("calibrate", help="measure the gate's A/A false alarms and power on this machine")
    _add_selection(c)
    _add_gate_options(c, threshold_help="product threshold to calibrate (default as the gate)")
    c.add_argument("--comparisons", type=arguments.positive_int, default=200,
                   help="A/A case comparisons per mode (>= 200)")
    c.add_argument("--power-comparisons", type=arguments.positive_int, default=60,
                   help="comparisons per injected slowdown")
    c.add_argument("--slowdowns", default="5,10,20", help="injected slowdowns in percent")
    c.add_argument("--modes", default="against,baseline", help="against, baseline or both")
    c.add_argument("--max-cases", type=arguments.nonnegative_int, default=4,
                   help="workload items, spread over the selection (0: every timed item, the whole profile)")
    c.add_argument("--timed", default="fwd,fwdbwd", help="passes compared: fwd, fwdbwd or fwd,fwdbwd (as the gate)")
    c.add_argument("--pair-looks", type=arguments.nonnegative_int, default=6,
                   help="A/A looks on fresh worker pairs per item, for the gate's between-pair noise priors "
                        "(0: none)")
    c.add_argument("--save", action="store_true", help="write <dir>/<fingerprint>.calibration.json")
    c.add_argument("--dir", default=str(DEFAULT_BASELINES))
    c.add_argument("--json", default=None, help="write the measured numbers here")
    c.set_defaults(handler=cmd_calibrate)

    h = sub.add_parser("history", help="nightly history: add runs, show trends and change points")
    hsub = h.add_subparsers(dest="history_command", required=True, parser_class=sub._parser_class)
    ha = hsub.add_parser("add", help="append results files to the history database")
    ha.add_argument("results", nargs="+")
    ha.add_argument("--db", default=str(DEFAULT_HISTORY), help="SQLite path (default) or SQLAlchemy URL")
    ha.set_defaults(handler=cmd_history_add)
    hs = hsub.add_parser("show", help="latest value and change points per series")
    hs.add_argument("--db", default=str(DEFAULT_HISTORY))
    hs.add_argument("--suite", default=None)
    hs.add_argument("--metric", default="fwd_median_ms", help="metric name (see results.csv), default fwd_median_ms")
    hs.add_argument("--window", type=arguments.positive_int, default=50, help="E-divisive window (Otava default 50)")
    hs.add_argument("--max-pvalue", type=arguments.probability, default=0.001)
    hs.add_argument("--min-magnitude", type=arguments.nonnegative_float, default=0.05,
                    help="smallest relative change reported")
    hs.add_argument("--json", action="store_true")
    hs.set_defaults(handler=cmd_history_show)


def _threads(text: str) -> int | str:
    return "all" if text == "all" else arguments.positive_int(text)


def _add_selection(p) -> None:
    p.add_argument("--suite", dest="suites", action="append", default=[], help="suites (default: all timed)")
    p.add_argument("--impl", action="append", default=[], help="only these impls")
    p.add_argument("--case", action="append", default=[], help="key=value[,...]: filter or new shape")
    p.add_argument("--profile", default="quick")
    p.add_argument("--device", default="cpu", help="one device (default cpu)")
    p.add_argument("--rounds", type=arguments.rounds, default=None, help="interleaved rounds per comparison (>= 7)")
    p.add_argument("--block-ms", type=arguments.positive_float, default=None, help="milliseconds of calls per sample")
    p.add_argument("--threads", type=_threads, default=None,
                   help="CPU threads per worker, or 'all' (default 1 on the CPU: shared-box timings are far "
                        "steadier); with more than one the wall clock is used, for kernels that split work")
    p.add_argument("--clock", default=None,
                   help="CPU only: process (CPU time, default with one thread) or wall (what `twinbench run` "
                        "measures; the default and the only choice with --threads > 1)")
    p.add_argument("--no-pin", action="store_true",
                   help="CPU only: do not pin both workers to the same CPU(s) (pinning is far steadier on VMs)")
    p.add_argument("--plugin", action="append", default=[])
    p.add_argument("--timeout", type=arguments.positive_float, default=300.0, help="seconds a worker may stay silent")
