"""`moedit sample`: draw a class-per-row grid (and optionally an .npz of images) from a run's checkpoint."""

from __future__ import annotations

from pathlib import Path


HELP = ("sample from a trained run; writes a PNG grid (one row per class; video: a contact sheet, one clip per "
        "row, and an animated .gif beside it) and optionally an .npz")


def add_arguments(p) -> None:
    p.add_argument("--run", required=True, help="run directory written by `moedit train`")
    p.add_argument("--checkpoint", help="checkpoint directory (default: the run's latest)")
    p.add_argument("--out", help="output PNG (default: RUN/samples/<checkpoint>_seed<seed>.png)")
    p.add_argument("--npz", help="also write the images (uint8) and labels to this .npz")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override sample settings, e.g. --set sample.steps=100 sample.cfg_scale=3 (or codec.path=DIR "
                        "when the run's autoencoder folder moved)")
    p.add_argument("--progress", action="store_true", help="show the sampler's progress bar")


def run(args) -> int:
    import torch

    from moedit.codecs import build_codec
    from moedit.data.base import to_uint8
    from moedit.device import autocast_dtype, resolve_device
    from moedit.generate import save_class_grid
    from moedit.objectives import build_objective
    from moedit.runs import SAMPLE_OVERRIDES, open_run
    from moedit.utils.npz import save_npz

    run = open_run(args.run, args.checkpoint, args.set, allowed=SAMPLE_OVERRIDES, command="moedit sample")
    cfg = run.cfg
    out = Path(args.out) if args.out else run.run_dir / "samples" / f"{run.path.name}_seed{cfg.sample.seed}.png"
    npz = npz_path(args.npz) if args.npz else None
    _check_outputs(out, npz)  # before the model is loaded and sampled: a bad path costs nothing
    device = resolve_device(cfg.train.device)
    model = run.load_model("raw" if args.raw else "ema", device)
    codec = build_codec(cfg.codec).to(device)  # the run's: latents are decoded to images
    x_BCHW = save_class_grid(model, build_objective(cfg.objective), cfg.sample, cfg.model.num_classes, device, out,
                             amp_dtype=autocast_dtype(cfg.train.precision, device), progress=args.progress,
                             codec=codec)
    if npz is not None:
        labels = torch.arange(cfg.model.num_classes).repeat_interleave(cfg.sample.per_class)
        save_npz(npz, compressed=True, images=to_uint8(x_BCHW).numpy(), labels=labels.numpy())
    written = f"{out} (contact sheet) and {out.with_suffix('.gif')}" if x_BCHW.ndim == 5 else str(out)
    print(f"wrote {written}" + (f" and {npz}" if npz is not None else ""))
    return 0


def npz_path(name: str) -> Path:
    """Where --npz NAME is written: NAME, with .npz appended when it lacks it (as numpy has always done),
    so that the path printed is the file there is."""
    path = Path(name)
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def _check_outputs(out: Path, npz: Path | None) -> None:
    from moedit.utils.files import ensure_writable_file

    ensure_writable_file(out, "--out")
    if npz is not None:
        ensure_writable_file(npz, "--npz")
