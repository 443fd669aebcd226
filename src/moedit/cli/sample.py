"""`moedit sample`: draw a class-per-row grid (and optionally an .npz of images) from a run's checkpoint."""

from __future__ import annotations

from pathlib import Path

from moedit.config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict

HELP = "sample from a trained run; writes a PNG grid (one row per class) and optionally an .npz"


def add_arguments(p) -> None:
    p.add_argument("--run", required=True, help="run directory written by `moedit train`")
    p.add_argument("--checkpoint", help="checkpoint directory (default: the run's latest)")
    p.add_argument("--out", help="output PNG (default: RUN/samples/<checkpoint>_seed<seed>.png)")
    p.add_argument("--npz", help="also write the images (uint8) and labels to this .npz")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override sample settings, e.g. --set sample.steps=100 sample.cfg_scale=3")
    p.add_argument("--progress", action="store_true", help="show the sampler's progress bar")


def run(args) -> int:
    import torch

    from moedit.data.base import to_uint8
    from moedit.generate import save_class_grid
    from moedit.models import build_model
    from moedit.objectives import build_objective
    from moedit.train import checkpoint as ckpt
    from moedit.train.trainer import autocast_dtype, resolve_device
    from moedit.utils.npz import save_npz

    run_dir = Path(args.run)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a moedit run directory (no config.yaml); pass the train.out_dir of a run")
    not_sample = [s for s in args.set if not s.startswith("sample.") and not s.startswith("train.device")]
    if not_sample:
        raise ConfigError(f"moedit sample only takes sample.* (and train.device) overrides; got {not_sample}")
    cfg = from_dict(apply_overrides(load_yaml(run_dir / "config.yaml"), args.set))
    path = Path(args.checkpoint) if args.checkpoint else _latest(run_dir)
    out = Path(args.out) if args.out else run_dir / "samples" / f"{path.name}_seed{cfg.sample.seed}.png"
    npz = npz_path(args.npz) if args.npz else None
    _check_outputs(out, npz)  # before the model is loaded and sampled: a bad path costs nothing
    state = ckpt.read_state(path)
    ckpt.check_model_config(path, state, to_dict(cfg.model))
    device = resolve_device(cfg.train.device)
    model = build_model(cfg.model).to(device)
    ckpt.load_weights(model, path, "model.safetensors" if args.raw else "ema.safetensors")
    x_BCHW = save_class_grid(model, build_objective(cfg.objective), cfg.sample, cfg.model.num_classes, device, out,
                             amp_dtype=autocast_dtype(cfg.train.precision, device), progress=args.progress)
    if npz is not None:
        labels = torch.arange(cfg.model.num_classes).repeat_interleave(cfg.sample.per_class)
        save_npz(npz, compressed=True, images=to_uint8(x_BCHW).numpy(), labels=labels.numpy())
    print(f"wrote {out}" + (f" and {npz}" if npz is not None else ""))
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


def _latest(run_dir: Path) -> Path:
    from moedit.train.checkpoint import list_checkpoints

    found = list_checkpoints(run_dir / "checkpoints")
    if not found:
        raise ConfigError(f"{run_dir} has no checkpoints yet; train it first (moedit train ...)")
    return found[-1]
