"""`moedit autoencoder train | eval`: moedit's own KL autoencoder, the codec of a latent run (docs/LATENT.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

HELP = ("train moedit's autoencoder (writes RUN/autoencoder.{safetensors,json}, reconstructions.png) or measure "
        "an autoencoder's reconstructions")


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    train = sub.add_parser("train", help="train an autoencoder; codec.path=RUN uses it",
                           description="train an autoencoder from a YAML config (configs/autoencoder/mnist.yaml)")
    train.add_argument("--config", "-c", help="YAML config, e.g. configs/autoencoder/mnist.yaml")
    train.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                       help="dotted overrides, e.g. --set train.steps=2000 data.name=fashion_mnist")
    train.add_argument("--resume", action="store_true", help="continue train.out_dir from its latest checkpoint")
    train.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev = sub.add_parser("eval", help="PSNR, FD-LeNet and LeNet accuracy of an autoencoder's reconstructions",
                        description="measure how an autoencoder reconstructs a dataset's images")
    ev.add_argument("--codec", required=True, help="a `moedit autoencoder train` folder, moedit:mnist or "
                                                   "moedit:fashion_mnist")
    ev.add_argument("--data", default=None, help="data.name (default: the one the autoencoder was trained on)")
    ev.add_argument("--data-path", default=None, help="data.path for folder / npz data")
    ev.add_argument("--split", default="test")
    ev.add_argument("--images", type=int, default=10_000, help="at most this many images of the split")
    ev.add_argument("--grid", help="also write originals / reconstructions in alternate rows to this PNG")
    ev.add_argument("--json", help="also write the report to this file")


def run(args) -> int:
    return _train(args) if args.action == "train" else _eval(args)


def _train(args) -> int:
    import yaml

    from moedit.config import to_dict
    from moedit.train.autoencoder import AutoencoderTrainer, load_autoencoder_config

    cfg = load_autoencoder_config(args.config, args.set)
    if args.dry_run:
        sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    trainer = AutoencoderTrainer(cfg, resume=args.resume, progress=not args.no_progress)
    summary = trainer.train()
    print(f"trained: {summary['steps']} steps in {summary['train_wall_s']:.0f} s ({summary['img_per_s']:.0f} img/s); "
          f"latent shift {summary['shift']:.4f}, scale {summary['scale']:.4f}")
    report = _measure(str(trainer.run_dir), cfg.data, cfg.eval.split, cfg.eval.images, trainer.device,
                      trainer.run_dir / "reconstructions.png")
    from moedit.codecs.autoencoder import RECORD_NAME, update_record
    from moedit.utils.files import atomic_write_text

    atomic_write_text(trainer.run_dir / "reconstruction.json", json.dumps(report, indent=1))
    update_record(trainer.run_dir / RECORD_NAME, reconstruction=report)
    print(f"done: {_line(report)}; grid: {trainer.run_dir / 'reconstructions.png'}; use it with "
          f"--set codec.name=autoencoder codec.path={trainer.run_dir}")
    return 0


def _eval(args) -> int:
    from moedit.codecs.autoencoder import autoencoder_files, read_record
    from moedit.config import ConfigError, DataConfig
    from moedit.utils.files import atomic_write_text, ensure_writable_file

    if args.images < 1:
        raise ConfigError(f"--images={args.images} must be at least 1")
    for path, what in ((args.grid, "--grid"), (args.json, "--json")):
        if path:
            ensure_writable_file(path, what)
    trained = read_record(autoencoder_files(args.codec)[1]).get("data", {})
    data = DataConfig(name=args.data or trained.get("name", "mnist"), path=args.data_path or (
        trained.get("path") if not args.data else None), split=args.split, image_size=trained.get("image_size"))
    report = _measure(args.codec, data, args.split, args.images, "cpu", args.grid)
    print(_line(report))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1))
    return 0


def _measure(codec_path: str, data, split: str, images: int, device, grid: str | Path | None) -> dict:
    from dataclasses import replace

    from moedit.codecs import build_codec
    from moedit.config import CodecConfig
    from moedit.data import build_dataset, to_uint8
    from moedit.eval.reconstruction import evaluate_reconstruction, lenet_for, reconstruction_grid

    codec = build_codec(CodecConfig(name="autoencoder", path=codec_path)).to(device)
    dataset = build_dataset(replace(data, split=split))
    codec.check_pixels(dataset.channels, dataset.image_size)
    report, recon_NCHW = evaluate_reconstruction(codec, dataset, images, lenet_for(data.name), device)
    if grid:
        originals_NCHW = to_uint8(dataset.batch(range(min(40, len(recon_NCHW))))[0])
        reconstruction_grid(originals_NCHW, recon_NCHW[: len(originals_NCHW)], grid)
    return report


def _line(report: dict) -> str:
    text = f"{report['images']} images: PSNR {report['psnr_db']:.2f} dB"
    if "fd_lenet" in report:
        text += (f", FD-LeNet {report['fd_lenet']:.3f}, LeNet accuracy {report['accuracy_reconstructed']:.4f} "
                 f"(originals {report['accuracy_original']:.4f})")
    return text
