"""The in-memory dataset every loader returns, and the pixel convention shared by all of moedit.

Images are stored as uint8 (0..255) in NCHW layout; a batch is handed to the model as float32 in
[-1, 1] via x = u / 127.5 - 1, and generated images come back with the exact inverse
u = round(clamp((x + 1) * 127.5, 0, 255)), so uint8 -> batch -> to_uint8 is lossless.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


class DatasetError(ValueError):
    """A user-fixable data problem (missing dataset, bad file); the message names the fix."""


@dataclass
class ImageDataset:
    images_NCHW: torch.Tensor  # uint8, 0..255
    labels_N: torch.Tensor  # int64, 0..num_classes-1
    num_classes: int
    class_names: list[str]
    name: str

    def __post_init__(self) -> None:
        if self.images_NCHW.dtype != torch.uint8 or self.images_NCHW.ndim != 4:
            raise ValueError(
                f"images_NCHW must be a 4-D uint8 tensor, got {tuple(self.images_NCHW.shape)} {self.images_NCHW.dtype}"
            )
        if self.images_NCHW.shape[2] != self.images_NCHW.shape[3]:
            raise ValueError(f"images must be square, got {tuple(self.images_NCHW.shape[2:])}; resize_square them")
        if self.labels_N.dtype != torch.int64 or self.labels_N.shape != (self.images_NCHW.shape[0],):
            raise ValueError(
                f"labels_N must be int64 of shape ({self.images_NCHW.shape[0]},), "
                f"got {tuple(self.labels_N.shape)} {self.labels_N.dtype}"
            )
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        if len(self.labels_N) and (int(self.labels_N.min()) < 0 or int(self.labels_N.max()) >= self.num_classes):
            lo, hi = int(self.labels_N.min()), int(self.labels_N.max())
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got {lo}..{hi}")

    @property
    def image_size(self) -> int:
        """Side length (images are square, checked on construction)."""
        return int(self.images_NCHW.shape[-1])

    @property
    def channels(self) -> int:
        return int(self.images_NCHW.shape[1])

    @property
    def frames(self) -> int:
        """1: an image is a one-frame clip (VideoDataset, data/video.py, has T)."""
        return 1

    def __len__(self) -> int:
        return int(self.images_NCHW.shape[0])

    def batch(self, indices: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_BCHW float32 in [-1, 1], y_B int64) for the given sample indices."""
        idx_B = torch.as_tensor(indices, dtype=torch.long)
        x_BCHW = self.images_NCHW[idx_B].to(torch.float32) / 127.5 - 1.0
        return x_BCHW, self.labels_N[idx_B]

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, n={len(self)}, channels={self.channels}, "
            f"size={tuple(self.images_NCHW.shape[2:])}, num_classes={self.num_classes})"
        )


def to_uint8(x_BCHW: torch.Tensor) -> torch.Tensor:
    """Inverse of ImageDataset.batch: [-1, 1] float -> uint8 (clamped, rounded to nearest)."""
    if x_BCHW.dtype == torch.uint8:
        return x_BCHW
    u = (x_BCHW.detach().to(torch.float32) + 1.0) * 127.5
    return u.clamp(0.0, 255.0).round().to(torch.uint8)


def resize_square(images_NCHW: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side -> `size` (bicubic, antialiased), then a centred size x size crop; uint8 in and out."""
    h, w = images_NCHW.shape[-2:]
    if (h, w) == (size, size):
        return images_NCHW
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    # float32 for the filter; bicubic overshoots, so clamp before rounding back to uint8
    x = F.interpolate(images_NCHW.float(), size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[..., top : top + size, left : left + size]
    return x.clamp(0.0, 255.0).round().to(torch.uint8).contiguous()


def check_split(split: str, valid: Sequence[str], dataset: str) -> None:
    if split not in valid:
        raise DatasetError(f"data.split={split!r} is not valid for {dataset}; choose one of: {', '.join(valid)}")


def default_cache_dir() -> Path:
    """Where decoded datasets are cached: $MOEDIT_CACHE, else ~/.cache/moedit."""
    env = os.environ.get("MOEDIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moedit"


def make_dataset(
    images_NCHW: np.ndarray, labels_N: np.ndarray, class_names: list[str], name: str, image_size: int | None = None
) -> ImageDataset:
    """Wrap numpy arrays (uint8 images, integer labels), copying only when needed; resize if asked."""
    x = np.ascontiguousarray(images_NCHW, dtype=np.uint8)
    y = np.ascontiguousarray(labels_N, dtype=np.int64)
    # torch.from_numpy shares memory; a read-only buffer (np.frombuffer, np.load mmap) must be copied
    x = x if x.flags.writeable else x.copy()
    y = y if y.flags.writeable else y.copy()
    x_NCHW = torch.from_numpy(x)
    if image_size is not None:
        x_NCHW = resize_square(x_NCHW, image_size)
    return ImageDataset(
        images_NCHW=x_NCHW,
        labels_N=torch.from_numpy(y),
        num_classes=len(class_names),
        class_names=list(class_names),
        name=name,
    )
