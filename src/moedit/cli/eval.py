"""`moedit eval RUN`: sample N images from a run's checkpoint and score them (docs/EVALUATION.md); the work is
`moedit.eval.evaluate_run`, this file only parses arguments and prints the summary."""

from __future__ import annotations

import sys

HELP = "evaluate a trained run: FD-LeNet, KID, precision/recall, class accuracy -> OUT/eval.json + grid.png"


def add_arguments(p) -> None:
    p.add_argument("run", help="run directory written by `moedit train`")
    p.add_argument("--n", type=int, default=1000, help="samples to draw; rounded up to a multiple of the classes")
    p.add_argument("--seed", type=int, default=0, help="evaluation seed (noise of batch b from (seed, b))")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--checkpoint", help="checkpoint directory (default: the run's latest)")
    p.add_argument("--out", help="output folder (default: RUN/eval/step_XXXXXXXX_n{N}_seed{S}[_raw][_<sampler>])")
    p.add_argument("--batch-size", type=int, default=250, help="images per sampling batch (part of the settings)")
    p.add_argument("--metrics", help="comma-separated metric names (default: fd_lenet,kid_lenet,"
                   "precision_recall_lenet,class_accuracy); add fid for Inception FID (optional extra, slow on CPU); "
                   "a video run: fd_lenet_frames,kid_lenet_frames,class_accuracy_frames,identity_stability,motion "
                   "(docs/VIDEO.md); the ones already in OUT/eval.json are kept")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override sample settings (and train.device, train.threads), e.g. "
                        "--set sample.steps=20 sample.cfg_scale=1.5 train.threads=1")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from moedit.eval.evaluate import evaluate_run

    # None: the run's defaults (an image run's DEFAULT_METRICS, a video run's eval/video.py ones)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    try:
        result = evaluate_run(
            args.run, n=args.n, seed=args.seed, raw=args.raw, checkpoint=args.checkpoint, out_dir=args.out,
            batch_size=args.batch_size, overrides=args.set, metrics=metrics,
            round_n=True, progress=not args.no_progress, log=lambda msg: print(f"note: {msg}", file=sys.stderr),
        )
    except KeyboardInterrupt:
        print("moedit eval: interrupted; the finished batches are kept in the output folder's samples.npz: "
              "run the same command again to continue", file=sys.stderr)
        return 130
    print(summary(result))
    return 0


def summary(r: dict) -> str:
    """One screen: the settings that make the numbers comparable, then the numbers."""
    interval = f", guidance interval {r['cfg_interval']}" if r["cfg_interval"] else ""
    lines = [
        f"{r['dataset']} {r['split']} split ({_reference_size(r)}) vs N={r['n']} samples, seed {r['seed']}",
        f"checkpoint step {r['checkpoint_step']} ({r['weights']} weights): {r['checkpoint']}",
        f"sampler {r['sampler']}, {r['steps']} steps, guidance scale {r['cfg_scale']:g}{interval}; "
        f"{r['device']} {r['precision']}, torch {r['torch_version']}",
    ]
    m = r["metrics"]
    if "fd_lenet" in m:
        lines.append(f"  FD-LeNet            {m['fd_lenet']:.3f}   (moedit-internal, not FID)")
    if "fid" in m:
        lines.append(f"  Inception FID       {m['fid']:.3f}   (N = {m['fid_n_fake']} vs {m['fid_n_ref']}: biased at small N)")
    if "kid_lenet" in m:
        k = m["kid_lenet"]
        lines.append(f"  KID-LeNet           {k['mean']:.5f} ± {k['std']:.5f}   "
                     f"({k['subsets']} subsets of {k['subset_size']})")
    if "precision_recall_lenet" in m:
        pr = m["precision_recall_lenet"]
        lines.append(f"  precision / recall  {pr['precision']:.3f} / {pr['recall']:.3f}   "
                     f"(k={pr['k']}, {pr['n_real']} real vs {pr['n_fake']} generated)")
    if "class_accuracy" in m:
        lines.append(f"  class accuracy      {m['class_accuracy']:.4f}")
    if "fd_lenet_frames" in m:
        lines.append(f"  FD-LeNet per frame  {m['fd_lenet_frames']:.3f}   (digit crops, moedit-internal, not FVD)")
    if "kid_lenet_frames" in m:
        k = m["kid_lenet_frames"]
        lines.append(f"  KID-LeNet per frame {k['mean']:.5f} ± {k['std']:.5f}   "
                     f"({k['subsets']} subsets of {k['subset_size']})")
    shown = {"fd_lenet", "kid_lenet", "precision_recall_lenet", "class_accuracy", "class_accuracy_per_class", "fid",
             "fid_n_fake", "fid_n_ref", "fid_weights_sha256", "fid_preprocess", "fd_lenet_frames", "kid_lenet_frames",
             "class_accuracy_frames_per_class"}
    lines += [f"  {name:<19} {value}" for name, value in m.items() if name not in shown]
    pictures = [f for key, f in r.get("files", {}).items() if key != "samples"] or ["grid.png"]
    lines.append(f"wrote {r['out_dir']}/eval.json and {', '.join(pictures)}")
    return "\n".join(lines)


def _reference_size(r: dict) -> str:
    if "n_reference_frames" in r:  # a video evaluation
        return f"{r['n_reference']} clips, {r['n_reference_frames']} frames"
    return f"{r['n_reference']} images"
