"""The in-memory video dataset: the counterpart of `ImageDataset` for clips of frames.

Clips are stored as uint8 (0..255) in N×C×T×H×W layout (clip, channel, frame, row, column), frames
square. A batch is handed to the model as float32 in [-1, 1] with exactly the image mapping
x = u / 127.5 - 1 (data/base.py), and `to_uint8` inverts it losslessly for any shape, so
uint8 -> batch -> to_uint8 is the identity on clips too.

`meta` carries optional per-clip side arrays whose first axis is the clip (Moving MNIST stores the
digits' trajectories there: `positions_NTK2`, and its `speed` as a 0-d array); indexing the dataset
never touches them, they are for evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class VideoDataset:
    clips_NCTHW: torch.Tensor  # uint8, 0..255
    labels_N: torch.Tensor  # int64, 0..num_classes-1
    num_classes: int
    class_names: list[str]
    name: str
    meta: dict[str, np.ndarray] = field(default_factory=dict)  # optional side arrays (e.g. positions_NTK2)

    def __post_init__(self) -> None:
        x = self.clips_NCTHW
        if x.dtype != torch.uint8 or x.ndim != 5:
            raise ValueError(f"clips_NCTHW must be a 5-D uint8 tensor (N, C, T, H, W), got {tuple(x.shape)} {x.dtype}")
        if x.shape[3] != x.shape[4]:
            raise ValueError(f"frames must be square, got {tuple(x.shape[3:])}; resize_square them")
        if x.shape[2] < 1:
            raise ValueError(f"clips must have at least one frame, got shape {tuple(x.shape)}")
        n = x.shape[0]
        if self.labels_N.dtype != torch.int64 or self.labels_N.shape != (n,):
            raise ValueError(
                f"labels_N must be int64 of shape ({n},), got {tuple(self.labels_N.shape)} {self.labels_N.dtype}"
            )
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        if len(self.labels_N) and (int(self.labels_N.min()) < 0 or int(self.labels_N.max()) >= self.num_classes):
            lo, hi = int(self.labels_N.min()), int(self.labels_N.max())
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got {lo}..{hi}")
        for key, value in self.meta.items():
            if not isinstance(value, np.ndarray):
                raise ValueError(f"meta[{key!r}] must be a numpy array, got {type(value).__name__}")
            if value.ndim > 0 and value.shape[0] != n:
                raise ValueError(f"meta[{key!r}] has {value.shape[0]} rows for {n} clips; need one row per clip")

    @property
    def image_size(self) -> int:
        """Frame side length (frames are square, checked on construction)."""
        return int(self.clips_NCTHW.shape[-1])

    @property
    def channels(self) -> int:
        return int(self.clips_NCTHW.shape[1])

    @property
    def frames(self) -> int:
        """Frames per clip (T)."""
        return int(self.clips_NCTHW.shape[2])

    def __len__(self) -> int:
        return int(self.clips_NCTHW.shape[0])

    def batch(self, indices: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_BCTHW float32 in [-1, 1], y_B int64) for the given clip indices."""
        idx_B = torch.as_tensor(indices, dtype=torch.long)
        x_BCTHW = self.clips_NCTHW[idx_B].to(torch.float32) / 127.5 - 1.0
        return x_BCTHW, self.labels_N[idx_B]

    def __repr__(self) -> str:
        return (
            f"VideoDataset(name={self.name!r}, n={len(self)}, channels={self.channels}, frames={self.frames}, "
            f"size={tuple(self.clips_NCTHW.shape[3:])}, num_classes={self.num_classes})"
        )


def make_video_dataset(
    clips_NCTHW: np.ndarray,
    labels_N: np.ndarray,
    class_names: list[str],
    name: str,
    meta: dict[str, np.ndarray] | None = None,
) -> VideoDataset:
    """Wrap numpy arrays (uint8 clips, integer labels), copying only when needed (read-only buffers)."""
    x = np.ascontiguousarray(clips_NCTHW, dtype=np.uint8)
    y = np.ascontiguousarray(labels_N, dtype=np.int64)
    x = x if x.flags.writeable else x.copy()
    y = y if y.flags.writeable else y.copy()
    return VideoDataset(
        clips_NCTHW=torch.from_numpy(x),
        labels_N=torch.from_numpy(y),
        num_classes=len(class_names),
        class_names=list(class_names),
        name=name,
        meta=dict(meta or {}),
    )
