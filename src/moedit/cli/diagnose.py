"""`moedit diagnose RUN`: the routing record of a run as RUN/diagnostics/report.md plus PNG figures."""

from __future__ import annotations

from pathlib import Path

HELP = "routing report of a run: RUN/diagnostics/report.md and figures (load heatmaps, deadlocks, depth, t, class)"


def add_arguments(p) -> None:
    p.add_argument("run", help="run directory written by `moedit train` (it holds routing/)")
    p.add_argument("--out", help="output directory (default: RUN/diagnostics)")


def run(args) -> int:
    from moedit.diagnostics.report import write_report

    _check_out(args)
    path = write_report(args.run, args.out)
    print(f"report: {path} (figures next to it)")
    return 0


def _check_out(args) -> None:
    """The output folder must take files before the record is read and plotted. The default one is checked
    (and so created) only beside a routing record: for a wrong RUN the record's own message is the fix, and
    no stray RUN/diagnostics folder is left in, say, the current folder."""
    from moedit.utils.files import ensure_writable_dir

    if args.out is not None:
        ensure_writable_dir(args.out, "--out")
    elif (Path(args.run) / "routing").is_dir():
        ensure_writable_dir(Path(args.run) / "diagnostics", "--out (default RUN/diagnostics)")
