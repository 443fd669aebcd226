"""`moedit diagnose RUN`: the run's routing record as RUN/diagnostics/report.md plus PNG figures."""

from __future__ import annotations

HELP = "routing report of a run: RUN/diagnostics/report.md and figures (load heatmaps, deadlocks, depth, t, class)"


def add_arguments(p) -> None:
    p.add_argument("run", help="run directory written by `moedit train` (it holds routing/)")
    p.add_argument("--out", help="output directory (default: RUN/diagnostics)")


def run(args) -> int:
    from moedit.diagnostics.report import write_report

    path = write_report(args.run, args.out)
    print(f"report: {path} (figures next to it)")
    return 0
