"""Datasets: `build_dataset(cfg.data)` for images, `open_latents(...)` for data.name=latents.

Sources and licences are listed in docs/EVALUATION.md ("Data that works offline"): nothing is downloaded
at run time. The image loaders return an in-memory `ImageDataset` (a folder with data.lazy: a
`LazyImageFolder` read per image); `.batch` gives model inputs in [-1, 1] and `to_uint8` maps samples
back. Video (data.name=moving_mnist | video_folder, docs/VIDEO.md) comes as a `VideoDataset` of
N×C×T×H×W uint8 clips with the same mapping. Latents (a `moedit extract` store or a peer's files,
docs/LATENT.md) come already in the model's space.
"""

from __future__ import annotations

from pathlib import Path

from moedit.config import DataConfig
from moedit.data.base import DatasetError, ImageDataset, check_split, default_cache_dir, resize_square, to_uint8
from moedit.data.fashion import load_fashion_mnist
from moedit.data.folder import load_folder
from moedit.data.latent_store import LatentDataset, read_header
from moedit.data.lazy_folder import LazyImageFolder
from moedit.data.peer_latents import FastDiTLatents, PerImageLatents, detect_format
from moedit.data.mnist import load_mnist
from moedit.data.moving_mnist import load_moving_mnist
from moedit.data.npz import load_npz
from moedit.data.synthetic import make_synthetic
from moedit.data.video import VideoDataset
from moedit.data.video_folder import load_video_folder

DATASETS = ("mnist", "fashion_mnist", "folder", "npz", "synthetic", "latents", "moving_mnist", "video_folder")

# synthetic defaults: MNIST-shaped so configs written for MNIST run on it unchanged
SYNTHETIC_SIZES = {"train": 2048, "test": 512}
SYNTHETIC_SEEDS = {"train": 0, "test": 1}  # different seeds: test never repeats a train sample


def build_dataset(cfg: DataConfig) -> ImageDataset | VideoDataset:
    """Load the dataset a DataConfig names (cfg.path / cfg.image_size as each loader documents); the video
    datasets (moving_mnist, video_folder) give a VideoDataset."""
    name = cfg.name
    if name == "mnist":
        return load_mnist(cfg.split, path=cfg.path, image_size=cfg.image_size)
    if name == "fashion_mnist":
        return load_fashion_mnist(cfg.split, path=cfg.path, image_size=cfg.image_size)
    if name == "folder" and cfg.lazy:
        return LazyImageFolder(cfg.path, split=cfg.split, image_size=cfg.image_size, crop=cfg.crop)
    if name == "folder":
        return load_folder(cfg.path, split=cfg.split, image_size=cfg.image_size, crop=cfg.crop)
    if name == "npz":
        return load_npz(cfg.path, split=cfg.split, image_size=cfg.image_size)
    if name == "moving_mnist":  # data.path: optionally a mnist.pkl.gz, as for mnist
        return load_moving_mnist(cfg.split, clips=cfg.clips, frames=cfg.frames, size=cfg.image_size,
                                 digits=cfg.digits, speed=cfg.speed, mnist_path=cfg.path)
    if name == "video_folder":
        return load_video_folder(cfg.path, split=cfg.split, image_size=cfg.image_size, frames=cfg.frames)
    if name == "latents":
        raise DatasetError("data.name=latents holds latents, not images: open it with open_latents (it needs the "
                           "codec's scale and shift); for its images use the store's source data")
    if name == "synthetic":
        check_split(cfg.split, tuple(SYNTHETIC_SIZES), "synthetic")
        return make_synthetic(
            num=SYNTHETIC_SIZES[cfg.split], image_size=cfg.image_size or 28, seed=SYNTHETIC_SEEDS[cfg.split]
        )
    raise DatasetError(f"data.name={name!r} is not a dataset; choose one of: {', '.join(DATASETS)}")


def latent_format(cfg: DataConfig) -> str:
    """data.latent_format, or the layout found at data.path when it is `auto`."""
    return cfg.latent_format if cfg.latent_format != "auto" else detect_format(Path(cfg.path).expanduser())


def open_latents(cfg: DataConfig, scale: float, shift: float, posterior: str = "sample"):
    """Latents (data.name=latents) as training data in the model's space: a `moedit extract` store or a
    peer's pre-extracted folder (data/peer_latents.py, each with its scale convention)."""
    fmt = latent_format(cfg)
    if fmt == "moedit":
        return LatentDataset(cfg.path, scale, shift, posterior)
    if fmt == "fast_dit":
        return FastDiTLatents(cfg.path, scale, shift)
    return PerImageLatents(cfg.path, fmt, scale, shift, posterior)


def source_data(cfg: DataConfig) -> DataConfig:
    """The image data behind `cfg`: a latent store's source (what it was extracted from), else cfg itself."""
    if cfg.name != "latents" or latent_format(cfg) != "moedit":  # the peers' folders do not say
        return cfg
    return DataConfig(**{k: v for k, v in read_header(Path(cfg.path).expanduser())["source"].items()
                         if k in DataConfig.__dataclass_fields__})


__all__ = [
    "DATASETS",
    "DatasetError",
    "ImageDataset",
    "VideoDataset",
    "LatentDataset",
    "open_latents",
    "latent_format",
    "source_data",
    "build_dataset",
    "default_cache_dir",
    "load_fashion_mnist",
    "load_folder",
    "load_mnist",
    "load_moving_mnist",
    "load_video_folder",
    "load_npz",
    "make_synthetic",
    "resize_square",
    "to_uint8",
]
