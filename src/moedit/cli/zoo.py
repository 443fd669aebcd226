"""`moedit zoo`: train and evaluate every entry of a zoo file on the same data, steps and seeds at equal
activated parameters, then tabulate and plot (docs/RESULTS.md); the work is `moedit.zoo.run_zoo`."""

from __future__ import annotations

import sys

HELP = ("compare routers: train + evaluate every zoo entry (same data, steps, seeds, activated params) "
        "-> OUT/results.md, results.json, quality_vs_steps.png; resumable")


def add_arguments(p) -> None:
    p.add_argument("--zoo", default="configs/zoo/routers.yaml", help="zoo file: entries = config + overrides")
    p.add_argument("--out", default="runs/zoo", help="zoo root: OUT/<dataset>/<entry>/seed<s>/ run directories")
    p.add_argument("--datasets", nargs="+", default=["mnist"], help="mnist and/or fashion_mnist")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="training seeds (at least 2 for a spread)")
    p.add_argument("--entries", nargs="+", help="a subset of the zoo file's entries (default: all)")
    p.add_argument("--steps", type=int, default=600, help="training steps per run")
    p.add_argument("--curve-points", type=int, default=3, help="checkpoints evaluated for the quality curve")
    p.add_argument("--eval-n", type=int, default=300, help="samples per evaluation (multiple of 10)")
    p.add_argument("--sampler-steps", type=int, default=20, help="euler steps per sample")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="guidance scale of the evaluation samples")
    p.add_argument("--threads", type=int, help="CPU threads per run (train.threads); default: torch's")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the tables and plot from finished runs (routing metrics recomputed from their records)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from moedit.zoo import ZooSettings, run_zoo, write_report
    from moedit.zoo.plan import load_claims, load_zoo_file

    if args.report_only:
        rows = write_report(args.out, [e.name for e in load_zoo_file(args.zoo)[0]], load_claims(args.zoo),
                            refresh_routing=True)
        print(f"{len(rows)} finished runs tabulated in {args.out}/results.md")
        return 0
    settings = ZooSettings(steps=args.steps, curve_points=args.curve_points, eval_n=args.eval_n,
                           sampler_steps=args.sampler_steps, cfg_scale=args.cfg_scale, threads=args.threads)
    try:
        rows = run_zoo(args.zoo, args.out, settings, datasets=args.datasets, seeds=args.seeds,
                       entries=args.entries, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("moedit zoo: interrupted; finished runs and checkpoints are kept: run the same command again "
              "to continue", file=sys.stderr)
        return 130
    print(f"{len(rows)} runs: {args.out}/results.md, {args.out}/quality_vs_steps.png")
    return 0
